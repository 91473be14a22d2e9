"""Unnormalised fast Walsh–Hadamard transform in natural (Sylvester) order, and next_pow2.

`fwht(v)` equals `H @ v` with H[i, j] = (-1)^popcount(i & j) along the last axis, using exactly
the butterfly order of the runtime (len = 1, 2, 4, …), so float32 input gives the runtime's
float32 result element for element.
"""

from __future__ import annotations

import numpy as np
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


def fwht_torch(v: torch.Tensor) -> torch.Tensor:
    """Torch version of `fwht` (same butterfly order), along the last dimension."""
    length = v.shape[-1]
    if not is_pow2(length):
        raise ValueError(f"fwht needs a power-of-two length, got {length}")
    lead = v.shape[:-1]
    out = v
    h = 1
    while h < length:
        out = out.reshape(*lead, length // (2 * h), 2, h)
        a = out[..., 0, :]
        b = out[..., 1, :]
        out = torch.stack((a + b, a - b), dim=-2)
        h *= 2
    return out.reshape(*lead, length)


def hadamard_matrix(length: int) -> np.ndarray:
    """Dense H (float64) by the Sylvester recursion; for tests and small oracles only."""
    if not is_pow2(length):
        raise ValueError(f"hadamard_matrix needs a power of two, got {length}")
    h = np.ones((1, 1))
    while h.shape[0] < length:
        h = np.block([[h, h], [h, -h]])
    return h
