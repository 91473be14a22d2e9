"""Compact coding of a per-row top-K residual: 2 bytes per kept entry instead of 4.

A row's K entries, sorted by input index, are stored as

* ``sdq_coff`` — the index within its 256-column block (one byte: 0 … 255),
* ``sdq_ccnt`` — per row, how many entries fall in each 256-column block (one byte per block,
  ⌈n_in/256⌉ blocks; the entries of block 0 come first, then block 1, …),
* ``sdq_cval`` — the value as a signed 8-bit integer q (−127 … 127),
* ``sdq_cscale`` — per row, the f16 step v of the values: entry value = q·v (exact in float32).

So index = 256·(block of the entry) + offset, the block of entry r being the first block whose
running count exceeds r. Bytes per row: 2K + ⌈n_in/256⌉ + 2 (COO: 4K). The information floor of
the index set at 1 % density is ~8 bits per entry (field-anchors §4.2), which one offset byte meets.
ggml has no unsigned 8-bit tensor type: offsets and counts are bytes stored in I8 tensors
(two's complement; readers reinterpret them as unsigned).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from seeddelta.errors import SeedDeltaError

BLOCK = 256
QMAX = 127


def n_index_blocks(n_in: int) -> int:
    return -(-n_in // BLOCK)


@dataclass
class CompactResidual:
    offsets: np.ndarray  # (n_out, K) int8 holding bytes 0 … 255
    counts: np.ndarray  # (n_out, ⌈n_in/256⌉) int8 holding bytes 0 … 255
    q: np.ndarray  # (n_out, K) int8, −127 … 127
    step: np.ndarray  # (n_out,) float16

    def tensors(self) -> dict[str, np.ndarray]:
        return {"sdq_coff": self.offsets, "sdq_ccnt": self.counts, "sdq_cval": self.q, "sdq_cscale": self.step}

    def nbytes(self) -> int:
        return int(sum(a.nbytes for a in self.tensors().values()))


def sort_by_index(idx: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(idx, axis=1, kind="stable")
    return np.take_along_axis(idx, order, axis=1), np.take_along_axis(values, order, axis=1)


def quantize_values(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(q int8, step f16) per row: step = f16(max|v|/127), q = round(v/step) clipped to ±127; a zero row
    gets step 0. Decoded values q·step are exact products in float32."""
    v = np.asarray(values, dtype=np.float64)
    peak = np.max(np.abs(v), axis=1) if v.shape[1] else np.zeros(v.shape[0])
    step = (peak / QMAX).astype(np.float16)
    s = step.astype(np.float64)
    q = np.where(s[:, None] > 0, np.rint(v / np.where(s > 0, s, 1.0)[:, None]), 0.0)
    return np.clip(q, -QMAX, QMAX).astype(np.int8), step


def pack(idx: np.ndarray, values: np.ndarray, n_in: int) -> CompactResidual:
    """Compact form of a residual given as (idx, values) (n_out, K) in any order; one SeedDeltaError
    when a 256-column block of a row would hold more than 255 entries."""
    idx = np.asarray(idx, dtype=np.int64)
    n_out, k = idx.shape
    idx, values = sort_by_index(idx, np.asarray(values, dtype=np.float64))
    nb = n_index_blocks(n_in)
    blocks = idx // BLOCK
    counts = np.zeros((n_out, nb), dtype=np.int64)
    np.add.at(counts, (np.repeat(np.arange(n_out), k), blocks.reshape(-1)), 1)
    if counts.size and counts.max() > 255:
        r, b = np.argwhere(counts > 255)[0]
        raise SeedDeltaError(f"compact coding: row {r} keeps {counts[r, b]} entries in columns {b * BLOCK}…"
                             f"{b * BLOCK + BLOCK - 1}; at most 255 per 256-column block (lower K or use COO)")
    q, step = quantize_values(values)
    return CompactResidual((idx % BLOCK).astype(np.uint8).view(np.int8), counts.astype(np.uint8).view(np.int8), q, step)


def unpack(c: CompactResidual) -> tuple[np.ndarray, np.ndarray]:
    """(idx int64, values float32) (n_out, K) of a compact residual, entries in ascending index order."""
    offsets = c.offsets.view(np.uint8).astype(np.int64)
    counts = c.counts.view(np.uint8).astype(np.int64)
    n_out, k = offsets.shape
    ends = np.cumsum(counts, axis=1)  # (n_out, nb)
    r = np.arange(k)
    block = (ends[:, None, :] <= r[None, :, None]).sum(axis=2)  # first block whose running count exceeds r
    values = c.q.astype(np.float32) * c.step.astype(np.float32)[:, None]
    return block * BLOCK + offsets, values
