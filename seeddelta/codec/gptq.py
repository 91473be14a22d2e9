"""Error-feedback (GPTQ/OBS) quantization of a weight into a ggml block type, on calibration XᵀX.

Round-to-nearest quantizes every weight alone. GPTQ (Frantar et al., 2022; the OBS update of
Hassibi & Stork) quantizes the input columns one at a time and spreads each column's rounding
error over the columns not yet quantized, along the inverse Hessian H⁻¹ of the layer's output
error (H = E[x xᵀ] + damping), so that ‖(W − Q)·Xᵀ‖² — not ‖W − Q‖² — is what is kept small.
Block parameters (a Q4_0 block's scale, an MXFP4 block's exponent) are chosen by the type's own
round-to-nearest rule from the block's values when the first column of the block is reached
(i.e. after the updates of the earlier columns), then every column of the block is rounded on
that grid. Columns are processed in their natural order (no act-order), so blocks stay the type's
contiguous 32-column blocks.

The result is packed into the type's exact byte layout (ggml-common.h's block structs), so the
stored base is an ordinary ggml tensor: `gguf.quants.dequantize` of the bytes gives exactly the
values the algorithm chose (tests check this per type).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from gguf.constants import GGMLQuantizationType

from seeddelta.errors import SeedDeltaError

if TYPE_CHECKING:  # torch is imported where it is used: the plain builder never loads it
    import torch

BLOCK = 32
DAMP = 0.01  # relative to mean(diag H): GPTQ's default damping
LAZY = 128  # columns whose updates are applied within the block before the rest of W is updated
_MX_KVALUES = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], dtype=np.float64)


def _f16(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float64).astype(np.float16).astype(np.float64)


@dataclass(frozen=True)
class Grid:
    """A block type's value grid: block parameters from a block's values, the nearest grid point of a
    column given them, and the byte packing of a whole row of blocks."""

    qtype: GGMLQuantizationType

    def params(self, block: np.ndarray) -> np.ndarray:
        """Per row, the block's parameter (its stored form as float64): Q4_0 d = f16(signed max / −8),
        Q8_0 d = f16(max|x| / 127), MXFP4 the E8M0 exponent byte."""
        if self.qtype == GGMLQuantizationType.Q4_0:
            i = np.argmax(np.abs(block), axis=1)
            return _f16(block[np.arange(block.shape[0]), i] / -8.0)
        if self.qtype == GGMLQuantizationType.Q8_0:
            return _f16(np.max(np.abs(block), axis=1) / 127.0)
        amax = np.max(np.abs(block), axis=1)
        with np.errstate(divide="ignore"):
            e = np.where(amax > 0, np.floor(np.log2(np.where(amax > 0, amax, 1.0))) - 2 + 127, 0)
        return np.clip(e, 0, 255)

    def codes(self, column: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(codes, values) of one column (n_out,) on the grid of parameters p (n_out,)."""
        if self.qtype == GGMLQuantizationType.Q4_0:
            inv = np.where(p != 0, 1.0 / np.where(p != 0, p, 1.0), 0.0)
            q = np.clip(np.floor(column * inv + 8.5), 0, 15)
            return q, (q - 8) * p
        if self.qtype == GGMLQuantizationType.Q8_0:
            inv = np.where(p != 0, 1.0 / np.where(p != 0, p, 1.0), 0.0)
            q = np.clip(np.rint(column * inv), -127, 127)
            return q, q * p
        d = mx_scale(p)
        err = np.abs(d[:, None] * _MX_KVALUES[None, :] - column[:, None])
        q = np.argmin(err, axis=1)  # first of equal errors, as gguf-py's argmin
        return q.astype(np.float64), d * _MX_KVALUES[q]

    def pack(self, codes: np.ndarray, params: np.ndarray) -> np.ndarray:
        """Bytes (n_out, n_blocks·block bytes) of codes (n_out, n_in) and params (n_out, n_blocks)."""
        n_out, n_in = codes.shape
        nb = n_in // BLOCK
        c = codes.reshape(n_out, nb, BLOCK)
        if self.qtype == GGMLQuantizationType.Q8_0:
            d = params.astype(np.float16).view(np.uint8).reshape(n_out, nb, 2)
            qs = c.astype(np.int8).view(np.uint8)
            return np.concatenate([d, qs], axis=2).reshape(n_out, -1)
        nib = c.astype(np.uint8)
        qs = nib[:, :, : BLOCK // 2] | (nib[:, :, BLOCK // 2:] << np.uint8(4))
        if self.qtype == GGMLQuantizationType.Q4_0:
            head = params.astype(np.float16).view(np.uint8).reshape(n_out, nb, 2)
        else:
            head = params.astype(np.uint8).reshape(n_out, nb, 1)
        return np.concatenate([head, qs], axis=2).reshape(n_out, -1)


def mx_scale(e: np.ndarray) -> np.ndarray:
    """MXFP4's half scale of an E8M0 byte (ggml_e8m0_to_fp32_half): 2^(e−128), with e < 2 handled as ggml does."""
    e = np.asarray(e).astype(np.uint32)
    bits = np.where(e < 2, np.uint32(0x00200000) << e, (e - 1) << np.uint32(23)).astype(np.uint32)
    return bits.view(np.float32).astype(np.float64)


GPTQ_TYPES = ("Q8_0", "Q4_0", "MXFP4")


def grid_for(name: str) -> Grid:
    name = name.upper()
    if name not in GPTQ_TYPES:
        raise SeedDeltaError(f"error-feedback (gptq) quantization supports {', '.join(GPTQ_TYPES)}, not {name}")
    return Grid(GGMLQuantizationType[name])


def inverse_hessian_factor(C: np.ndarray, damp: float = DAMP) -> tuple[torch.Tensor, np.ndarray]:
    """(U, dead): the upper Cholesky factor of (C + damp·mean(diag C)·I)⁻¹, with never-active inputs
    (diag 0) given unit curvature, and their mask."""
    import torch

    H = torch.from_numpy(np.array(C, dtype=np.float64, copy=True))
    dead = (torch.diagonal(H) <= 0).numpy()
    idx = torch.from_numpy(np.flatnonzero(dead))
    H[idx, idx] = 1.0
    mean = float(torch.diagonal(H).mean())
    H += damp * mean * torch.eye(H.shape[0], dtype=torch.float64)
    L = torch.linalg.cholesky(H)
    Hinv = torch.cholesky_inverse(L)
    return torch.linalg.cholesky(Hinv, upper=True), dead


def gptq_quantize(W: np.ndarray, C: np.ndarray, grid: Grid, damp: float = DAMP) -> tuple[np.ndarray, np.ndarray]:
    """(bytes (n_out, row bytes) of `grid`'s type, dequantized values float64 (n_out, n_in)) of W by GPTQ
    with second moment C (n_in, n_in)."""
    W = np.asarray(W, dtype=np.float64)
    n_out, n_in = W.shape
    if n_in % BLOCK:
        raise SeedDeltaError(f"{grid.qtype.name} needs rows of a multiple of {BLOCK} values, got n_in = {n_in}")
    import torch

    U, dead = inverse_hessian_factor(C, damp)
    Wt = torch.from_numpy(W.copy())
    codes = np.zeros((n_out, n_in))
    values = np.zeros((n_out, n_in))
    params = np.zeros((n_out, n_in // BLOCK))
    for i1 in range(0, n_in, LAZY):
        i2 = min(n_in, i1 + LAZY)
        W1 = Wt[:, i1:i2].clone()
        err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        p = np.zeros(n_out)
        for i in range(i2 - i1):
            col = i1 + i
            if col % BLOCK == 0:
                p = grid.params(W1[:, i: i + BLOCK].numpy())
                params[:, col // BLOCK] = p
            w = W1[:, i].numpy()
            q, v = grid.codes(w, p)
            codes[:, col], values[:, col] = q, v
            e = torch.from_numpy((w - v) / float(U1[i, i]))
            W1[:, i:] -= e[:, None] * U1[i, i:][None, :]
            err1[:, i] = e
        Wt[:, i2:] -= err1 @ U[i1:i2, i2:]
    return grid.pack(codes, params), values
