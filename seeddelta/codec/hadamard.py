"""Unnormalised fast Walsh–Hadamard transform in natural (Sylvester) order, and next_pow2.

`fwht(v)` equals `H @ v` with H[i, j] = (-1)^popcount(i & j) along the last axis, using exactly
the butterfly order of the original runtime (len = 1, 2, 4, …): the numpy reference. `fwht_torch`
computes the same transform as two small dense products (fast), within a stated rounding bound;
`fwht_sequential` is the same two products in numpy, every output summed term by term in index
order — the arithmetic of torch's CPU matrix product here (tests assert them bit for bit), so the
builder gets torch's float32 figures without importing torch.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def is_pow2(n: int) -> bool:
    return n >= 1 and (n & (n - 1)) == 0


def fwht(v: np.ndarray) -> np.ndarray:
    """Transform along the last axis (length must be a power of two); dtype is preserved."""
    length = v.shape[-1]
    if not is_pow2(length):
        raise ValueError(f"fwht needs a power-of-two length, got {length}")
    lead = v.shape[:-1]
    out = np.array(v, copy=True)
    h = 1
    while h < length:
        out = out.reshape(*lead, length // (2 * h), 2, h)
        a = out[..., 0, :]
        b = out[..., 1, :]
        out = np.stack((a + b, a - b), axis=-2)
        h *= 2
    return out.reshape(*lead, length)


def kron_split(length: int) -> tuple[int, int]:
    """(a, b) with a·b = length, both powers of two, a ≤ b as equal as possible: H_length = H_a ⊗ H_b."""
    a = 1 << ((length.bit_length() - 1) // 2)
    return a, length // a


def fwht_torch_levels(length: int) -> int:
    """Additions along one output of `fwht_torch` at most (a − 1 then b − 1): the factor n of the
    rounding bound n·u·Σ|v| (the butterfly of `fwht` has log2 length)."""
    a, b = kron_split(length)
    return a + b - 2


@functools.lru_cache(maxsize=64)
def _hadamard_torch(length: int, dtype: torch.dtype) -> torch.Tensor:
    import torch

    return torch.from_numpy(hadamard_matrix(length)).to(dtype)


@functools.lru_cache(maxsize=64)
def _hadamard_np(length: int, dtype: np.dtype) -> np.ndarray:
    out = hadamard_matrix(length).astype(dtype)
    out.flags.writeable = False
    return out


def _first_product(grid: np.ndarray, h_a: np.ndarray) -> np.ndarray:
    """acc[i] = Σ_k H_a[i, k]·grid[…, k, :] term by term in k order, for grid (n, a, b) and h_a (r, a):
    returned laid out (r, n, b). The k-th slice of every batch is made one contiguous row first, so
    each step is one long multiply-add (the values and their order are those of the plain loop)."""
    n, a, b = grid.shape
    rows = np.ascontiguousarray(grid.transpose(1, 0, 2)).reshape(a, n * b)  # [k, (n, j)]
    acc = np.zeros((h_a.shape[0], n * b), dtype=grid.dtype)
    for k in range(a):  # out[i, :] += H_a[i, k]·V[k, :]
        acc += h_a[:, k, None] * rows[k]
    return acc.reshape(h_a.shape[0], n, b)


def fwht_sequential(v: np.ndarray) -> np.ndarray:
    """`fwht_torch`'s transform in numpy, in v's float dtype: v viewed as (…, a, b) maps to H_a·V·H_b,
    and each output of either product is accumulated term by term in index order (0 + h₀v₀, + h₁v₁, …).
    With ±1 factors every term is exact, so the result is fixed by that order alone: it equals a
    CPU matrix product that accumulates along k in order (torch's, bit for bit — tested), and it is
    `fwht`'s within the same fwht_torch_levels(L)·u·Σ|v| bound. a·b passes over v: for the small
    batches of the builder's metrics, not for a forward pass."""
    length = v.shape[-1]
    if not is_pow2(length):
        raise ValueError(f"fwht needs a power-of-two length, got {length}")
    if length == 1:
        return np.array(v, copy=True)
    a, b = kron_split(length)
    n = int(np.prod(v.shape[:-1], dtype=np.int64))
    grid = v.reshape(n, a, b)
    # first product, laid out (i, n, k); the second reads it as contiguous rows [k, (n, i)]
    first = _first_product(grid, _hadamard_np(a, v.dtype)) if a > 1 else grid.transpose(1, 0, 2)
    rows = np.ascontiguousarray(first.transpose(2, 1, 0)).reshape(b, n * a)
    h_b = _hadamard_np(b, v.dtype)
    out = np.zeros((b, n * a), dtype=v.dtype)
    for k in range(b):  # out[:, j] += V[:, k]·H_b[k, j], every j at once as rows
        out += rows[k] * h_b[k][:, None]
    return np.ascontiguousarray(out.reshape(b, n, a).transpose(1, 2, 0)).reshape(v.shape)


def fwht_sequential_at(v: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """`fwht_sequential(v)[..., positions]`, bit for bit, computing only those outputs: the rows of
    the first product that they read, then their own sums of the second, each in the same order
    from the same zero (the builder's metrics need a few sampled outputs of a weight's base)."""
    length = v.shape[-1]
    if not is_pow2(length):
        raise ValueError(f"fwht needs a power-of-two length, got {length}")
    positions = np.asarray(positions, dtype=np.intp)
    if length == 1:
        return np.array(v[..., positions], copy=True)
    a, b = kron_split(length)
    lead = v.shape[:-1]
    n = int(np.prod(lead, dtype=np.int64))
    grid = v.reshape(n, a, b)
    row_of, col_of = positions // b, positions % b
    if a > 1:
        rows, row_of = np.unique(row_of, return_inverse=True)
        first = _first_product(grid, _hadamard_np(a, v.dtype)[rows])  # (R, n, b): the rows i read below
    else:
        first = grid.transpose(1, 0, 2)
    # picked[k, (n, p)] = V[n, i_p, k]: position p's k-th term of every batch, one contiguous row per k
    picked = np.ascontiguousarray(first[row_of].transpose(2, 1, 0)).reshape(b, n * positions.size)
    coef = np.tile(_hadamard_np(b, v.dtype)[:, col_of], (1, n))  # [k, (n, p)] = H_b[k, j_p]
    out = np.zeros(n * positions.size, dtype=v.dtype)
    for k in range(b):  # out[p] += V[i_p, k]·H_b[k, j_p]
        out += picked[k] * coef[k]
    return out.reshape(*lead, positions.size)


def fwht_torch(v: torch.Tensor) -> torch.Tensor:
    """H·v along the last dimension, as two small dense products: with H_L = H_a ⊗ H_b (Sylvester
    order), v viewed as (…, a, b) maps to H_a·V·H_b. Matrix products run at BLAS speed where the
    log2 L butterfly passes are memory-bound (4-5× faster at 512 × 4096); ±1 entries make each
    output a sum of a then b terms, so the result is `fwht`'s within fwht_torch_levels(L)·u·Σ|v|."""
    import torch

    length = v.shape[-1]
    if not is_pow2(length):
        raise ValueError(f"fwht needs a power-of-two length, got {length}")
    if length == 1:
        return v.clone()
    a, b = kron_split(length)
    grid = v.reshape(*v.shape[:-1], a, b)
    if a > 1:
        grid = torch.matmul(_hadamard_torch(a, v.dtype), grid)
    return torch.matmul(grid, _hadamard_torch(b, v.dtype)).reshape(v.shape)


def hadamard_matrix(length: int) -> np.ndarray:
    """Dense H (float64) by the Sylvester recursion; for tests and small oracles only."""
    if not is_pow2(length):
        raise ValueError(f"hadamard_matrix needs a power of two, got {length}")
    h = np.ones((1, 1))
    while h.shape[0] < length:
        h = np.block([[h, h], [h, -h]])
    return h
