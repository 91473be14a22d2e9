"""SeedΔ projections for the torch runtime, built directly from the raw GGUF tensors.

This is the runtime's own path (independent of `seeddelta.codec.encode`), following the runtime
semantics of spec-builder-runtime §9 / §2.2:

    y = s ⊙ (W0·x + Δ·x)

* W0: per block b, ``F_b = D3 · H · P2 · D2 · H · P1 · D1`` (rightmost first), H the unnormalised
  natural-order Walsh–Hadamard transform, P a *gather* ``(P v)[i] = v[perm[i]]`` (the original
  reads ``v[0]`` for an out-of-range entry, §2.2; we refuse a perm that is not a permutation). Depth 1 when
  neither d2 nor perm2 is present. Tall (n_out >= n_in): x zero-padded to L, block outputs
  concatenated, truncated to n_out. Wide: x cut into B chunks of L (zero-padded), block outputs
  summed, truncated to n_out.
* Δ: COO (``d_idx``, ``d_val``) or block (``b_idx``, ``b_val``; preferred when both exist).
  The original skips entries whose input index is negative or >= n_in; we refuse such a file at
  load (`parse_payload`), so every stored entry is used. Positions of the last block that lie past
  n_in are padding and are skipped.
* s: ``d_row_scale`` multiplies the sum of base and residual.
* extension delta_regime/1 (`codec.regime`, `runtime.regime`): Δ only for the tokens whose input
  statistic lies in the weight's regime; the others get s ⊙ W0·x (dense rows stay dense). Both modes
  compute the mask per token (vectorised); the sparse mode then runs the residual on those tokens only
  (the compute saved), the materialized one holds Ŵ and the base-only s ⊙ W0 (twice the memory, no
  compute saved: it is the reference the sparse mode is checked against).

Two evaluation modes:

* ``materialized`` — the dense Ŵ (n_out × n_in) is reconstructed once at load time in float64
  (base chain applied to the identity, residual scattered, row scale) and stored as float32;
  the forward is a plain matmul.
* ``sparse`` — no dense copy is ever built: the base runs as batched float32 FWHTs (`fwht_torch`:
  H_a ⊗ H_b as two small matrix products, not the original's butterflies; same transform, its own
  stated rounding bound) and the
  residual as a CSR sparse × dense product (indices and values held as stored — i16/i32, f16/f32 —
  and converted exactly to the int32/float32 CSR for each product).

Deviations from the original runtime (documented, deliberate): malformed SeedΔ tensors — bad shapes,
out-of-range indices, a base_perm that is not a permutation, NaN/Inf values — raise a
`SeedDeltaError` naming the tensor instead of being dropped, skipped or computed on (each silently
changes the function computed, §12.2); a base with B == 1 stored 1-D ``(L,)`` is accepted (§12.2);
non-finite outputs are replaced by 0 and counted (the original tries a per-element dense fallback,
which a stripped file cannot do anyway).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace

import numpy as np
import torch

from seeddelta.codec.hadamard import fwht_torch
from seeddelta.codec.regime import DeltaRegime
from seeddelta.errors import SeedDeltaError
from seeddelta.gguf_format.schema import SDQ_SUFFIXES, SEEDDELTA_SUFFIXES
from seeddelta.gguf_format.seeddelta_tensors import StoredArray, check_seeddelta_arrays
from seeddelta.runtime.regime import RegimeGate
from seeddelta.runtime.sdq_projections import SdqPayload, SparseSdqProjection, parse_sdq_payload
from seeddelta.runtime.weights import linear

MODES = ("materialized", "sparse")


@dataclass
class BasePayload:
    """W0 parameters, each (B, L) in numpy order; d1 always present."""

    d1: np.ndarray
    d2: np.ndarray | None
    d3: np.ndarray | None
    perm1: np.ndarray | None
    perm2: np.ndarray | None

    @property
    def L(self) -> int:
        return int(self.d1.shape[1])

    @property
    def B(self) -> int:
        return int(self.d1.shape[0])


@dataclass
class SeedDeltaPayload:
    """Validated SeedΔ tensors of one FFN weight (numpy order, dtypes as stored)."""

    name: str  # e.g. "blk.3.ffn_gate"
    n_in: int
    n_out: int
    coo: tuple[np.ndarray, np.ndarray] | None  # d_idx (n_out, K), d_val (n_out, K)
    block: tuple[np.ndarray, np.ndarray] | None  # b_idx (n_out, nb), b_val (n_out, nb, blk)
    row_scale: np.ndarray | None  # (n_out,)
    base: BasePayload | None
    dense_rows: tuple[np.ndarray, np.ndarray] | None = None  # extension dense_rows/1: dr_idx (R,), dr_val (R, n_in)
    regime: DeltaRegime | None = None  # extension delta_regime/1: Δ only for tokens inside it

    @property
    def scheme(self) -> str:
        return "block" if self.block is not None else "coo"

    @property
    def tall(self) -> bool:
        return self.n_out >= self.n_in

    def stored_nbytes(self) -> int:
        arrays: list[np.ndarray | None] = [self.row_scale]
        if self.block is not None:
            arrays += list(self.block)
        elif self.coo is not None:
            arrays += list(self.coo)
        if self.base is not None:
            arrays += [self.base.d1, self.base.d2, self.base.d3, self.base.perm1, self.base.perm2]
        if self.dense_rows is not None:
            arrays += list(self.dense_rows)
        if self.regime is not None:
            arrays += list(self.regime.tensors().values())
        return int(sum(a.nbytes for a in arrays if a is not None))

    def entries_per_row(self) -> int:
        """Δ entries per output row as the residual is evaluated (a block's padding included)."""
        if self.block is not None:
            return int(self.block[1].shape[1] * self.block[1].shape[2])
        return 0 if self.coo is None else int(self.coo[0].shape[1])

    def gate(self) -> RegimeGate | None:
        return None if self.regime is None else RegimeGate(self.regime, self.n_out, self.entries_per_row())

    # ---------------------------------------------------------------- flattened residual
    def residual_entries(self) -> tuple[np.ndarray, np.ndarray]:
        """(idx int64 (n_out, E), val float32 (n_out, E)); padding past n_in in a last partial block gets idx 0, val 0."""
        if self.block is not None:
            b_idx, b_val = self.block
            blk = b_val.shape[2]
            bi = b_idx.astype(np.int64)
            idx = bi[:, :, None] * blk + np.arange(blk, dtype=np.int64)[None, None, :]
            valid = (bi[:, :, None] >= 0) & (idx >= 0) & (idx < self.n_in)
            idx = idx.reshape(self.n_out, -1)
            val = b_val.astype(np.float32).reshape(self.n_out, -1)
            valid = valid.reshape(self.n_out, -1)
        elif self.coo is not None:
            d_idx, d_val = self.coo
            idx = d_idx.astype(np.int64)
            val = d_val.astype(np.float32)
            valid = (idx >= 0) & (idx < self.n_in)
        else:
            return np.zeros((self.n_out, 0), np.int64), np.zeros((self.n_out, 0), np.float32)
        idx = np.where(valid, idx, 0)
        val = np.where(valid, val, np.float32(0.0)).astype(np.float32)
        return idx, val

    # ---------------------------------------------------------------- float64 reconstruction
    def dense(self, c0: int = 0, c1: int | None = None) -> np.ndarray:
        """Ŵ[:, c0:c1] = diag(s)·(W0 + R) as float64 (n_out, c1 − c0), from the stored values (exact f16→f64);
        all columns by default. Each element is the same float64 sequence whatever the column range."""
        c1 = self.n_in if c1 is None else c1
        w = np.zeros((self.n_out, c1 - c0), dtype=np.float64)
        if self.base is not None:
            op = _BaseOp(self.base, self.n_in, self.n_out, torch.float64)
            for c in range(c0, c1, 256):  # W0 column by column (unit inputs), bounded working set
                eye = torch.zeros((min(256, c1 - c), self.n_in), dtype=torch.float64)
                eye[torch.arange(eye.shape[0]), torch.arange(c, c + eye.shape[0])] = 1.0
                w[:, c - c0: c - c0 + eye.shape[0]] += op(eye).numpy().T
        idx, val = self.residual_entries()
        rows = np.repeat(np.arange(self.n_out), idx.shape[1])
        cols = idx.reshape(-1)
        inside = (cols >= c0) & (cols < c1)
        np.add.at(w, (rows[inside], cols[inside] - c0), val.reshape(-1)[inside].astype(np.float64))
        if self.row_scale is not None:
            w *= self.row_scale.astype(np.float64)[:, None]
        if self.dense_rows is not None:  # these rows are the stored original rows, not SeedΔ's
            dr_idx, dr_val = self.dense_rows
            w[dr_idx.astype(np.int64)] = dr_val[:, c0:c1].astype(np.float64)
        return w


def parse_payload(name: str, arrays: dict[str, StoredArray], n_in: int,
                  n_out: int) -> SeedDeltaPayload | SdqPayload | None:
    """The SeedΔ tensors of one weight (keys = suffixes in `SEEDDELTA_SUFFIXES`), validated.

    Returns None when there are no SeedΔ tensors at all; raises SeedDeltaError naming the tensor and the
    problem on anything `gguf_format.seeddelta_tensors.check_seeddelta_arrays` refuses (out-of-range
    indices, a base_perm that is not a permutation, NaN/Inf, inconsistent shapes, ...). A weight of the
    variant sdq (`sdq_*` tensors) becomes an `SdqPayload` (`runtime.sdq_projections`)."""
    given = {k: v for k, v in arrays.items() if k in SEEDDELTA_SUFFIXES and v is not None}
    if not given:
        return None
    check_seeddelta_arrays(name, given, n_in, n_out)
    if any(k in SDQ_SUFFIXES for k in given):
        return parse_sdq_payload(name, given, n_in, n_out)
    present = {k: v for k, v in given.items() if isinstance(v, np.ndarray)}
    block = (present["b_idx"], present["b_val"]) if "b_idx" in present else None
    # the runtime prefers block when both are present (§8.2)
    coo = (present["d_idx"], present["d_val"]) if "d_idx" in present and block is None else None

    def as2d(key: str) -> np.ndarray | None:
        a = present.get(key)
        return None if a is None else (a.reshape(1, -1) if a.ndim == 1 else a)  # B == 1 may be stored 1-D

    base = None
    d1 = as2d("base_d1")
    if d1 is not None:
        base = BasePayload(d1, as2d("base_d2"), as2d("base_d3"), as2d("base_perm1"), as2d("base_perm2"))
    dense_rows = (present["dr_idx"], present["dr_val"]) if "dr_idx" in present else None
    regime = (DeltaRegime.from_tensors(name, present["rg_stat"], present["rg_lim"]) if "rg_stat" in present
              else None)
    return SeedDeltaPayload(name, int(n_in), int(n_out), coo, block, present.get("d_row_scale"), base, dense_rows,
                            regime)


def _perm(p: np.ndarray | None) -> torch.Tensor | None:
    """A validated permutation (parse_payload refused anything else) as int64 gather indices."""
    return None if p is None else torch.from_numpy(np.ascontiguousarray(p.astype(np.int64)))


class _BaseOp:
    """W0 as a batched operator: (T, n_in) -> (T, n_out), in the given float dtype."""

    def __init__(self, base: BasePayload, n_in: int, n_out: int, dtype: torch.dtype) -> None:
        self.n_in, self.n_out = n_in, n_out
        self.B, self.L = base.B, base.L
        self.tall = n_out >= n_in

        def diag(a: np.ndarray | None) -> torch.Tensor | None:
            return None if a is None else torch.from_numpy(a.astype(np.float64)).to(dtype).contiguous()

        self.d1 = diag(base.d1)
        self.d2 = diag(base.d2)
        self.d3 = diag(base.d3)
        self.p1 = _perm(base.perm1)
        self.p2 = _perm(base.perm2)
        self.depth2 = self.d2 is not None or self.p2 is not None

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.d1, self.d2, self.d3, self.p1, self.p2) if t is not None)

    @staticmethod
    def _gather(v: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
        # v (T, B, L), perm (B, L): out[t, b, i] = v[t, b, perm[b, i]]
        return torch.gather(v, 2, perm.unsqueeze(0).expand(v.shape[0], -1, -1))

    def chain(self, v: torch.Tensor) -> torch.Tensor:
        """F_b applied to v (T, B, L) block-wise."""
        assert self.d1 is not None
        v = v * self.d1
        if self.p1 is not None:
            v = self._gather(v, self.p1)
        v = fwht_torch(v)
        if self.depth2:
            if self.d2 is not None:
                v = v * self.d2
            if self.p2 is not None:
                v = self._gather(v, self.p2)
            v = fwht_torch(v)
        if self.d3 is not None:
            v = v * self.d3
        return v

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[0]
        B, L = self.B, self.L
        if self.tall:
            xh = torch.zeros((t, L), dtype=x.dtype)
            xh[:, : self.n_in] = x
            v = self.chain(xh.unsqueeze(1).expand(t, B, L))
            return v.reshape(t, B * L)[:, : self.n_out]
        xp = torch.zeros((t, B * L), dtype=x.dtype)
        xp[:, : self.n_in] = x
        v = self.chain(xp.view(t, B, L))
        # block order summation in the tensor's dtype, as the runtime (§9.3)
        acc = v[:, 0, :].clone()
        for b in range(1, B):
            acc += v[:, b, :]
        return acc[:, : self.n_out]


class DenseProjection:
    """y = x · Wᵀ, W (n_out, n_in) held float32, float16 or bfloat16; computed in float32 (`linear`)."""

    kind = "dense"

    def __init__(self, weight: torch.Tensor, name: str = "") -> None:
        self.weight = weight.contiguous()
        self.name = name
        self.n_out, self.n_in = (int(s) for s in self.weight.shape)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight)

    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()


def materialize(payload: SeedDeltaPayload | SdqPayload, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Ŵ (n_out, n_in): the float64 reconstruction rounded once to `dtype` (float32 or float16), a block
    of rows at a time so the float64 working set stays bounded. `seeddelta materialize` writes these values."""
    if dtype not in (torch.float32, torch.float16):
        raise SeedDeltaError(f"materialized Ŵ must be float32 or float16, not {dtype}")
    np_dtype = np.float32 if dtype == torch.float32 else np.float16
    out = np.empty((payload.n_out, payload.n_in), dtype=np_dtype)
    step = max(256, ((32 << 20) // (8 * max(1, payload.n_out))) // 256 * 256)  # columns per block: ~32 MiB of float64
    for c in range(0, payload.n_in, step):
        out[:, c: c + step] = payload.dense(c, min(payload.n_in, c + step))
    return torch.from_numpy(out)


class MaterializedSeedDeltaProjection(DenseProjection):
    """SeedΔ reconstructed once into a dense Ŵ (float64 reconstruction, rounded once to float32 or
    float16 — see `runtime.model.materialized_dtype`); the forward is `linear` (float32 compute)."""

    kind = "seeddelta"
    mode = "materialized"

    def __init__(self, payload: SeedDeltaPayload | SdqPayload, dtype: torch.dtype = torch.float32) -> None:
        super().__init__(materialize(payload, dtype), payload.name)
        self.payload_scheme = payload.scheme
        self.has_base = payload.base is not None
        self.nonfinite = 0
        self.gate: RegimeGate | None = None
        self.base_weight: torch.Tensor | None = None  # delta_regime/1: s ⊙ W0 (dense rows kept) for the other tokens
        if isinstance(payload, SeedDeltaPayload) and payload.regime is not None:
            self.gate = payload.gate()
            self.base_weight = materialize(replace(payload, coo=None, block=None, regime=None), dtype)

    def nbytes(self) -> int:
        extra = 0 if self.base_weight is None else self.base_weight.numel() * self.base_weight.element_size()
        return super().nbytes() + extra

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate is None or self.base_weight is None:
            return linear(x, self.weight)
        shape = x.shape
        x2 = x.reshape(-1, self.n_in)
        m = self.gate.mask(x2)
        if bool(m.all()):  # the plain SeedΔ product, bit for bit
            y = linear(x2, self.weight)
        elif not bool(m.any()):
            y = linear(x2, self.base_weight)
        else:
            y = torch.empty((x2.shape[0], self.n_out), dtype=torch.float32)
            y[m] = linear(x2[m], self.weight)
            y[~m] = linear(x2[~m], self.base_weight)
        return y.reshape(*shape[:-1], self.n_out)


class SparseSeedDeltaProjection:
    """SeedΔ evaluated without a dense copy: float32 FWHT base + CSR sparse residual (values held as stored)."""

    kind = "seeddelta"
    mode = "sparse"

    def __init__(self, payload: SeedDeltaPayload) -> None:
        self.name = payload.name
        self.n_in, self.n_out = payload.n_in, payload.n_out
        self.payload_scheme = payload.scheme
        self.has_base = payload.base is not None
        idx, val = payload.residual_entries()
        self.n_entries = int(idx.shape[1])
        # CSR, columns sorted within each row; skipped entries were turned into (0, 0.0) by
        # residual_entries(). Column indices are held as compactly as the file stores them (int16 while n_in
        # fits) and values in their stored type (f16: 4 bytes per entry, as on disk), converted exactly to
        # the int32/float32 CSR torch multiplies with, for each product.
        order = np.argsort(idx, axis=1, kind="stable")
        col_type = np.int16 if self.n_in <= np.iinfo(np.int16).max + 1 else np.int32
        cols = np.take_along_axis(idx, order, axis=1).astype(col_type).reshape(-1)
        pair = payload.block if payload.block is not None else payload.coo
        stored_val = pair[1].dtype if pair is not None else np.dtype(np.float32)
        vals = np.take_along_axis(val, order, axis=1).astype(stored_val).reshape(-1)  # exact: val came from it
        crow = np.arange(0, self.n_out * self.n_entries + 1, max(1, self.n_entries), dtype=np.int32)
        if self.n_entries == 0:
            crow = np.zeros(self.n_out + 1, dtype=np.int32)
        self.crow = torch.from_numpy(crow)
        self.cols = torch.from_numpy(np.ascontiguousarray(cols))
        self.vals = torch.from_numpy(np.ascontiguousarray(vals))
        self.scale = None if payload.row_scale is None else torch.from_numpy(payload.row_scale.astype(np.float32))
        self.base = None if payload.base is None else _BaseOp(payload.base, self.n_in, self.n_out, torch.float32)
        # extension dense_rows/1: these output rows come from the stored original rows (held as stored)
        self.dr_idx = self.dr_val = None
        if payload.dense_rows is not None:
            self.dr_idx = torch.from_numpy(payload.dense_rows[0].astype(np.int64))
            self.dr_val = torch.from_numpy(np.array(payload.dense_rows[1], copy=True, order="C"))
        self.gate = payload.gate()  # extension delta_regime/1
        self.nonfinite = 0

    def nbytes(self) -> int:
        n = sum(t.numel() * t.element_size() for t in (self.crow, self.cols, self.vals))
        if self.scale is not None:
            n += self.scale.numel() * self.scale.element_size()
        if self.base is not None:
            n += self.base.nbytes()
        if self.dr_idx is not None and self.dr_val is not None:
            n += self.dr_idx.numel() * self.dr_idx.element_size() + self.dr_val.numel() * self.dr_val.element_size()
        return n

    def _residual(self, x: torch.Tensor) -> torch.Tensor:
        if self.n_entries == 0:
            return torch.zeros((x.shape[0], self.n_out), dtype=torch.float32)
        with warnings.catch_warnings():  # torch labels sparse CSR "beta"; it is the fast CPU sparse×dense path
            warnings.simplefilter("ignore", UserWarning)
            csr = torch.sparse_csr_tensor(self.crow, self.cols.to(torch.int32), self.vals.to(torch.float32),
                                          (self.n_out, self.n_in))
        return torch.sparse.mm(csr, x.t()).t()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.n_in).to(torch.float32)
        m = None if self.gate is None else self.gate.mask(x2)
        if m is None or bool(m.all()):
            y = self._residual(x2)
        else:  # Δ only for the tokens inside the regime: the others' residual is never computed
            y = torch.zeros((x2.shape[0], self.n_out), dtype=torch.float32)
            if bool(m.any()):
                y[m] = self._residual(x2[m])
        if self.base is not None:
            y = self.base(x2) + y
        if self.scale is not None:
            y = y * self.scale
        if self.dr_idx is not None and self.dr_val is not None:
            y[:, self.dr_idx] = x2 @ self.dr_val.to(torch.float32).t()
        if not bool(torch.isfinite(y).all()):
            bad = ~torch.isfinite(y)
            self.nonfinite += int(bad.sum())
            y = torch.where(bad, torch.zeros((), dtype=y.dtype), y)
        return y.reshape(*shape[:-1], self.n_out)


def make_projection(payload: SeedDeltaPayload | SdqPayload, mode: str, dtype: torch.dtype = torch.float32
                    ) -> MaterializedSeedDeltaProjection | SparseSeedDeltaProjection | SparseSdqProjection:
    """dtype: the dtype of a materialized Ŵ (the sparse mode keeps float32 values and indices)."""
    if mode == "materialized":
        return MaterializedSeedDeltaProjection(payload, dtype)
    if mode == "sparse":
        if isinstance(payload, SdqPayload):
            return SparseSdqProjection(payload)
        return SparseSeedDeltaProjection(payload)
    raise SeedDeltaError(f"SeedΔ mode {mode!r} unknown (expected one of {', '.join(MODES)})")
