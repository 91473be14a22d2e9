"""How the runtime holds weights: as stored where torch can (F32, F16, BF16), quantized types as F16,
one copy each; and the matmul that computes in float32 from a 16-bit weight.

* **Held dtype** (`held_dtype`): F32 → float32, F16 → float16, BF16 → bfloat16 (the stored bits,
  exactly); every quantized type (Q4_0, Q4_1, Q8_0, K-quants, …) is dequantized by gguf-py and
  rounded once to float16. That rounding errs by at most u16 = 2⁻¹¹ relative per weight (values below
  f16's normal range: 2⁻²⁵ absolute): 16× finer than one step of Q8_0's own grid (1/127 of a
  block's range) and finer than llama.cpp's re-quantization of activations to 8 bits for quantized
  dot products. A 7B model held this way needs ~14 GB instead of ~28 GB in float32.
* **One copy**: each tensor is copied out of the file's memory map (row chunks for quantized
  types, so no float32 copy of a whole tensor ever exists) and the map's pages are given back
  (`madvise(MADV_DONTNEED)`: a read-only shared mapping re-reads them from the page cache if ever
  touched again), so resident memory holds the weights once, not the file pages as well.
* **Compute in float32** (`linear`): a 16-bit weight is converted to float32 a block of rows at a
  time (≤ `UPCAST_BYTES` of float32 at once) and multiplied with torch's float32 kernel; each
  output element is exactly the float32 product of the float32 input with the exactly converted
  weight, so the arithmetic is that of a float32 model holding the same values.
"""

from __future__ import annotations

import mmap
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from gguf.constants import GGMLQuantizationType
from gguf.gguf_reader import ReaderTensor
from gguf.quants import dequantize

from seeddelta.errors import SeedDeltaError

UPCAST_BYTES = 2 << 20  # float32 bytes of weight converted at once by `linear` (bounds the transient)
DEQUANT_BYTES = 16 << 20  # float32 bytes dequantized at once while loading a quantized tensor
HOLD_MODES = ("stored", "float32")

_PLAIN = {
    GGMLQuantizationType.F32: torch.float32,
    GGMLQuantizationType.F16: torch.float16,
    GGMLQuantizationType.BF16: torch.bfloat16,
}


@dataclass(frozen=True, slots=True)
class TensorRef:
    """One tensor of an opened file: what loading it needs, as a plain view of the memory map.

    Holding these instead of the reader's own tensor objects lets the reader (and its ~50 MB of
    per-field objects for a large vocabulary, pinned by any of them that survives) be freed."""

    name: str
    tensor_type: int
    shape: tuple[int, ...]  # ggml order (ne0 first)
    data_offset: int
    n_bytes: int
    data: np.ndarray

    @classmethod
    def of(cls, t: ReaderTensor) -> TensorRef:
        return cls(str(t.name), int(t.tensor_type), tuple(int(d) for d in t.shape), int(t.data_offset),
                   int(t.n_bytes), t.data.view(np.ndarray))


def held_dtype(qtype: GGMLQuantizationType, hold: str = "stored") -> torch.dtype:
    """The torch dtype a tensor of this GGUF type is held in (see the module docstring)."""
    if hold == "float32":
        return torch.float32
    return _PLAIN.get(qtype, torch.float16)


def _release(reader_data: Any, tensor: TensorRef | ReaderTensor) -> None:
    """Give the memory map's pages of `tensor` back (they stay in the page cache, not in this process)."""
    mm = getattr(reader_data, "_mmap", None)  # numpy.memmap keeps its mmap.mmap here
    if mm is None or not hasattr(mm, "madvise"):
        return
    page = mmap.PAGESIZE
    start = (int(tensor.data_offset) // page) * page
    end = int(tensor.data_offset) + int(tensor.n_bytes)
    try:
        mm.madvise(mmap.MADV_DONTNEED, start, min(end, len(mm)) - start)
    except (OSError, ValueError):
        pass  # purely an optimisation


def hold_tensor(tensor: TensorRef | ReaderTensor, path: str, *, hold: str = "stored",
                reader_data: Any = None) -> torch.Tensor:
    """A tensor of the file as a private torch tensor in numpy order (reversed ggml shape), held in
    `held_dtype` (F32/F16/BF16 bit for bit; quantized types dequantized and rounded to float16)."""
    qtype = GGMLQuantizationType(tensor.tensor_type)
    shape = tuple(int(d) for d in reversed([int(x) for x in tensor.shape]))
    dtype = held_dtype(qtype, hold)
    raw = tensor.data
    if qtype in _PLAIN and dtype == _PLAIN[qtype]:
        if qtype == GGMLQuantizationType.BF16:  # gguf hands BF16 out as bytes; the bits are reinterpreted
            out = torch.from_numpy(np.array(raw, copy=True).view(np.uint16).reshape(shape)).view(torch.bfloat16)
        else:
            out = torch.from_numpy(np.array(raw, copy=True).reshape(shape))
    else:
        out = torch.empty(shape, dtype=dtype)
        flat = out.view(-1, shape[-1]) if len(shape) > 1 else out.view(1, -1)
        rows_raw = raw.reshape(flat.shape[0], -1)  # one row of the tensor per row of its stored bytes
        step = max(1, DEQUANT_BYTES // (4 * flat.shape[1]))
        try:
            for a in range(0, flat.shape[0], step):
                block = dequantize(np.asarray(rows_raw[a: a + step]), qtype)
                flat[a: a + step] = torch.from_numpy(np.ascontiguousarray(block, dtype=np.float32)
                                                     .reshape(-1, flat.shape[1])).to(dtype)
        except NotImplementedError:
            raise SeedDeltaError(f"{path}: tensor {tensor.name} has type {qtype.name}, which gguf cannot dequantize") from None
    if reader_data is not None:
        _release(reader_data, tensor)
    return out


_scratch = threading.local()


def _upcast(w: torch.Tensor) -> torch.Tensor:
    """w converted to float32 in this thread's reusable scratch buffer (no allocation per call)."""
    n = w.numel()
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.numel() < n:
        # a normal tensor even when first needed under inference_mode: one made there could not be
        # written again outside it (a projection called directly after a forward pass)
        with torch.inference_mode(False):
            buf = torch.empty(max(n, UPCAST_BYTES // 4), dtype=torch.float32)
        _scratch.buf = buf
    return buf[:n].view(w.shape).copy_(w)


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (…, n_in) float32 · wᵀ with w (n_out, n_in) of any float dtype, computed in float32.

    A 16-bit w is converted UPCAST_BYTES of float32 at a time into a reused buffer; with several
    blocks the product is formed as (n_out, T) row blocks and handed back transposed (a view)."""
    if w.dtype == torch.float32:
        return torch.nn.functional.linear(x, w)
    n_out, n_in = w.shape
    step = max(1, UPCAST_BYTES // (4 * n_in))
    if step >= n_out:
        return torch.nn.functional.linear(x, _upcast(w))
    x2 = x.reshape(-1, n_in)
    out_t = torch.empty((n_out, x2.shape[0]), dtype=torch.float32)
    xt = x2.t()
    for a in range(0, n_out, step):
        torch.mm(_upcast(w[a: a + step]), xt, out=out_t[a: a + step])
    return out_t.t().reshape(*x.shape[:-1], n_out)
