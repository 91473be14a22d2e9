"""SeedΔ projections of the runtime (seeddelta.runtime.projections) against two independent references:

* a from-scratch float64 numpy evaluation of spec-builder-runtime §2.2/§3.5/§9.3 written here
  (Hadamard as an explicit Sylvester matrix, gathers by fancy indexing, residual by loops), and
* the codec (`SeedDeltaWeight.apply` / `.dense`) on arrays produced by `codec.encode`.

Tolerance (stated once, used everywhere): both runtime modes evaluate in float32. For one output,
every intermediate is a sum of products whose absolute values add up to at most
M = s·(|D3|·J·|P2|·|D2|·J·|P1|·|D1|·|x̂| + Σ|val|·|x|) (J = all-ones, the absolute Hadamard).
Recursive float32 summation of n terms errs by at most n·u·Σ|terms| (u = 2⁻²⁴); the base chain
has 2·fwht_torch_levels(L) additions plus ≤ 4 diagonal/scale products, the residual ≤ n_in + 1 terms,
the materialized path one rounding of Ŵ plus an n_in-term dot product. Each path is therefore within
(n_in + 2·levels(L) + 6)·u·M of the exact value, and two paths within twice that.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from seeddelta.codec import encode as codec
from seeddelta.codec.hadamard import fwht_torch_levels
from seeddelta.errors import SeedDeltaError
from seeddelta.runtime.projections import (
    MaterializedSeedDeltaProjection,
    SparseSeedDeltaProjection,
    parse_payload,
)
from seeddelta.testing.oracles import reference_apply
from seeddelta.testing.tolerances import F16_SUBNORMAL_ABS, F64_REORDER, U16, U32


def bound(t: dict[str, np.ndarray], n_in: int, n_out: int, x: np.ndarray) -> np.ndarray:
    L = t["base_d1"].shape[-1] if "base_d1" in t else 1
    per_path = (n_in + 2 * fwht_torch_levels(L) + 6) * U32
    return 2 * per_path * reference_apply(t, n_in, n_out, x, absolute=True) + 1e-30


def make_tensors(rng: np.random.Generator, n_in: int, n_out: int, *, scheme: str = "coo", K: int = 8,
                 block: int = 4, base: str | None = "depth2", row_scale: bool = True,
                 idx_dtype=np.int16, val_dtype=np.float16, one_d_base: bool = False) -> dict[str, np.ndarray]:
    t: dict[str, np.ndarray] = {}
    if scheme == "coo":
        idx = np.stack([rng.permutation(n_in)[:K] for _ in range(n_out)]).astype(idx_dtype)
        t["d_idx"], t["d_val"] = idx, rng.normal(0, 1, (n_out, K)).astype(val_dtype)
    else:
        nbt = -(-n_in // block)
        nb = min(K, nbt)
        bi = np.stack([rng.permutation(nbt)[:nb] for _ in range(n_out)]).astype(idx_dtype)
        t["b_idx"], t["b_val"] = bi, rng.normal(0, 1, (n_out, nb, block)).astype(val_dtype)
    if row_scale:
        t["d_row_scale"] = rng.uniform(0.5, 1.5, n_out).astype(np.float16)
    if base is not None:
        L = 1 << max(0, (min(n_in, n_out) - 1).bit_length())
        B = -(-max(n_in, n_out) // L)
        t["base_d1"] = rng.uniform(0.5, 1.5, (B, L)).astype(np.float16)
        if base in ("depth2", "perm2"):
            t["base_d2"] = (rng.normal(0, 1, (B, L)) / L).astype(np.float16)
            t["base_d3"] = rng.uniform(0.5, 1.5, (B, L)).astype(np.float16)
        t["base_perm1"] = np.stack([rng.permutation(L) for _ in range(B)]).astype(np.int16)
        if base == "perm2":
            t["base_perm2"] = np.stack([rng.permutation(L) for _ in range(B)]).astype(np.int16)
        if one_d_base:
            assert B == 1
            for k in [k for k in t if k.startswith("base_")]:
                t[k] = t[k].reshape(-1)
    return t


CASES = [
    # (n_in, n_out, options) — tall, wide, square, non-power-of-two, every stored feature
    (24, 40, dict(scheme="coo")),
    (40, 24, dict(scheme="coo")),
    (40, 24, dict(scheme="block", block=4, K=3)),
    (24, 40, dict(scheme="block", block=5, K=5)),  # last block partial (24 = 4·5 + 4): padding skipped
    (32, 32, dict(scheme="coo", base="perm2")),
    (20, 50, dict(scheme="coo", base="depth1", row_scale=False)),
    (50, 20, dict(scheme="coo", base=None, idx_dtype=np.int32, val_dtype=np.float32)),
    (16, 16, dict(scheme="coo", one_d_base=True)),  # B == 1 stored 1-D (original rejects it, §12.2)
    (48, 64, dict(scheme="coo", base="depth2", K=48)),
]


@pytest.mark.parametrize("n_in,n_out,opts", CASES)
def test_sparse_and_materialized_match_spec_reference(n_in: int, n_out: int, opts: dict, seed: int) -> None:
    rng = np.random.default_rng(seed + n_in * 100 + n_out)
    t = make_tensors(rng, n_in, n_out, **opts)
    payload = parse_payload("blk.0.ffn_gate", t, n_in, n_out)
    assert payload is not None
    x = rng.normal(0, 1, (5, n_in)).astype(np.float32)
    ref = reference_apply(t, n_in, n_out, x)
    tol = bound(t, n_in, n_out, x)
    sparse = SparseSeedDeltaProjection(payload)
    mat = MaterializedSeedDeltaProjection(payload)
    ys = sparse(torch.from_numpy(x)).numpy().astype(np.float64)
    ym = mat(torch.from_numpy(x)).numpy().astype(np.float64)
    # every path is within (n_in + 2·levels(L) + 6)·u·M of the exact value (module docstring); tol is twice that
    assert np.all(np.abs(ys - ref) <= tol), float(np.max(np.abs(ys - ref) / tol))
    assert np.all(np.abs(ym - ref) <= tol), float(np.max(np.abs(ym - ref) / tol))
    assert np.all(np.abs(ys - ym) <= tol)
    # the float64 reconstruction is the operator itself: Ŵ·x in float64 equals the reference to rounding
    dense = payload.dense()
    np.testing.assert_allclose(x.astype(np.float64) @ dense.T, ref, rtol=0, atol=float(np.max(tol)) * 1e-6 + F64_REORDER)
    # leading batch dimensions are kept
    assert sparse(torch.from_numpy(x).reshape(5, 1, n_in)).shape == (5, 1, n_out)
    # Ŵ held as float16 (models that are not F32): Ŵ rounded once, so each product gains at most
    # u16·|Ŵ_ij·x_j| (normal range) or F16_SUBNORMAL_ABS·|x_j| (below it) on top of the float32 band
    mat16 = MaterializedSeedDeltaProjection(payload, torch.float16)
    assert mat16.weight.dtype == torch.float16
    assert np.array_equal(mat16.weight.numpy(), dense.astype(np.float16))  # one rounding of the float64 Ŵ
    y16 = mat16(torch.from_numpy(x)).numpy().astype(np.float64)
    extra = U16 * np.abs(x.astype(np.float64)) @ np.abs(dense).T + F16_SUBNORMAL_ABS * np.abs(x).sum(1)[:, None]
    assert np.all(np.abs(y16 - ref) <= tol + extra), float(np.max(np.abs(y16 - ref) / (tol + extra)))


def test_block_preferred_over_coo(seed: int) -> None:
    rng = np.random.default_rng(seed)
    t = make_tensors(rng, 24, 40, scheme="block", base=None)
    t.update({k: v for k, v in make_tensors(rng, 24, 40, scheme="coo", base=None).items() if k.startswith("d_")})
    payload = parse_payload("blk.1.ffn_up", t, 24, 40)
    x = rng.normal(0, 1, (3, 24)).astype(np.float32)
    only_block = {k: v for k, v in t.items() if not k.startswith("d_") or k == "d_row_scale"}
    y = SparseSeedDeltaProjection(payload)(torch.from_numpy(x)).numpy()
    ref = reference_apply(only_block, 24, 40, x)
    assert np.all(np.abs(y - ref) <= bound(only_block, 24, 40, x))
    coo_ref = reference_apply({k: v for k, v in t.items() if not k.startswith("b_")}, 24, 40, x)
    assert np.max(np.abs(coo_ref - ref)) > 1e-2  # the two residuals really differ, so the check can fail


@pytest.mark.parametrize("mutate,needle", [
    (lambda t: t.pop("d_val"), "d_val: missing"),
    (lambda t: t.__setitem__("d_val", t["d_val"][:, :-1]), "d_idx .* / d_val"),
    (lambda t: t.__setitem__("d_idx", t["d_idx"].astype(np.float32)), "d_idx: dtype"),
    (lambda t: t.__setitem__("d_row_scale", t["d_row_scale"][:-1]), "d_row_scale"),
    (lambda t: t.__setitem__("base_d1", t["base_d1"][:, :-1]), "base_d1"),
    (lambda t: t.__setitem__("base_perm1", t["base_perm1"][:, :4]), "base_perm1"),
    (lambda t: t.pop("base_d1"), "base_d1: missing"),
])
def test_malformed_payload_is_a_clear_error(mutate, needle: str, seed: int) -> None:
    t = make_tensors(np.random.default_rng(seed), 24, 40)
    mutate(t)
    with pytest.raises(SeedDeltaError, match=needle):
        parse_payload("blk.2.ffn_down", t, 24, 40)


def test_no_tensors_means_no_payload() -> None:
    assert parse_payload("blk.0.ffn_gate", {}, 8, 8) is None


def test_nonfinite_outputs_are_zeroed_and_counted(seed: int) -> None:
    # stored values are finite (Inf/NaN would be refused at load); their sum overflows float32
    t = make_tensors(np.random.default_rng(seed), 24, 40, base=None, row_scale=False, val_dtype=np.float32)
    t["d_val"][3, :] = np.float32(3e38)
    proj = SparseSeedDeltaProjection(parse_payload("blk.0.ffn_gate", t, 24, 40))
    y = proj(torch.ones(2, 24))
    assert torch.isfinite(y).all()
    assert proj.nonfinite == 2 and float(y[0, 3]) == 0.0


# ------------------------------------------------------------------------------------------ codec


@pytest.mark.parametrize("shape,cfg", [
    ((96, 64), dict(K=12, scheme="coo", base="xor_circulant", row_scale=True)),
    ((64, 96), dict(K=16, scheme="block", block=8, base="xor_circulant", row_scale=True)),
    ((96, 64), dict(K=64, scheme="coo", base="none", val_type="f32", idx_type="i32")),
    ((40, 24), dict(K=5, scheme="coo", base="none")),
])
def test_runtime_agrees_with_codec(shape: tuple[int, int], cfg: dict, seed: int) -> None:
    rng = np.random.default_rng(seed)
    n_out, n_in = shape
    W = rng.normal(0, 0.05, shape).astype(np.float32)
    sdw = codec.encode(W, codec.EncodeConfig(**cfg))
    tensors = sdw.tensors()
    payload = parse_payload("blk.0.ffn_up", tensors, n_in, n_out)
    x = rng.normal(0, 1, (7, n_in)).astype(np.float32)
    tol = bound(tensors, n_in, n_out, x)
    y_codec = sdw.apply(x).astype(np.float64)
    y_sparse = SparseSeedDeltaProjection(payload)(torch.from_numpy(x)).numpy().astype(np.float64)
    y_mat = MaterializedSeedDeltaProjection(payload)(torch.from_numpy(x)).numpy().astype(np.float64)
    assert np.all(np.abs(y_sparse - y_codec) <= tol), float(np.max(np.abs(y_sparse - y_codec) / tol))
    assert np.all(np.abs(y_mat - y_codec) <= tol)
    # float64 reconstructions from the same stored values: equal up to float64 rounding of the base chain
    np.testing.assert_allclose(payload.dense(), sdw.dense(), rtol=0, atol=F64_REORDER * max(1.0, float(np.abs(W).max())))
