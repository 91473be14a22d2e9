"""Pure-math checks of the evaluation definitions (seeddelta.evaluation.scoring) on fake models with closed forms.

Expected values are computed here by hand from the definitions (llama-perplexity, field-anchors
§2.1), never taken from the code under test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from seeddelta.errors import SeedDeltaError
from seeddelta.evaluation.scoring import kl_divergence, mean_se, model_logits, percentiles, perplexity
from seeddelta.evaluation.windows import make_windows
from seeddelta.testing.tolerances import F64_REORDER

V = 11  # vocabulary of the fake models
A = 2.5  # logit given to the predicted token


class NextPlusOne:
    """Fake model: at every position, logit A on (token + 1) mod V, 0 elsewhere."""

    def __init__(self, a: float = A) -> None:
        self.a = a
        self.calls: list[tuple[int, int]] = []

    def forward(self, tokens, cache=None, logits_start: int = 0) -> torch.Tensor:
        t = np.asarray(tokens)
        self.calls.append((len(t), logits_start))
        out = torch.zeros((len(t), V), dtype=torch.float32)
        out[torch.arange(len(t)), torch.as_tensor((t + 1) % V)] = self.a
        return out[logits_start:]


def hand_nlls(tokens: list[int], n_ctx: int, n_chunk: int) -> list[float]:
    z = math.log(math.exp(A) + V - 1)
    out = []
    for c in range(n_chunk):
        for j in range(n_ctx // 2, n_ctx - 1):
            cur, nxt = tokens[c * n_ctx + j], tokens[c * n_ctx + j + 1]
            out.append(z - A if nxt == (cur + 1) % V else z)
    return out


def test_windows_follow_llama_perplexity() -> None:
    toks = list(range(100, 100 + 37))
    w = make_windows(toks, 8, bos_id=1)
    assert w.n_chunk == 37 // 8 and w.first == 4
    for c in range(w.n_chunk):
        assert w.inputs[c, 0] == 1  # BOS replaces the first token of every window
        assert list(w.inputs[c, 1:]) == toks[c * 8 + 1:(c + 1) * 8]
        # positions 4..6 predict tokens 5..7 of the window: n_ctx − 1 − first = 3 per window
        assert list(w.targets[c]) == toks[c * 8 + 5:(c + 1) * 8]
    assert w.n_scored == 4 * 3
    assert make_windows(toks, 8, chunks=2).n_chunk == 2
    assert make_windows(toks, 8, bos_id=None).inputs[1, 0] == toks[8]  # no BOS vocabulary: untouched
    with pytest.raises(SeedDeltaError, match="at least 2·n_ctx = 40"):
        make_windows(toks, 20)


def test_perplexity_closed_form_on_a_fake_model(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n_ctx, n_tok = 16, 16 * 5 + 3
    toks = [int(rng.integers(V))]
    for _ in range(n_tok - 1):  # two thirds of the steps follow the fake model's rule
        toks.append((toks[-1] + 1) % V if rng.random() < 2 / 3 else int(rng.integers(V)))
    fake = NextPlusOne()
    w = make_windows(toks, n_ctx, bos_id=0)
    res = perplexity(model_logits(fake), w)
    nll = hand_nlls(toks, n_ctx, 5)
    n = len(nll)
    mean = sum(nll) / n
    var = sum(x * x for x in nll) / n - mean * mean
    assert n == res.nll.size == 5 * (n_ctx - 1 - n_ctx // 2)
    assert res.ppl == pytest.approx(math.exp(mean), rel=F64_REORDER)
    assert res.se == pytest.approx(math.exp(mean) * math.sqrt(var / (n - 1)), rel=1e-9)
    assert all(call == (n_ctx, n_ctx // 2) for call in fake.calls)  # whole window in, scored tail out


def test_uniform_model_has_ppl_equal_to_vocab_and_zero_se() -> None:
    res = perplexity(model_logits(NextPlusOne(a=0.0)), make_windows([i % V for i in range(40)], 8, bos_id=0))
    assert res.ppl == pytest.approx(V, rel=F64_REORDER)
    assert res.se == pytest.approx(0.0, abs=F64_REORDER)


def test_kld_of_identical_models_is_zero() -> None:
    w = make_windows([(3 * i) % V for i in range(64)], 16, bos_id=0)
    r = kl_divergence(model_logits(NextPlusOne()), model_logits(NextPlusOne()), w)
    s = r.summary()
    assert np.all(r.kld == 0.0)
    assert s["same_top_p"]["mean"] == 1.0 and s["same_top_p"]["se"] == 0.0
    assert s["delta_p"]["mean"] == 0.0 and s["delta_p"]["rms"] == 0.0
    assert s["delta_nll"]["mean"] == 0.0 and s["delta_nll"]["se"] == 0.0


def test_kld_closed_form_uniform_base_against_peaked_model() -> None:
    toks = [(i * 7) % V for i in range(64)]
    w = make_windows(toks, 16, bos_id=0)
    r = kl_divergence(model_logits(NextPlusOne(a=0.0)), model_logits(NextPlusOne()), w)
    # p uniform, q = softmax(A on one token): KL = −log V + log Z − A/V with Z = e^A + V − 1
    z = math.exp(A) + V - 1
    np.testing.assert_allclose(r.kld, -math.log(V) + math.log(z) - A / V, rtol=F64_REORDER)
    # Δp of the correct token: q(correct) − 1/V, with q(correct) = e^A/Z when the rule predicts it
    hits = np.array([(w.inputs[c, j] + 1) % V == w.targets[c, j - w.first]
                     for c in range(w.n_chunk) for j in range(w.first, 15)])
    np.testing.assert_allclose(r.dp, np.where(hits, math.exp(A) / z, 1 / z) - 1 / V, rtol=F64_REORDER)
    # the uniform base ties everywhere; argmax picks the lowest id (0), the model its predicted token
    assert r.same_top.mean() == pytest.approx(np.mean([(t + 1) % V == 0 for t in w.inputs[:, w.first:15].ravel()]))
    assert r.summary()["ppl_base"]["ppl"] == pytest.approx(V, rel=F64_REORDER)


def test_mean_se_and_percentiles_match_their_definitions(seed: int) -> None:
    x = np.random.default_rng(seed).normal(size=257)
    m, se = mean_se(x)
    assert m == pytest.approx(float(np.mean(x)))
    assert se == pytest.approx(float(np.std(x) / math.sqrt(x.size - 1)))
    got = percentiles(x, [0.99, 0.5, 0.05])
    for f, key in ((0.99, "p99"), (0.5, "p50"), (0.05, "p5")):
        s = np.sort(x)
        pos = f * (x.size - 1)
        lo = int(pos)
        assert got[key] == pytest.approx(s[lo] + (s[lo + 1] - s[lo]) * (pos - lo))
