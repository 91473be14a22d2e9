"""The runtime's own decoding of the SeedΔ variant `sdq` (residual over a quantized base, extension
version 1; docs/file-format.md), independent of `seeddelta.codec.sdq`:

    y = s ⊙ (W0·x + Δ·x),   W0·x = Q·(R·x)

* Q — `sdq_base`, any ggml type, dequantized by gguf-py (the format library) a block of rows at a time;
* R — `sdq_rot` signs (nb, b): (R·x) per block k = H_b·(sign_k ⊙ x_k)/√b (absent: R = I);
* Δ — COO (`sdq_idx`, `sdq_val`) or compact (`sdq_coff` offsets within 256-column blocks, `sdq_ccnt`
  entries per block, `sdq_cval` int8 values times the row's f16 step `sdq_cscale`);
* s — `sdq_scale` (absent: 1), multiplying the sum.

`SdqPayload.dense` is the float64 reconstruction of any column range (the materialized mode, and what a
dense export writes); `SparseSdqProjection` never holds a dense Ŵ: it keeps the base's stored bytes and
dequantizes ≤ `CHUNK_VALUES` weights at a time inside each product (a transient float32 block; Q4_0,
Q8_0 and MXFP4 unpacked by torch from the bytes, `torch_dequantize`, other types by gguf-py), the
residual as CSR.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

from seeddelta.codec.hadamard import fwht_torch
from seeddelta.gguf_format.writer import RawTensor

CHUNK_VALUES = 1 << 20  # base weights dequantized at once in the sparse mode (4 MiB of float32)
INDEX_BLOCK = 256
_MX_KVALUES = (0.0, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 0.0, -1.0, -2.0, -3.0, -4.0, -6.0, -8.0, -12.0)
# block types the sparse mode unpacks with torch from the stored bytes (ggml-common.h layouts); any
# other type is dequantized by gguf-py, a block of rows at a time
TORCH_TYPES = (GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q8_0, GGMLQuantizationType.MXFP4)


def torch_dequantize(raw: torch.Tensor, qtype: GGMLQuantizationType) -> torch.Tensor:
    """float32 (rows, n_in) of stored bytes (rows, row bytes) uint8 for Q4_0, Q8_0 or MXFP4:

    * Q4_0 block (18 B): f16 d, 16 bytes of nibbles; value j = (low nibble of byte j − 8)·d, value
      j + 16 = (high nibble − 8)·d;
    * Q8_0 block (34 B): f16 d, 32 int8 q; value = q·d;
    * MXFP4 block (17 B): E8M0 byte e, 16 bytes of nibbles indexing the e2m1 values (doubled)
      {0, 1, 2, 3, 4, 6, 8, 12, −0, −1, …, −12}; value = kvalue·2^(e − 128) (ggml's half scale)."""
    rows = raw.shape[0]
    bs, nbytes = GGML_QUANT_SIZES[qtype]
    b = raw.reshape(rows, -1, nbytes)
    if qtype == GGMLQuantizationType.Q8_0:
        d = b[..., :2].contiguous().view(torch.float16).to(torch.float32)
        q = b[..., 2:].contiguous().view(torch.int8).to(torch.float32)
        return (q * d).reshape(rows, -1)
    head = 2 if qtype == GGMLQuantizationType.Q4_0 else 1
    qs = b[..., head:]
    codes = torch.cat([qs & 0x0F, qs >> 4], dim=-1).to(torch.int64)  # (rows, nb, 32): j, then j + 16
    if qtype == GGMLQuantizationType.Q4_0:
        d = b[..., :2].contiguous().view(torch.float16).to(torch.float32)
        return ((codes - 8).to(torch.float32) * d).reshape(rows, -1)
    e = b[..., :1].to(torch.int64)
    # ggml_e8m0_to_fp32_half: e < 2 → 2^(e − 128) as a denormal (0x00200000 << e), else bits (e − 1) << 23
    bits = torch.where(e < 2, torch.tensor(0x00200000, dtype=torch.int64) << e, (e - 1) << 23).to(torch.int32)
    d = bits.view(torch.float32)
    table = torch.tensor(_MX_KVALUES, dtype=torch.float32)
    return (table[codes] * d).reshape(rows, -1)


@dataclass
class SdqBase:
    """The stored base: bytes (or F16/F32 values) in numpy order, its ggml type, the rotation signs."""

    data: np.ndarray
    qtype: GGMLQuantizationType
    signs: np.ndarray | None  # (nb, b) int8

    @property
    def qblock(self) -> int:
        return int(GGML_QUANT_SIZES[self.qtype][0])

    def columns(self, c0: int, c1: int) -> np.ndarray:
        """Q[:, c0:c1] as float32; c0, c1 multiples of the type's block (or n_in)."""
        block, nbytes = GGML_QUANT_SIZES[self.qtype]
        if self.data.dtype != np.uint8:  # F16/F32 stored as values
            return np.asarray(self.data[:, c0:c1], dtype=np.float32)
        raw = self.data[:, c0 // block * nbytes: c1 // block * nbytes]
        return np.asarray(dequantize(np.ascontiguousarray(raw), self.qtype), dtype=np.float32)

    def rows(self, r0: int, r1: int) -> np.ndarray:
        """Q[r0:r1, :] as float32."""
        if self.data.dtype != np.uint8:
            return np.asarray(self.data[r0:r1], dtype=np.float32)
        return np.asarray(dequantize(self.data[r0:r1], self.qtype), dtype=np.float32)


def decode_compact(off: np.ndarray, cnt: np.ndarray, q: np.ndarray, step: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(idx int64, val float32) (n_out, K): entry r of a row lies in the block that `sdq_ccnt`'s counts,
    expanded block by block, assign to it."""
    n_out, k = off.shape
    counts = cnt.view(np.uint8).astype(np.int64)
    nb = counts.shape[1]
    block_of_entry = np.repeat(np.tile(np.arange(nb, dtype=np.int64), n_out), counts.reshape(-1)).reshape(n_out, k)
    idx = block_of_entry * INDEX_BLOCK + off.view(np.uint8).astype(np.int64)
    val = q.astype(np.float32) * step.astype(np.float32).reshape(-1, 1)
    return idx, val


@dataclass
class SdqPayload:
    """Validated `sdq` tensors of one FFN weight, residual decoded to (idx, val) per row."""

    name: str
    n_in: int
    n_out: int
    base: SdqBase
    idx: np.ndarray  # (n_out, K) int64
    val: np.ndarray  # (n_out, K) float32 (exact stored values)
    row_scale: np.ndarray | None
    coding: str  # coo, c8 or none
    stored: int  # bytes of the stored tensors

    scheme = "sdq"

    def stored_nbytes(self) -> int:
        return self.stored

    def residual_entries(self) -> tuple[np.ndarray, np.ndarray]:
        return self.idx, self.val

    def _unrotate(self, q: np.ndarray, a0: int) -> np.ndarray:
        """Q[:, a0:a0+w]·R restricted to whole rotation blocks starting at a0 (float64)."""
        signs = self.base.signs
        if signs is None:
            return q.astype(np.float64)
        nb, b = signs.shape
        k0, k1 = a0 // b, a0 // b + q.shape[1] // b
        v = torch.from_numpy(q.astype(np.float64).reshape(q.shape[0], k1 - k0, b))
        v = fwht_torch(v) * torch.from_numpy(signs[k0:k1].astype(np.float64)) / math.sqrt(b)
        return v.reshape(q.shape).numpy()

    def dense(self, c0: int = 0, c1: int | None = None) -> np.ndarray:
        """Ŵ[:, c0:c1] = diag(s)·(Q·R + Δ) as float64 (n_out, c1 − c0), from the stored values."""
        c1 = self.n_in if c1 is None else c1
        align = self.base.qblock if self.base.signs is None else math.lcm(self.base.qblock, self.base.signs.shape[1])
        a0, a1 = c0 // align * align, min(self.n_in, -(-c1 // align) * align)
        w = self._unrotate(self.base.columns(a0, a1), a0)[:, c0 - a0: c1 - a0].copy()
        rows = np.repeat(np.arange(self.n_out), self.idx.shape[1])
        cols = self.idx.reshape(-1)
        inside = (cols >= c0) & (cols < c1)
        np.add.at(w, (rows[inside], cols[inside] - c0), self.val.reshape(-1)[inside].astype(np.float64))
        if self.row_scale is not None:
            w *= self.row_scale.astype(np.float64)[:, None]
        return w


def parse_sdq_payload(name: str, arrays: dict[str, np.ndarray | RawTensor], n_in: int, n_out: int) -> SdqPayload:
    """The `sdq` tensors of one weight (validated by `check_seeddelta_arrays` beforehand) as a payload."""
    raw = arrays["sdq_base"]
    if isinstance(raw, RawTensor):
        base = SdqBase(raw.data, raw.tensor_type, None)
    else:
        base = SdqBase(raw, GGMLQuantizationType.F16 if raw.dtype == np.float16 else GGMLQuantizationType.F32, None)
    rot = arrays.get("sdq_rot")
    if rot is not None:
        assert not isinstance(rot, RawTensor)
        base.signs = rot.astype(np.int8)
    plain = {k: v for k, v in arrays.items() if not isinstance(v, RawTensor)}
    if "sdq_coff" in plain:
        idx, val = decode_compact(plain["sdq_coff"], plain["sdq_ccnt"], plain["sdq_cval"], plain["sdq_cscale"])
        coding = "c8"
    elif "sdq_idx" in plain:
        idx, val = plain["sdq_idx"].astype(np.int64), plain["sdq_val"].astype(np.float32)
        coding = "coo"
    else:
        idx, val = np.zeros((n_out, 0), np.int64), np.zeros((n_out, 0), np.float32)
        coding = "none"
    scale = plain.get("sdq_scale")
    stored = sum(int(v.data.nbytes if isinstance(v, RawTensor) else v.nbytes) for v in arrays.values())
    return SdqPayload(name, int(n_in), int(n_out), base, idx, val, None if scale is None else scale.reshape(-1),
                      coding, stored)


def rotate(x: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """R·x for x (T, n_in) float32: per block H_b·(sign ⊙ x)/√b."""
    nb, b = signs.shape
    return (fwht_torch(x.reshape(x.shape[0], nb, b) * signs) / math.sqrt(b)).reshape(x.shape)


class SparseSdqProjection:
    """`sdq` without a dense copy: the base kept in its stored form and dequantized a block of rows at
    a time inside the product, the residual as a CSR sparse × dense product, float32 throughout."""

    kind = "seeddelta"
    mode = "sparse"
    payload_scheme = "sdq"
    has_base = True

    def __init__(self, payload: SdqPayload) -> None:
        self.name = payload.name
        self.n_in, self.n_out = payload.n_in, payload.n_out
        self.base = payload.base
        self.raw = (torch.from_numpy(np.ascontiguousarray(payload.base.data))
                    if payload.base.qtype in TORCH_TYPES and payload.base.data.dtype == np.uint8 else None)
        self.signs = None if payload.base.signs is None else torch.from_numpy(payload.base.signs.astype(np.float32))
        self.rows_per_chunk = max(1, CHUNK_VALUES // max(1, self.n_in))
        idx, val = payload.residual_entries()
        self.n_entries = int(idx.shape[1])
        order = np.argsort(idx, axis=1, kind="stable")
        cols = np.take_along_axis(idx, order, axis=1).astype(np.int32).reshape(-1)
        vals = np.take_along_axis(val, order, axis=1).astype(np.float32).reshape(-1)
        crow = np.arange(0, self.n_out * self.n_entries + 1, max(1, self.n_entries), dtype=np.int32)
        if self.n_entries == 0:
            crow = np.zeros(self.n_out + 1, dtype=np.int32)
        with warnings.catch_warnings():  # torch labels sparse CSR "beta"; it is the fast CPU sparse×dense path
            warnings.simplefilter("ignore", UserWarning)
            self.csr = torch.sparse_csr_tensor(torch.from_numpy(crow), torch.from_numpy(np.ascontiguousarray(cols)),
                                               torch.from_numpy(np.ascontiguousarray(vals)), (self.n_out, self.n_in))
        self.scale = None if payload.row_scale is None else torch.from_numpy(payload.row_scale.astype(np.float32))
        self.nonfinite = 0

    def nbytes(self) -> int:
        c = self.csr
        n = int(self.base.data.nbytes) + sum(t.numel() * t.element_size()
                                             for t in (c.crow_indices(), c.col_indices(), c.values()))
        for t in (self.scale, self.signs):
            if t is not None:
                n += t.numel() * t.element_size()
        return n

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.n_in).to(torch.float32)
        xr = x2 if self.signs is None else rotate(x2, self.signs)
        y = torch.empty((x2.shape[0], self.n_out), dtype=torch.float32)
        for r0 in range(0, self.n_out, self.rows_per_chunk):
            r1 = min(self.n_out, r0 + self.rows_per_chunk)
            if self.raw is not None:
                block = torch_dequantize(self.raw[r0:r1], self.base.qtype)
            else:
                block = torch.from_numpy(self.base.rows(r0, r1))
            y[:, r0:r1] = torch.nn.functional.linear(xr, block)
        if self.n_entries:
            y += torch.sparse.mm(self.csr, x2.t()).t()
        if self.scale is not None:
            y = y * self.scale
        if not bool(torch.isfinite(y).all()):
            bad = ~torch.isfinite(y)
            self.nonfinite += int(bad.sum())
            y = torch.where(bad, torch.zeros((), dtype=y.dtype), y)
        return y.reshape(*shape[:-1], self.n_out)
