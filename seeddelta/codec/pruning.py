"""Unstructured pruning per output row: what a user picks instead of SeedΔ at equal density.

Two scores, both per output row (Wanda's comparison group, field-anchors §1.1):

* **magnitude** — |W_ij|;
* **wanda** — |W_ij|·‖X_j‖₂, with ‖X_j‖₂ taken from an imatrix: its per-input mean x² is
  ‖X_j‖₂²/n_rows, so `imatrix_scale` (√(mean x²), normalised to mean 1) ranks inputs exactly as
  ‖X_j‖₂ does — a constant factor per matrix changes no row's order.

A row keeps its `keep_count(density, n_in)` highest-scoring entries (ties: the lowest input index,
so the choice is a function of the weight alone). This is deliberately a different algorithm from
the SeedΔ codec's top-K (a full stable sort, not a partition): with no base and no row scale SeedΔ
stores exactly this selection, and a test holds the two against each other.
"""

from __future__ import annotations

import numpy as np

from seeddelta.errors import SeedDeltaError
from seeddelta.gguf_format.imatrix_file import imatrix_scale

METHODS = ("magnitude", "wanda")


def keep_count(density: float, n_in: int) -> int:
    """Entries kept per row: round(density·n_in), at least 1 (a density is a fraction in (0, 1])."""
    if not 0.0 < density <= 1.0 or not np.isfinite(density):
        raise SeedDeltaError(f"pruning density must be in (0, 1], got {density}")
    return max(1, min(n_in, int(round(density * n_in))))


def scores(W: np.ndarray, method: str, mean_x2: np.ndarray | None = None) -> np.ndarray:
    """Per-entry importance (float64, same shape as W)."""
    a = np.abs(np.asarray(W, dtype=np.float64))
    if method == "magnitude":
        return a
    if method == "wanda":
        if mean_x2 is None:
            raise SeedDeltaError("wanda pruning needs activation statistics (an imatrix)")
        x = np.asarray(mean_x2).reshape(-1)
        if x.shape != (a.shape[1],):
            raise SeedDeltaError(f"imatrix has {x.size} inputs but the weight has {a.shape[1]}")
        return a * imatrix_scale(x).astype(np.float64)[None, :]
    raise SeedDeltaError(f"unknown pruning method {method!r} (expected one of {', '.join(METHODS)})")


def keep_indices(W: np.ndarray, density: float, method: str, mean_x2: np.ndarray | None = None) -> np.ndarray:
    """(n_out, k) input indices each row keeps, ascending; k = keep_count(density, n_in)."""
    s = scores(W, method, mean_x2)
    k = keep_count(density, s.shape[1])
    # stable sort of −score: equal scores keep ascending index order, so ties go to the lowest index
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.sort(order, axis=1)


def pruned(W: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """W with every entry outside `kept` set to 0 (float32)."""
    W = np.asarray(W, dtype=np.float32)
    out = np.zeros_like(W)
    np.put_along_axis(out, kept, np.take_along_axis(W, kept, axis=1), axis=1)
    return out
