"""SeedΔ codec: W (n_out × n_in) → stored arrays (base, sparse residual, row scale) and back.

    ŷ = s ⊙ (W0·x + Δ·x)

`encode` returns a `SeedDeltaWeight` whose arrays are exactly what is written to GGUF (f16 values,
f16 row scale, f16 base diagonals, i16/i32 indices). `dense()` and `apply()` read only those stored
arrays, so every metric computed from them describes what the runtime will see. Unlike the
original, the residual is taken against the *stored* base (h2 = H·fp16(d2)) and the row scale is
fitted to the stored reconstruction, so builder and runtime agree (spec-builder-runtime §12 item 9).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from seeddelta.codec.base import (
    Base,
    Geometry,
    XorCirculantBase,
    fit_circulant,
    fit_lowrank,
    fit_xor_circulant,
    xor_base_from_tensors,
)
from seeddelta.codec.partial import DenseRows
from seeddelta.codec.residual import block_select, block_values, coo_select, n_blocks_total, take_rows
from seeddelta.codec.storage import index_type_for, store_indices, store_values
from seeddelta.errors import SeedDeltaError

SCHEMES = ("coo", "block")
BASE_KINDS = ("none", "xor_circulant", "lowrank", "circulant")
GGUF_BASE_KINDS = ("none", "xor_circulant")
_SMALL_GATHER = 1 << 24  # T·n_out·K up to which Δ·x is a plain gather (fast for one or a few tokens)
_CHUNK_ELEMENTS = 1 << 18  # rows encoded at once hold at most this many values (2 MB per float64 temporary,
# whatever n_in is: the chunk's passes stay in a core's L2 cache instead of streaming the whole weight
# through memory each time: SmolLM2's encode ~15 % faster than with 8M-value chunks, measured); every row
# is encoded on its own, so the chunking changes no result


@dataclass(frozen=True)
class EncodeConfig:
    K: int = 32
    scheme: str = "coo"
    block: int = 32
    idx_type: str = "i16"
    val_type: str = "f16"
    row_scale: bool = False
    base: str = "none"
    base_max_samples: int = 2048
    base_perm_trials: int = 1
    base_rank: int = 8  # lowrank base only
    base_store: str = "f16"  # storage type of base arrays; the runtime accepts F16 and F32 diagonals
    delta_norm_clamp: float = 0.0  # τ: scale Δ so that ‖Δ‖_F <= τ·‖W‖_F; 0 = off
    seed: int = 1234

    def validate(self) -> None:
        if self.K <= 0:
            raise SeedDeltaError(f"K must be a positive integer, got {self.K}")
        if self.scheme not in SCHEMES:
            raise SeedDeltaError(f"unknown scheme {self.scheme!r} (expected coo or block)")
        if self.scheme == "block" and not 1 <= self.block <= 4096:
            raise SeedDeltaError(f"block size must be in 1..4096, got {self.block}")
        if self.base not in BASE_KINDS:
            raise SeedDeltaError(f"unknown base kind {self.base!r} (expected one of {', '.join(BASE_KINDS)})")
        if self.base == "lowrank" and self.base_rank <= 0:
            raise SeedDeltaError(f"base rank must be positive, got {self.base_rank}")
        if self.delta_norm_clamp < 0 or not np.isfinite(self.delta_norm_clamp):
            raise SeedDeltaError(f"delta norm clamp must be a finite number >= 0, got {self.delta_norm_clamp}")


@dataclass
class SeedDeltaWeight:
    n_in: int
    n_out: int
    scheme: str
    block: int
    idx: np.ndarray  # coo: (n_out, K); block: (n_out, nb)
    val: np.ndarray  # coo: (n_out, K); block: (n_out, nb, block)
    row_scale: np.ndarray | None = None  # (n_out,) float16
    base: Base | None = None
    k_budget: int = 0
    warnings: list[str] = field(default_factory=list)
    dense_rows: DenseRows | None = None  # partial strip (codec.partial): these rows are the original's

    @property
    def K(self) -> int:  # noqa: N802 - the spec's name
        return int(self.idx.shape[1]) if self.scheme == "coo" else int(self.idx.shape[1] * self.block)

    @property
    def n_blocks(self) -> int:
        return int(self.idx.shape[1]) if self.scheme == "block" else -(-self.K // max(1, self.block))

    def tensors(self) -> dict[str, np.ndarray]:
        """Tensor-name suffix → stored array (numpy order, stored dtype), in GGUF write order."""
        out = {"d_idx": self.idx, "d_val": self.val} if self.scheme == "coo" else {"b_idx": self.idx, "b_val": self.val}
        if self.row_scale is not None:
            out["d_row_scale"] = self.row_scale
        if self.base is not None:
            out.update(self.base.tensors())
        if self.dense_rows is not None:
            out.update(self.dense_rows.tensors())
        return out

    def nbytes(self) -> int:
        return int(sum(a.nbytes for a in self.tensors().values()))

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, np.ndarray], n_in: int, n_out: int) -> SeedDeltaWeight:
        """Rebuild from stored arrays (ours or the original's). Block wins if both are present, as at runtime."""
        t = dict(tensors)
        if "b_idx" in t and "b_val" in t:
            val = np.asarray(t["b_val"])
            idx = np.asarray(t["b_idx"]).reshape(n_out, -1)
            val = val.reshape(n_out, idx.shape[1], -1)
            scheme, block = "block", int(val.shape[2])
        elif "d_idx" in t and "d_val" in t:
            idx = np.asarray(t["d_idx"]).reshape(n_out, -1)
            val = np.asarray(t["d_val"]).reshape(n_out, -1)
            scheme, block = "coo", 32
        else:
            raise SeedDeltaError("no SeedΔ residual tensors (d_idx/d_val or b_idx/b_val)")
        scale = t.get("d_row_scale")
        base = xor_base_from_tensors(t, n_in, n_out) if "base_d1" in t else None
        dense_rows = DenseRows(np.asarray(t["dr_idx"]), np.asarray(t["dr_val"])) if "dr_idx" in t else None
        return cls(n_in, n_out, scheme, block, idx, val, None if scale is None else np.asarray(scale).reshape(-1), base,
                   dense_rows=dense_rows)

    # --- reconstruction -------------------------------------------------------------------
    def _residual_coords(self, rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(rows, cols, values as float64) of every stored residual entry that the runtime uses, in
        row-major order; with `rows` (ascending, distinct), the entries of those output rows only."""
        idx, val = (self.idx, self.val) if rows is None else (self.idx[rows], self.val[rows])
        row_ids = np.arange(self.n_out) if rows is None else rows
        if self.scheme == "coo":
            out_rows = np.broadcast_to(row_ids[:, None], idx.shape)
            cols = idx.astype(np.int64)
        else:
            starts = idx.astype(np.int64)[:, :, None] * self.block
            cols = np.where(starts >= 0, starts + np.arange(self.block)[None, None, :], -1)
            out_rows = np.broadcast_to(row_ids[:, None, None], cols.shape)
        vals = val.astype(np.float64)
        keep = (cols >= 0) & (cols < self.n_in)
        return out_rows[keep], cols[keep], vals[keep]

    def dense(self, rows: np.ndarray | None = None) -> np.ndarray:
        """s·(W0 + Δ) for the given output rows (all by default), float64, from the stored arrays."""
        rows = np.arange(self.n_out) if rows is None else np.asarray(rows, dtype=np.int64)
        out = np.zeros((len(rows), self.n_in)) if self.base is None else self.base.dense_rows(rows)
        position = np.full(self.n_out, -1, dtype=np.int64)
        position[rows] = np.arange(len(rows))
        # only the entries of the requested rows, in the same (row-major) order as over all rows
        r, c, v = self._residual_coords(np.nonzero(position >= 0)[0])
        np.add.at(out, (position[r], c), v)
        if self.row_scale is not None:
            out *= self.row_scale.astype(np.float64)[rows][:, None]
        if self.dense_rows is not None:
            hit = position[self.dense_rows.rows.astype(np.int64)]
            out[hit[hit >= 0]] = self.dense_rows.values[hit >= 0].astype(np.float64)
        return out

    def _table_of(self, idx: np.ndarray, val: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(cols, vals) of the rows of `idx`, `val`, (rows, M); entries the runtime skips become column 0, value 0."""
        n = idx.shape[0]
        if self.scheme == "coo":
            cols, vals = idx.astype(np.int64), val.astype(np.float32)
        else:
            starts = idx.astype(np.int64)[:, :, None] * self.block
            cols = np.where(starts >= 0, starts + np.arange(self.block), -1).reshape(n, -1)
            vals = val.astype(np.float32).reshape(n, -1)
        valid = (cols >= 0) & (cols < self.n_in)
        return np.where(valid, cols, 0), np.where(valid, vals, np.float32(0))

    @cached_property
    def _residual_table(self) -> tuple[np.ndarray, np.ndarray]:
        """(cols, vals) per output row, (n_out, M)."""
        return self._table_of(self.idx, self.val)

    def _residual_apply(self, x2: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
        """Δ·x for x2 (T, n_in): a direct gather for few tokens, else one embedding_bag call whose
        "embedding table" is xᵀ (n_in × T), i.e. every token at once with weights = stored values.
        With `rows`, only those outputs, each computed exactly as over all rows (same kernel choice,
        same per-output sum)."""
        n_entries = self.n_out * (self.idx.shape[1] if self.scheme == "coo" else self.idx.shape[1] * self.block)
        small = x2.shape[0] * n_entries <= _SMALL_GATHER
        if rows is None:
            cols, vals = self._residual_table
        elif "_residual_table" in self.__dict__:
            cols, vals = (a[rows] for a in self._residual_table)
        else:  # those rows' entries only (the builder's metrics sample a few rows once): the same values
            cols, vals = self._table_of(self.idx[rows], self.val[rows])
        if small:
            return np.einsum("tok,ok->to", x2[:, cols], vals)
        import torch  # only here: the builder's metrics (few tokens) never need it
        import torch.nn.functional as F

        table = torch.from_numpy(np.ascontiguousarray(x2.T))
        out = F.embedding_bag(torch.from_numpy(np.ascontiguousarray(cols)), table,
                              per_sample_weights=torch.from_numpy(np.ascontiguousarray(vals)), mode="sum")
        return out.numpy().T

    def apply_rows(self, x: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """`apply(x)[:, rows]` for x (T, n_in), bit for bit and in the same memory layout (numpy's
        fancy index makes that column-major, and float64 sums over it are summed in that order),
        computing the residual of those rows only (the builder's functional metrics sample a few)."""
        x2 = np.asarray(x, dtype=np.float32).reshape(-1, self.n_in)
        rows = np.asarray(rows, dtype=np.int64)
        y = self._residual_apply(x2, rows)
        if self.base is not None:
            # the XOR base computes those outputs only (the same bits); other bases all of them
            part = self.base.apply_rows(x2, rows) if isinstance(self.base, XorCirculantBase) else \
                self.base.apply(x2)[:, rows]
            y = part + y
        if self.row_scale is not None:
            y = y * self.row_scale.astype(np.float32)[rows][None, :]
        return np.asfortranarray(y, dtype=np.float32)

    def apply(self, x: np.ndarray) -> np.ndarray:
        """Runtime arithmetic in float32: x (..., n_in) → (..., n_out)."""
        x = np.asarray(x, dtype=np.float32)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.n_in)
        y = self._residual_apply(x2)
        if self.base is not None:
            y = self.base.apply(x2) + y
        if self.row_scale is not None:
            y = y * self.row_scale.astype(np.float32)[None, :]
        if self.dense_rows is not None:
            y[:, self.dense_rows.rows] = x2 @ self.dense_rows.values.astype(np.float32).T
        return np.ascontiguousarray(y, dtype=np.float32).reshape(*lead, self.n_out)


def _check_finite(W: np.ndarray) -> None:
    if not np.all(np.isfinite(W)):
        r, c = np.argwhere(~np.isfinite(W))[0]
        raise SeedDeltaError(f"weight has a non-finite value ({W[r, c]}) at row {r}, column {c}")


def _fit_base(W: np.ndarray, config: EncodeConfig, scale: np.ndarray | None, rng: np.random.Generator) -> Base | None:
    if config.base == "xor_circulant":
        return fit_xor_circulant(
            W, scale=scale, max_samples=config.base_max_samples, perm_trials=config.base_perm_trials,
            rng=rng, store=config.base_store,
        )
    if config.base == "lowrank":
        return fit_lowrank(W, rank=config.base_rank, scale=scale, store=config.base_store)
    if config.base == "circulant":
        return fit_circulant(W, scale=scale, store=config.base_store)
    return None


def _chunks(n: int, n_in: int) -> list[np.ndarray]:
    step = max(1, _CHUNK_ELEMENTS // max(1, n_in))
    return [np.arange(a, min(n, a + step)) for a in range(0, n, step)]


def encode(W: np.ndarray, config: EncodeConfig, imatrix_scale: np.ndarray | None = None) -> SeedDeltaWeight:
    """Fit base, pick the residual, fit the row scale; return the stored representation."""
    config.validate()
    W = np.asarray(W, dtype=np.float32)
    if W.ndim != 2 or min(W.shape) < 1:
        raise SeedDeltaError(f"weight must be a non-empty 2-D matrix, got shape {W.shape}")
    _check_finite(W)
    n_out, n_in = W.shape
    scale = None
    if imatrix_scale is not None:
        scale = np.asarray(imatrix_scale, dtype=np.float64).reshape(-1)
        if scale.shape != (n_in,) or not np.all(np.isfinite(scale)) or np.any(scale < 0):
            raise SeedDeltaError(f"imatrix scale must be {n_in} finite non-negative values, got shape {scale.shape}")
    idx_name, warning = index_type_for(n_in, config.idx_type)
    warnings = [warning] if warning else []
    rng = np.random.default_rng(config.seed)
    base = _fit_base(W, config, scale, rng)

    k_budget = min(max(1, config.K), n_in)
    if config.scheme == "coo":
        width = k_budget
    else:
        width = min(-(-k_budget // config.block), n_blocks_total(n_in, config.block))
    idx = np.zeros((n_out, width), dtype=np.int64)
    val = np.zeros((n_out, width) if config.scheme == "coo" else (n_out, width, config.block))
    for rows in _chunks(n_out, n_in):
        part = slice(int(rows[0]), int(rows[-1]) + 1)  # a chunk is a range of rows: views, not copies
        w = W[part]
        # W − W0 in float64 (float32 → float64 is exact), written over the W0 temporary
        if base is None:
            resid = w.astype(np.float64)
        else:
            w0 = base.dense_rows(rows)
            resid = np.subtract(w, w0, out=w0 if w0.dtype == np.float64 and w0.flags.writeable else None,
                                dtype=np.float64)
        if config.scheme == "coo":
            idx[part] = coo_select(resid, width, scale)
            val[part] = take_rows(resid, idx[part])
        else:
            idx[part] = block_select(resid, width, config.block, scale)
            val[part] = block_values(resid, idx[part], config.block)

    if config.delta_norm_clamp > 0:
        w_norm = float(np.sqrt(np.sum(W.astype(np.float64) ** 2)))
        d_norm = float(np.sqrt(np.sum(val**2)))
        limit = config.delta_norm_clamp * w_norm
        if w_norm > 0 and d_norm > limit:
            val *= limit / d_norm
            warnings.append(f"delta norm clamp: ||Δ||={d_norm:.6g} > {config.delta_norm_clamp:g}·||W||={limit:.6g}; scaled")

    sdw = SeedDeltaWeight(
        n_in, n_out, config.scheme, config.block, store_indices(idx, idx_name),
        store_values(val, config.val_type), None, base, k_budget, warnings,
    )
    if config.row_scale:
        sdw.row_scale = _fit_row_scale(W, sdw, scale)
    return sdw


def _fit_row_scale(W: np.ndarray, sdw: SeedDeltaWeight, scale: np.ndarray | None) -> np.ndarray:
    """Weighted least squares s_o = <w, ŵ>_ω / ‖ŵ‖²_ω against the stored ŵ (ω = s²), stored as f16."""
    omega = np.ones(sdw.n_in) if scale is None else scale**2
    out = np.ones(sdw.n_out)
    for rows in _chunks(sdw.n_out, sdw.n_in):
        w_hat = sdw.dense(rows)
        num = (W[rows].astype(np.float64) * w_hat) @ omega
        den = (w_hat * w_hat) @ omega
        out[rows] = np.where(den > 1e-30, num / np.where(den > 1e-30, den, 1.0), 1.0)
    return out.astype(np.float16)


def is_gguf_compatible(sdw: SeedDeltaWeight) -> bool:
    """True when the weight uses only what the GGUF schema (and the original runtime) knows."""
    return sdw.base is None or isinstance(sdw.base, XorCirculantBase)


__all__ = ["EncodeConfig", "SeedDeltaWeight", "encode", "Geometry", "is_gguf_compatible", "GGUF_BASE_KINDS"]
