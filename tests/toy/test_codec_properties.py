"""Properties of the codec (hypothesis): top-K optimality by brute force, monotonicity in K, LS row
scale, fast base path = closed form, f16 bound, equivariances, determinism.
Run: pytest tests/toy/test_codec_properties.py"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from seeddelta.codec.encode import EncodeConfig, encode
from seeddelta.codec.metrics import compare_rows
from seeddelta.testing.tolerances import F16_SUBNORMAL_ABS, F64_REORDER, U16, U32, U64, fwht_chain_bound

seeds = st.integers(0, 2**31 - 1)


def _matrix(seed: int, n_out: int, n_in: int, ties: bool = False) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if ties:  # few distinct magnitudes so that ties happen often
        return (rng.integers(-3, 4, (n_out, n_in)) * 0.25).astype(np.float32)
    return rng.standard_normal((n_out, n_in)).astype(np.float32)


@given(seed=seeds, n_in=st.integers(1, 9), n_out=st.integers(1, 4), k=st.integers(1, 9), ties=st.booleans(),
       weighted=st.booleans())
def test_topk_is_the_best_k_subset(seed, n_in, n_out, k, ties, weighted):
    """COO keeps, per row, a K-subset minimising the (imatrix-weighted) discarded energy; among
    equal scores the lowest indices win. Brute force over every K-subset (n_in <= 9)."""
    k = min(k, n_in)
    W = _matrix(seed, n_out, n_in, ties)
    s = np.random.default_rng(seed + 1).uniform(0.5, 2.0, n_in) if weighted else None
    sdw = encode(W, EncodeConfig(K=k, val_type="f32"), s)
    weight = np.ones(n_in) if s is None else s
    score = (np.abs(W.astype(np.float64)) * weight) ** 2
    for o in range(n_out):
        kept = sdw.idx[o].astype(int)
        best = min(score[o].sum() - score[o, list(c)].sum() for c in itertools.combinations(range(n_in), k))
        got = score[o].sum() - score[o, kept].sum()
        assert got <= best + F64_REORDER * max(1.0, score[o].sum()), (o, got, best)
        # deterministic ties: no unkept index with the same score precedes a kept one
        for i in kept:
            assert all(j in kept for j in range(i) if score[o, j] == score[o, i]), (o, kept, score[o])
        np.testing.assert_array_equal(sdw.val[o], W[o, kept])  # exact values, f32 storage of f32 input


@given(seed=seeds, n_in=st.integers(2, 40), n_out=st.integers(1, 40), base=st.sampled_from(["none", "xor_circulant"]),
       scheme=st.sampled_from(["coo", "block"]))
def test_error_non_increasing_in_k(seed, n_in, n_out, base, scheme):
    """The base does not depend on K (same seed), so a larger budget can only drop less energy.
    Tolerance: stored f32 values move each row's error by <= u32·‖kept‖ ≤ u32·‖w − w0‖, twice."""
    W = _matrix(seed, n_out, n_in)
    errs = []
    for k in range(1, n_in + 1, max(1, n_in // 6)):
        sdw = encode(W, EncodeConfig(K=k, base=base, scheme=scheme, block=4, val_type="f32", base_store="f32", seed=seed))
        errs.append(np.linalg.norm(W - sdw.dense(), axis=1))
    norm = np.linalg.norm(W.astype(np.float64), axis=1) + 1e-30
    for a, b in zip(errs, errs[1:], strict=False):
        assert np.all(b <= a + 4 * U32 * norm), (a, b)


@given(seed=seeds, n_in=st.integers(2, 32), n_out=st.integers(1, 32), weighted=st.booleans())
def test_row_scale_is_weighted_least_squares(seed, n_in, n_out, weighted):
    """s_o = <w, ŵ>_ω / ‖ŵ‖²_ω for the stored unscaled ŵ, then rounded to f16 (error <= u16·|s|)."""
    W = _matrix(seed, n_out, n_in)
    s = np.random.default_rng(seed).uniform(0.5, 2.0, n_in) if weighted else None
    cfg = EncodeConfig(K=max(1, n_in // 3), base="xor_circulant", row_scale=True, base_max_samples=0, seed=seed)
    sdw = encode(W, cfg, s)
    omega = np.ones(n_in) if s is None else s**2
    scale, sdw.row_scale = sdw.row_scale, None
    w_hat = sdw.dense()
    num = (W.astype(np.float64) * w_hat) @ omega
    den = (w_hat * w_hat) @ omega
    optimum = np.where(den > 1e-30, num / np.where(den > 0, den, 1), 1.0)
    assert np.all(np.abs(scale.astype(np.float64) - optimum) <= U16 * np.abs(optimum) + F16_SUBNORMAL_ABS)
    # and no other scalar does better (up to that rounding): error at s ± 1 % is not smaller
    def err(c):
        return ((W - c[:, None] * w_hat) ** 2) @ omega
    for factor in (0.99, 1.01):
        assert np.all(err(optimum) <= err(optimum * factor) * (1 + F64_REORDER) + 1e-300)


@given(seed=seeds, n_in=st.integers(1, 70), n_out=st.integers(1, 70), trials=st.integers(1, 3),
       samples=st.sampled_from([0, 3, 2048]))
def test_fast_base_path_equals_closed_form_in_float64(seed, n_in, n_out, trials, samples):
    """The Hadamard chain D3·H·D2·H·P1·D1 (runtime order) in float64 equals h2[p XOR inv[i]].
    Bound per output: the chain's fwht_chain_bound(L)·‖d2‖₁·‖x‖₁ (each addition of a transform adds
    <= u·Σ|·|), plus (B − 1)·u·‖d2‖₁·‖x‖₁ for the sum of the B block outputs of a wide geometry, plus
    the closed form's own n_in-term dot product, n_in·u·Σ|x|·|w|."""
    W = _matrix(seed, n_out, n_in)
    base = encode(W, EncodeConfig(K=1, base="xor_circulant", base_perm_trials=trials, base_max_samples=samples,
                                  seed=seed)).base
    x = np.random.default_rng(seed).standard_normal((3, n_in))
    fast = base._chain(x)
    dense = base.dense_rows(np.arange(n_out))
    closed = x @ dense.T
    L, g = base.d2.shape[1], base.geometry
    wide_sum = 0 if g.tall else g.B - 1
    chain = (fwht_chain_bound(L, U64) + wide_sum * U64) * np.abs(base.d2.astype(float)).sum(1).max() * np.abs(x).sum(1)
    bound = chain[:, None] + n_in * U64 * (np.abs(x) @ np.abs(dense).T)
    assert np.all(np.abs(fast - closed) <= bound + 1e-300), float(np.max(np.abs(fast - closed) / (bound + 1e-300)))


@given(seed=seeds, n_in=st.integers(1, 40), n_out=st.integers(1, 40), k=st.integers(1, 40))
def test_f16_values_within_their_bound(seed, n_in, n_out, k):
    """Storing values in f16 instead of f32 moves each row by <= u16·‖kept‖ + √K·2⁻²⁵ (subnormals)."""
    k = min(k, n_in)
    W = _matrix(seed, n_out, n_in) * np.float32(0.01)
    a = encode(W, EncodeConfig(K=k, val_type="f32")).dense()
    b = encode(W, EncodeConfig(K=k, val_type="f16")).dense()
    bound = U16 * np.linalg.norm(a, axis=1) + np.sqrt(k) * F16_SUBNORMAL_ABS
    assert np.all(np.linalg.norm(a - b, axis=1) <= bound * (1 + 1e-9))


@given(seed=seeds, n_in=st.integers(1, 30), n_out=st.integers(1, 30), scheme=st.sampled_from(["coo", "block"]))
def test_row_permutation_equivariance(seed, n_in, n_out, scheme):
    """Without a base every row is encoded on its own: permuting W's rows permutes the stored rows."""
    W = _matrix(seed, n_out, n_in, ties=bool(seed % 2))
    perm = np.random.default_rng(seed).permutation(n_out)
    cfg = EncodeConfig(K=max(1, n_in // 2), scheme=scheme, block=3, row_scale=True)
    a, b = encode(W, cfg), encode(W[perm], cfg)
    np.testing.assert_array_equal(a.idx[perm], b.idx)
    np.testing.assert_array_equal(a.val[perm], b.val)
    np.testing.assert_array_equal(a.row_scale[perm], b.row_scale)


@given(seed=seeds, n_in=st.integers(1, 40), n_out=st.integers(1, 40), alpha=st.sampled_from([0.25, 2.0, 8.0]),
       base=st.sampled_from(["none", "xor_circulant"]))
def test_scale_equivariance(seed, n_in, n_out, alpha, base):
    """W → αW with α a power of two is exact in floating point: same indices, values and base scaled by α."""
    W = _matrix(seed, n_out, n_in)
    cfg = EncodeConfig(K=max(1, n_in // 3), base=base, val_type="f32", base_store="f32", base_max_samples=0, seed=seed)
    a, b = encode(W, cfg), encode(W * np.float32(alpha), cfg)
    np.testing.assert_array_equal(a.idx, b.idx)
    np.testing.assert_array_equal(a.val * np.float32(alpha), b.val)
    if base != "none":
        np.testing.assert_array_equal(a.base.d2 * np.float32(alpha), b.base.d2)


@given(seed=seeds, n_in=st.integers(1, 50), n_out=st.integers(1, 50))
def test_determinism(seed, n_in, n_out):
    """Same inputs and seed → identical stored arrays, including sampled base fits and perm trials."""
    W = _matrix(seed, n_out, n_in)
    cfg = EncodeConfig(K=3, base="xor_circulant", base_max_samples=5, base_perm_trials=3, row_scale=True, seed=seed)
    a, b = encode(W, cfg).tensors(), encode(W.copy(), cfg).tensors()
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_zero_rows_are_exact_not_cos_zero():
    """An all-zero row reconstructed as all-zero counts as exact (the original reported cos = 0)."""
    m = compare_rows(np.zeros((2, 5)), np.zeros((2, 5)))
    assert np.all(m.rel_l2 == 0) and np.all(m.cos == 1) and np.all(m.norm_ratio == 1)


def test_more_permutation_trials_never_increase_the_fit_error():
    """Trial 0 is the identity and a later trial must be strictly better to win (spec §2.4)."""
    W = _matrix(3, 64, 48)
    sse = [encode(W, EncodeConfig(K=1, base="xor_circulant", base_perm_trials=t, seed=5)).base.sse for t in (1, 4, 16)]
    assert sse[1] <= sse[0] and sse[2] <= sse[0], sse


@pytest.mark.parametrize(("bad", "needle"), [(np.nan, "non-finite"), (np.inf, "non-finite")])
def test_non_finite_weight_is_refused(bad, needle):
    from seeddelta.errors import SeedDeltaError

    W = np.ones((3, 4), dtype=np.float32)
    W[1, 2] = bad
    with pytest.raises(SeedDeltaError, match=needle) as exc:
        encode(W, EncodeConfig(K=1))
    assert "row 1, column 2" in str(exc.value)


def test_i16_indices_switch_to_i32_with_a_warning():
    W = np.zeros((2, 40000), dtype=np.float32)
    W[:, 39999] = 1.0
    sdw = encode(W, EncodeConfig(K=1, idx_type="i16"))
    assert sdw.idx.dtype == np.int32 and int(sdw.idx[0, 0]) == 39999
    assert any("i32" in w for w in sdw.warnings)
