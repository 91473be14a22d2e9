"""The runtime against the training-side model (seeddelta.tiny.model.TinyLlama).

1. Export round trip (always runs): a float32 TinyLlama is exported to GGUF F16 by
   `seeddelta.tiny.export.export_gguf`; our runtime on that file must reproduce the float32 model's
   logits within the **f16 tolerance**: each weight is rounded to f16 (relative error ≤ 2⁻¹¹), so each
   matmul output moves by at most 2⁻¹¹·Σ|terms|, and a logit — the end of ≤ n_layer·8 such stages —
   by at most n_layer·8·2⁻¹¹·(1 + max|logit|) (first order, O(1)-conditioned random weights).
2. Committed tiny model (skipped until it exists): the training-side model holding the GGUF's exact
   values vs our runtime on the same file, within the f32 tolerance n_layer·8·n·u·(1 + max|logit|)
   (n = n_ff, u = 2⁻²⁴), and both greedy decoders return the same answers on held-out prompts.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from seeddelta.runtime.model import load_model, load_tokenizer
from seeddelta.runtime.tokenizers.spm import tiny_tokenizer  # noqa: E402
from seeddelta.tiny import export as tiny_export
from seeddelta.tiny import model as tiny_model

U16 = 2.0 ** -11
U32 = 2.0 ** -24


def test_export_round_trip_within_f16_tolerance(tmp_path: Path) -> None:
    tok = tiny_tokenizer()
    cfg = tiny_model.TinyConfig(n_vocab=tok.n_vocab, n_layer=2, n_embd=64, n_ff=96, n_head=4, n_head_kv=2, n_ctx=128)
    model = tiny_model.TinyLlama(cfg)
    model.init_weights(7)
    with torch.no_grad():  # std 0.02 → 0.2: peaked attention, so rope/Q-K layout errors are visible
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(10.0)
            else:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * 0.1)
    path = tiny_export.export_gguf(model, tok, tmp_path / "rt.gguf")
    ids = tok.encode("### TASK\ncopy\n### INPUT\nIN: hello world 42\n### OUTPUT\n", add_bos=True)
    with torch.no_grad():
        ref = model(torch.tensor([ids]))[0].double().numpy()
    rt = load_model(path)
    assert load_tokenizer(path).encode("IN: ab 7", add_bos=True) == tok.encode("IN: ab 7", add_bos=True)
    got = rt.forward(ids).double().numpy()
    tol = cfg.n_layer * 8 * U16 * (1 + np.abs(ref).max())
    err = np.max(np.abs(got - ref))
    assert err <= tol, (err, tol)
    # the f16 rounding is visible (the comparison is not vacuous) but far below O(1) layout errors
    assert err > 0


def committed() -> Path:
    from seeddelta.assets import TINY_MODEL

    p = TINY_MODEL
    assert p.is_file(), f"the tiny model ships inside the package: {p} is missing"
    return p


@pytest.fixture(scope="module")
def both():
    p = committed()
    train_side, tok = tiny_export.load_gguf_model(p)
    train_side.eval()
    return p, train_side, tok, load_model(p)


def test_committed_model_logits_match_training_side(both) -> None:
    from seeddelta.assets import TINY_VAL_TEXT
    from seeddelta.evaluation.windows import read_text

    p, train_side, tok, rt = both
    ids = tok.encode(read_text(TINY_VAL_TEXT), add_bos=True)[:384]
    with torch.no_grad():
        ref = train_side(torch.tensor([ids]))[0].double().numpy()
    got = rt.forward(ids).double().numpy()
    c = rt.config
    tol = c.n_layer * 8 * c.n_ff * U32 * (1 + np.abs(ref).max())
    assert np.max(np.abs(got - ref)) <= tol
    assert np.mean(got.argmax(-1) == ref.argmax(-1)) == 1.0


def test_committed_model_greedy_answers_match_training_side(both) -> None:
    from seeddelta.evaluation.greedy import greedy_decode, load_pack
    from seeddelta.tiny.evaluate import greedy_answer

    p, train_side, tok, rt = both
    items = load_pack()
    picked = [next(it for it in items if it.task == t) for t in ("copy", "sum", "brackets")]
    picked += [it for it in items[1::37]][:6]
    for it in picked:
        ours = greedy_decode(rt, tok, it.prompt, 48).text.split("\n", 1)[0]
        assert ours == greedy_answer(train_side, tok, it.prompt), it.id
