"""The runtime's blocked causal attention against a float64 softmax oracle, on both sides of every
query-block edge, with and without earlier positions in a KV cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from seeddelta.runtime.model import ATTENTION_QUERY_BLOCK, causal_attention

EPS32 = float(np.finfo(np.float32).eps)


def _oracle(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past: int) -> np.ndarray:
    """softmax(q·kᵀ/√d + causal mask)·v in float64, every query over every key it may see."""
    qd, kd, vd = (x.double().numpy() for x in (q, k, v))
    t, seen = qd.shape[1], kd.shape[1]
    scores = qd @ kd.transpose(0, 2, 1) / np.sqrt(qd.shape[-1])
    visible = np.arange(seen)[None, :] <= np.arange(past, past + t)[:, None]
    scores = np.where(visible[None], scores, -np.inf)
    w = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return (w / w.sum(axis=-1, keepdims=True)) @ vd


B = ATTENTION_QUERY_BLOCK


@pytest.mark.parametrize("t", [1, 2, B - 1, B, B + 1, 2 * B, 2 * B + 3])
@pytest.mark.parametrize("past", [0, 5])
def test_blocked_causal_attention_equals_the_masked_softmax(t: int, past: int) -> None:
    gen = torch.Generator().manual_seed(t * 31 + past)
    heads, hd = 3, 16
    q = torch.randn(heads, t, hd, generator=gen)
    k = torch.randn(heads, past + t, hd, generator=gen)
    v = torch.randn(heads, past + t, hd, generator=gen)
    got = causal_attention(q, k, v, past).double().numpy()
    want = _oracle(q, k, v, past)
    # Each output is a convex combination of at most past+t rows of v, summed in float32: the rounding
    # bound of an n-term sum is n·eps·max|v| (plus the softmax weights' own relative eps per term).
    bound = 2 * (past + t) * EPS32 * float(v.abs().max())
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= bound


def test_a_query_never_sees_a_later_key() -> None:
    """Changing the values of the keys after a query's position leaves its output bit-identical."""
    gen = torch.Generator().manual_seed(7)
    t = B + 9
    q, k, v = (torch.randn(2, t, 8, generator=gen) for _ in range(3))
    before = causal_attention(q, k, v, 0)
    cut = B + 1  # a position just past the first block edge
    k2, v2 = k.clone(), v.clone()
    k2[:, cut:] += 100.0
    v2[:, cut:] -= 100.0
    after = causal_attention(q, k2, v2, 0)
    assert torch.equal(before[:, :cut], after[:, :cut])
    assert not torch.equal(before[:, cut:], after[:, cut:])
