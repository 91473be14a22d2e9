"""Partial strip (the v1 plan's H3b): SeedΔ for the output rows it fits well, the original dense row
for the others.

    ŷ_o = s_o·(W0·x + Δ·x)_o    for o ∉ R
    ŷ_o = W_o·x                 for o ∈ R     (R: the rows kept dense)

R is the ⌈f·n_out⌉ rows whose stored SeedΔ reconstruction errs most, measured as the relative
row error ‖w_o − ŵ_o‖ / ‖w_o‖ weighted by the imatrix (the input channels' activation scale) when
one is given — the rows where SeedΔ is least accurate for the inputs that actually arrive. Ties
go to the lower row index. The kept rows are stored as `dr_idx` (I32, ascending) and `dr_val`
(F16, the original row rounded once), an opt-in extension of the file schema
(`gguf_format.extensions`: "dense_rows/1"). The SeedΔ tensors keep all n_out rows (the schema's
fixed K per row), so the overridden rows' residual entries are still stored: R·K·4 bytes that buy
nothing, which is why f should stay small.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from seeddelta.errors import SeedDeltaError

EXTENSION = "dense_rows/1"
SUFFIXES = ("dr_idx", "dr_val")
_ROWS_AT_ONCE = 1024  # rows reconstructed at once when ranking (bounds the float64 working set)


@dataclass(frozen=True)
class DenseRows:
    """Output rows computed densely: `rows` ascending int32 (R,), `values` float16 (R, n_in)."""

    rows: np.ndarray
    values: np.ndarray

    def tensors(self) -> dict[str, np.ndarray]:
        return {"dr_idx": self.rows, "dr_val": self.values}

    @property
    def nbytes(self) -> int:
        return int(self.rows.nbytes + self.values.nbytes)


def dense_row_count(fraction: float, n_out: int) -> int:
    """⌈f·n_out⌉ rows for 0 < f ≤ 1 (0 for f = 0)."""
    if not (0.0 <= fraction <= 1.0) or math.isnan(fraction):
        raise SeedDeltaError(f"dense-row fraction must be in [0, 1], got {fraction}")
    return min(n_out, math.ceil(fraction * n_out - 1e-12)) if fraction > 0 else 0


def row_errors(W: np.ndarray, w_hat_rows: np.ndarray, rows: np.ndarray, scale: np.ndarray | None) -> np.ndarray:
    """Relative (imatrix-weighted) error of each given row: ‖(w − ŵ)·σ‖ / ‖w·σ‖; an all-zero row that is
    reconstructed exactly has error 0, one that is not has error ∞ (it can only be kept dense)."""
    w = W[rows].astype(np.float64)
    sigma = np.ones(W.shape[1]) if scale is None else np.asarray(scale, dtype=np.float64)
    num = np.sqrt((((w - w_hat_rows) * sigma) ** 2).sum(axis=1))
    den = np.sqrt(((w * sigma) ** 2).sum(axis=1))
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.where(num > 0, np.inf, 0.0))


def choose_dense_rows(W: np.ndarray, reconstruct: object, fraction: float, scale: np.ndarray | None = None
                      ) -> DenseRows | None:
    """The ⌈f·n_out⌉ rows with the largest row error (ties: lower index first), with their original values
    as f16. `reconstruct(rows) -> ŵ rows (float64)` is the SeedΔ weight's stored reconstruction."""
    n_out = W.shape[0]
    count = dense_row_count(fraction, n_out)
    if count == 0:
        return None
    err = np.empty(n_out)
    for r0 in range(0, n_out, _ROWS_AT_ONCE):
        rows = np.arange(r0, min(n_out, r0 + _ROWS_AT_ONCE))
        err[rows] = row_errors(W, reconstruct(rows), rows, scale)  # type: ignore[operator]
    order = np.lexsort((np.arange(n_out), -err))  # largest error first, lower index on ties
    rows = np.sort(order[:count]).astype(np.int32)
    return DenseRows(rows, W[rows].astype(np.float16))


def check_dense_rows(name: str, rows: np.ndarray, values: np.ndarray, n_in: int, n_out: int) -> None:
    """`dr_idx` int32 1-D strictly ascending in 0 … n_out−1; `dr_val` f16/f32 (R, n_in), finite."""
    if rows.dtype != np.int32 or rows.ndim != 1:
        raise SeedDeltaError(f"SeedΔ tensor {name}.dr_idx: expected a 1-D int32 array, got {rows.dtype} {rows.shape}")
    if values.dtype not in (np.dtype(np.float16), np.dtype(np.float32)) or values.shape != (rows.shape[0], n_in):
        raise SeedDeltaError(f"SeedΔ tensor {name}.dr_val: expected f16/f32 of shape ({rows.shape[0]}, {n_in}), got "
                             f"{values.dtype} {values.shape}")
    r = rows.astype(np.int64)
    if r.size and (r[0] < 0 or r[-1] >= n_out or np.any(np.diff(r) <= 0)):
        raise SeedDeltaError(f"SeedΔ tensor {name}.dr_idx: rows must be strictly ascending in 0 … {n_out - 1}")
    if not np.isfinite(values).all():
        raise SeedDeltaError(f"SeedΔ tensor {name}.dr_val: NaN/Inf value(s)")
