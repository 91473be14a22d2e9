"""A quantized base W0 (the SeedΔ variant `sdq`, "residual over a quantized base"; SpQR's regime).

W0 is the weight itself stored in a ggml block-quantization type (Q4_0, Q8_0, MXFP4, …), so that the
sparse residual Δ only has to carry the quantization error's largest (imatrix-weighted) entries.
Optionally the rows are rotated before quantizing (QuaRot/HIGGS style): with a random-sign,
block-wise Walsh–Hadamard matrix R (orthogonal; blocks of `b` inputs, b the largest power of two
dividing n_in),

    R = blockdiag_k( H_b · diag(sign_k) / √b ),    Q ≈ quantize(W·Rᵀ),    W0 = Q·R,

and W0·x is computed as Q·(R·x): R·x is one FWHT per block of the input. Everything here reads the
*stored* base (the quantized bytes dequantized by gguf-py, exactly what the runtime sees).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize, quantize

from seeddelta.codec.hadamard import fwht, fwht_torch
from seeddelta.errors import SeedDeltaError

if TYPE_CHECKING:  # torch is imported where it is used: the plain builder never loads it
    import torch

# Types our encoder quantizes (gguf-py's quantizers; bits per weight in the comment). K-quants and
# i-quants have no quantizer in gguf-py: such a base can only be taken from another GGUF
# (`QuantBase.from_stored`, the builder's --quant-base-from).
ENCODABLE_TYPES: tuple[str, ...] = ("Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0", "MXFP4", "F16")  # 8.5 6 5.5 5 4.5 4.25 16
MAX_ROTATION_BLOCK = 1 << 15


def qtype_of(name: str) -> GGMLQuantizationType:
    try:
        return GGMLQuantizationType[name.upper()]
    except KeyError:
        raise SeedDeltaError(f"unknown ggml type {name!r}") from None


def block_size(qtype: GGMLQuantizationType) -> int:
    return int(GGML_QUANT_SIZES[qtype][0])


def row_bytes(qtype: GGMLQuantizationType, n_in: int) -> int:
    block, nbytes = GGML_QUANT_SIZES[qtype]
    return n_in // block * nbytes


def check_base_type(name: str, n_in: int) -> GGMLQuantizationType:
    """The ggml type our encoder can quantize a base to, for rows of n_in values (one clear line otherwise)."""
    if name.upper() not in ENCODABLE_TYPES:
        raise SeedDeltaError(f"quantized base type {name!r} cannot be encoded here (gguf-py quantizes "
                             f"{', '.join(ENCODABLE_TYPES)}; K-/i-quants: take the base from a llama-quantize "
                             "output with --quant-base-from)")
    qtype = qtype_of(name)
    if n_in % block_size(qtype):
        raise SeedDeltaError(f"quantized base {qtype.name} needs rows of a multiple of {block_size(qtype)} values, "
                             f"got n_in = {n_in}")
    return qtype


def rotation_block(n_in: int) -> int:
    """Largest power of two dividing n_in (the block of the random-sign Hadamard rotation)."""
    return min(n_in & -n_in, MAX_ROTATION_BLOCK)


def rotation_signs(n_in: int, seed: int) -> np.ndarray:
    """(n_in / b, b) int8 random signs ±1 of the rotation."""
    b = rotation_block(n_in)
    rng = np.random.default_rng(seed)
    return np.where(rng.random((n_in // b, b)) < 0.5, -1, 1).astype(np.int8)


def rotate_rows(W: np.ndarray, signs: np.ndarray) -> np.ndarray:
    """W·Rᵀ (float64): per block k, fwht(W[:, k]·sign_k)/√b (the rows in the rotated input space)."""
    nb, b = signs.shape
    v = np.asarray(W, dtype=np.float64).reshape(-1, nb, b) * signs.astype(np.float64)[None]
    return (fwht(v) / np.sqrt(b)).reshape(W.shape)


def unrotate_rows(Q: np.ndarray, signs: np.ndarray) -> np.ndarray:
    """Q·R (float64): per block k, fwht(Q[:, k])·sign_k/√b (H is symmetric)."""
    nb, b = signs.shape
    v = fwht(np.asarray(Q, dtype=np.float64).reshape(-1, nb, b)) * signs.astype(np.float64)[None]
    return (v / np.sqrt(b)).reshape(Q.shape)


def rotate_input(x: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """R·x for x (T, n_in) in x's dtype: per block fwht(sign·x)/√b."""
    nb, b = signs.shape
    v = x.reshape(x.shape[0], nb, b) * signs.to(x.dtype)
    return (fwht_torch(v) * (1.0 / float(np.sqrt(b)))).reshape(x.shape)


@dataclass
class QuantBase:
    """W0 stored as one ggml-typed tensor (`data`: what GGUFReader hands out for it — uint8 block bytes
    (n_out, row_bytes) for quantized types, float16/float32 values otherwise), plus the optional
    rotation signs."""

    n_in: int
    n_out: int
    qtype: GGMLQuantizationType
    data: np.ndarray
    signs: np.ndarray | None = None  # (n_in / b, b) int8 ±1
    kind: str = "quant"

    @cached_property
    def values(self) -> np.ndarray:
        """The stored base dequantized (float32, (n_out, n_in); rotated input space when rotated)."""
        return np.asarray(dequantize(self.data, self.qtype), dtype=np.float32).reshape(self.n_out, self.n_in)

    def dense_rows(self, rows: np.ndarray) -> np.ndarray:
        """W0[rows, :] in float64 (= Q·R with the rotation)."""
        q = self.values[np.asarray(rows, dtype=np.int64)].astype(np.float64)
        return q if self.signs is None else unrotate_rows(q, self.signs)

    def apply(self, x: np.ndarray) -> np.ndarray:
        """W0·x in float32 for x (T, n_in): Q·(R·x)."""
        import torch

        xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        if self.signs is not None:
            xt = rotate_input(xt, torch.from_numpy(self.signs))
        return torch.nn.functional.linear(xt, torch.from_numpy(self.values)).numpy()

    def tensors(self) -> dict[str, np.ndarray]:
        out = {"sdq_base": self.data}
        if self.signs is not None:
            out["sdq_rot"] = self.signs
        return out

    def nbytes(self) -> int:
        return int(self.data.nbytes) + (int(self.signs.nbytes) if self.signs is not None else 0)

    def ops(self) -> int:
        """Per-token operations: the dequantized matmul, plus one FWHT per rotation block."""
        ops = 2 * self.n_in * self.n_out
        if self.signs is not None:
            nb, b = self.signs.shape
            ops += nb * b * (int(np.log2(b)) + 1)
        return ops


def quantize_base(W: np.ndarray, qtype: GGMLQuantizationType, signs: np.ndarray | None = None) -> QuantBase:
    """W (n_out, n_in) quantized by gguf-py's quantizer to `qtype` (after the rotation, if `signs`)."""
    W = np.asarray(W)
    n_out, n_in = W.shape
    target = W if signs is None else rotate_rows(W, signs)
    data = quantize(np.ascontiguousarray(target, dtype=np.float32), qtype)
    return QuantBase(n_in, n_out, qtype, np.ascontiguousarray(data), signs)


def base_from_stored(data: np.ndarray, qtype: GGMLQuantizationType, n_in: int, n_out: int,
                     signs: np.ndarray | None = None) -> QuantBase:
    """A base whose bytes come from a file (ours, or a weight another tool quantized)."""
    return QuantBase(n_in, n_out, qtype, np.ascontiguousarray(data), signs)
