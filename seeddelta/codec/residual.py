"""Sparse residual selection: top-K entries per row (COO) or top blocks per row (block scheme).

Scores are imatrix-weighted (|r|·s for COO, Σ(r·s)² per block). Ties are broken toward the
lowest input index, so the selection is a deterministic function of the input."""

from __future__ import annotations

import numpy as np


def topk_indices(score: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest scores of each row, in descending score order (ties: lowest index).

    score: (n_rows, n) non-negative, finite. Returns (n_rows, k) int64. Vectorized: one partition
    for the k-th value, then an exact tie fill by index, then a small stable sort of k columns."""
    n_rows, n = score.shape
    if not 1 <= k <= n:
        raise ValueError(f"k={k} outside [1, {n}]")
    if k == n:
        chosen = np.broadcast_to(np.arange(n), (n_rows, n))
    else:
        kth = np.partition(score, n - k, axis=1)[:, n - k : n - k + 1]  # k-th largest per row
        above = score > kth
        tied = score == kth
        need = k - above.sum(axis=1, keepdims=True)
        take_tied = tied & (np.cumsum(tied, axis=1) <= need)  # lowest-index ties first
        rows, cols = np.nonzero(above | take_tied)  # row-major: cols ascending within a row
        chosen = cols.reshape(n_rows, k)
    picked = np.take_along_axis(score, chosen, axis=1)
    order = np.argsort(-picked, axis=1, kind="stable")  # stable: equal scores keep ascending index
    return np.take_along_axis(chosen, order, axis=1).astype(np.int64)


def coo_select(residual: np.ndarray, k: int, scale: np.ndarray | None) -> np.ndarray:
    """Top-k input indices per output row by |r|·s."""
    score = np.abs(residual) if scale is None else np.abs(residual) * scale[None, :]
    return topk_indices(score, k)


def n_blocks_total(n_in: int, block: int) -> int:
    return -(-n_in // block)


def block_energy(residual: np.ndarray, block: int, scale: np.ndarray | None) -> np.ndarray:
    """Σ_{i in block j} (r_i·s_i)² per row and aligned block j; (n_out, ceil(n_in/block))."""
    n_out, n_in = residual.shape
    nb = n_blocks_total(n_in, block)
    weighted = residual if scale is None else residual * scale[None, :]
    padded = np.zeros((n_out, nb * block), dtype=np.float64)
    padded[:, :n_in] = weighted
    return np.square(padded).reshape(n_out, nb, block).sum(axis=2)


def block_select(residual: np.ndarray, n_blocks: int, block: int, scale: np.ndarray | None) -> np.ndarray:
    """Top n_blocks aligned input blocks per output row by weighted energy."""
    return topk_indices(block_energy(residual, block, scale), n_blocks)


def block_values(residual: np.ndarray, block_idx: np.ndarray, block: int) -> np.ndarray:
    """(n_out, nb, block) residual values of the chosen blocks, zero past n_in."""
    n_out, n_in = residual.shape
    padded = np.zeros((n_out, n_blocks_total(n_in, block) * block), dtype=residual.dtype)
    padded[:, :n_in] = residual
    cols = block_idx[:, :, None] * block + np.arange(block)[None, None, :]
    return np.take_along_axis(padded, cols.reshape(n_out, -1), axis=1).reshape(cols.shape)
