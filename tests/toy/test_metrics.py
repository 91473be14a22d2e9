"""Metrics: closed-form cases for the weight-space and functional metrics, the every-row rule,
the cost model against the spec's worked example, stored bytes.   Run: pytest tests/toy/test_metrics.py"""

from __future__ import annotations

import numpy as np
import pytest

from seeddelta.codec.base import XorCirculantBase
from seeddelta.codec.encode import EncodeConfig, SeedDeltaWeight, encode
from seeddelta.codec.metrics import bits_per_weight, compare_rows, cost_model, evaluate_weight
from seeddelta.testing.tolerances import F64_METRIC_ATOL, U32


def test_compare_rows_closed_form():
    """w = (3, 4), ŵ = (3, 0): ‖w − ŵ‖ = 4, ‖w‖ = 5, <w, ŵ> = 9 → rel 0.8, cos 0.6, ratio 0.6."""
    m = compare_rows(np.array([[3.0, 4.0]]), np.array([[3.0, 0.0]]))
    assert m.rel_l2[0] == pytest.approx(0.8, abs=F64_METRIC_ATOL)
    assert m.cos[0] == pytest.approx(0.6, abs=F64_METRIC_ATOL)
    assert m.norm_ratio[0] == pytest.approx(0.6, abs=F64_METRIC_ATOL)


def _scaled_copy(W: np.ndarray, c: float) -> SeedDeltaWeight:
    """A SeedΔ weight with K = n_in whose values are c·W: every functional draw has rel = |1 − c|."""
    n_out, n_in = W.shape
    idx = np.broadcast_to(np.arange(n_in, dtype=np.int32), (n_out, n_in)).copy()
    return SeedDeltaWeight(n_in, n_out, "coo", 32, idx, (c * W).astype(np.float32))


@pytest.mark.parametrize("c", [0.5, 1.0, 1.25])
def test_functional_metrics_on_a_scaled_copy(c):
    """ŷ = c·y for every x, so rel_l2_x = |1 − c|, cos_x = 1, norm_ratio_x = c for every draw, with
    or without imatrix-scaled inputs. Tolerance: f32 arithmetic of ŷ over n_in = 24 terms, 32·u32."""
    rng = np.random.default_rng(0)
    W = rng.standard_normal((20, 24)).astype(np.float32)
    s = rng.uniform(0.5, 2, 24)
    out = evaluate_weight(W, _scaled_copy(W, c), eval_cols=20, eval_x=16, imatrix_scale=s, seed=3)
    tol = 32 * U32 * 4
    for suffix in ("_x", "_x_w"):
        assert out[f"rel_l2_mean{suffix}"] == pytest.approx(abs(1 - c), abs=tol)
        assert out[f"rel_l2_p95{suffix}"] == pytest.approx(abs(1 - c), abs=tol)
        assert out[f"cos_p05{suffix}"] == pytest.approx(1.0, abs=tol)
        assert out[f"norm_ratio_mean{suffix}"] == pytest.approx(c, abs=tol)
    assert out["has_x"] and out["has_w"]


def test_eval_cols_at_or_above_n_out_uses_every_row():
    """Deterministic: all rows, so two seeds agree and the figures equal a direct computation."""
    rng = np.random.default_rng(1)
    W = rng.standard_normal((30, 40)).astype(np.float32)
    sdw = encode(W, EncodeConfig(K=5, base="xor_circulant", row_scale=True))
    a = evaluate_weight(W, sdw, eval_cols=30, eval_x=0, seed=1)
    b = evaluate_weight(W, sdw, eval_cols=1000, eval_x=0, seed=2)
    assert a == b
    direct = compare_rows(W, sdw.dense())
    assert a["rel_l2_mean"] == pytest.approx(direct.rel_l2.mean(), abs=F64_METRIC_ATOL)
    assert a["cos_p05"] == pytest.approx(np.percentile(direct.cos, 5), abs=F64_METRIC_ATOL)


def test_uncomputed_metrics_are_zero_and_finite():
    W = np.ones((4, 4), dtype=np.float32)
    out = evaluate_weight(W, encode(W, EncodeConfig(K=1)), eval_cols=0, eval_x=8)
    assert out["has_x"] is False and out["has_w"] is False
    assert all(v == 0.0 for k, v in out.items() if not k.startswith("has_"))


def test_cost_model_matches_the_spec_example():
    """spec-builder-runtime §7: gate of a 4096 × 14336 model, K = 256, base, row scale:
    dense 117.4 M, base 0.44 M, delta 7.34 M, ratio ≈ 0.066 (B = 4 blocks of L = 4096)."""
    L, B = 4096, 4
    ones = np.ones((B, L), dtype=np.float16)
    base = XorCirculantBase(4096, 14336, ones, ones, ones, np.zeros((B, L), dtype=np.int16))
    idx = np.zeros((14336, 256), dtype=np.int16)
    sdw = SeedDeltaWeight(4096, 14336, "coo", 32, idx, idx.astype(np.float16), np.ones(14336, np.float16), base)
    cost = cost_model(sdw)
    assert (cost["base_L"], cost["base_B"]) == (4096, 4)
    assert cost["ops_dense"] == 2 * 4096 * 14336 == 117_440_512
    assert cost["ops_base"] == 4 * (2 * 4096 * 12 + 3 * 4096) == 442_368
    assert cost["ops_delta"] == 2 * 256 * 14336 == 7_340_032
    assert cost["ops_row_scale"] == 14336
    assert cost["ops_ratio"] == pytest.approx(0.066, abs=5e-4)


def test_stored_bytes_and_bits_per_weight():
    """COO i16 + f16: 4 bytes per kept entry, + 2 bytes per row for the f16 row scale."""
    W = np.random.default_rng(2).standard_normal((48, 64)).astype(np.float32)
    sdw = encode(W, EncodeConfig(K=8, row_scale=True))
    assert sdw.nbytes() == 48 * 8 * (2 + 2) + 48 * 2
    assert bits_per_weight(sdw) == pytest.approx(8 * sdw.nbytes() / (48 * 64))
    wide = encode(W, EncodeConfig(K=8, idx_type="i32", val_type="f32", base="xor_circulant"))
    L, B = 64, 1  # n_in 64, n_out 48: L = next_pow2(48) = 64, B = ceil(64/64) = 1
    assert wide.nbytes() == 48 * 8 * 8 + 3 * L * B * 2 + L * B * 2
