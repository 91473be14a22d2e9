"""SeedΔ files built from SmolLM2-135M (Q4_1) by `seeddelta build`, run by the runtime (tier `real`).

Tolerance for logits: the float32 chain bound of tests/toy/test_runtime.py,
n_layer·8·n·u·(1 + max|logit|) with n = n_ff = 1536, u = 2⁻²⁴.
"""

from __future__ import annotations

import numpy as np
import pytest

from seeddelta.cli import main
from seeddelta.runtime.model import load_model, load_tokenizer
from seeddelta.testing.models import SMOLLM2_INSTALL, smollm2_path

PATH = smollm2_path()

pytestmark = pytest.mark.skipif(PATH is None, reason=SMOLLM2_INSTALL)
PROMPT = "The quick brown fox jumps over the lazy dog. Paris is the capital of"


def tol_for(ref: np.ndarray) -> float:
    return 30 * 8 * 1536 * 2.0 ** -24 * (1 + float(np.abs(ref).max()))


@pytest.fixture(scope="module")
def ids() -> list[int]:
    return load_tokenizer(PATH).encode(PROMPT)


@pytest.fixture(scope="module")
def dense_logits(ids) -> np.ndarray:
    return load_model(PATH).forward(ids).numpy()


def test_full_budget_stripped_file_reproduces_the_dense_model(tmp_path, ids, dense_logits) -> None:
    out = str(tmp_path / "full.gguf")
    # K = n_in for every kind, no base, f32 values: the stored residual is the dequantized weight itself
    assert main(["build", "-i", str(PATH), "-o", out, "--layers", "0-1", "--K", "576", "--K-down", "1536",
                 "--val-type", "f32", "--idx-type", "i32", "--strip-dense", "-q"]) == 0
    for mode in ("materialized", "sparse"):
        m = load_model(out, mode=mode)
        assert m.n_seeddelta == 6
        assert np.max(np.abs(m.forward(ids).numpy() - dense_logits)) <= tol_for(dense_logits)


def test_lossy_file_modes_agree_and_differ_from_dense(tmp_path, ids, dense_logits) -> None:
    out = str(tmp_path / "lossy.gguf")
    assert main(["build", "-i", str(PATH), "-o", out, "--layers", "3", "--K", "128", "--base", "--row-scale",
                 "--strip-dense", "-q"]) == 0
    mat = load_model(out).forward(ids).numpy()
    sparse_model = load_model(out, mode="sparse")
    sparse = sparse_model.forward(ids).numpy()
    assert np.max(np.abs(mat - sparse)) <= tol_for(mat)
    assert np.max(np.abs(mat - dense_logits)) > 10 * tol_for(mat)  # the SeedΔ projections are really used
    assert sparse_model.weight_nbytes() < load_model(PATH).weight_nbytes()
