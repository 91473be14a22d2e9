"""Block decoders for the common llama.cpp types (Q4_0, Q4_1, Q8_0) written straight into the
output, the same float32 bits as `gguf.quants` (the same operations in the same order: the scale
and minimum widened from f16, d·q, then + m), with fewer temporaries: gguf's decoder makes ~6
passes over new arrays per block range; here the nibbles are split into one small uint8 buffer and
the products and sums are written in place (Q4_1 of a 576 × 1536 weight: ~2x faster, measured)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from gguf.constants import GGMLQuantizationType


def _scale(blocks: np.ndarray, start: int) -> np.ndarray:
    return blocks[:, start : start + 2].view(np.float16).astype(np.float32)  # (n, 1)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(n, 16) bytes -> (n, 32) uint8: the 16 low nibbles, then the 16 high ones (ggml's order)."""
    out = np.empty((qs.shape[0], 2, qs.shape[1]), dtype=np.uint8)
    np.bitwise_and(qs, np.uint8(0x0F), out=out[:, 0])
    np.right_shift(qs, np.uint8(4), out=out[:, 1])
    return out.reshape(qs.shape[0], -1)


def _q4_0(blocks: np.ndarray, out: np.ndarray) -> None:
    q = _nibbles(blocks[:, 2:]).view(np.int8)
    np.subtract(q, np.int8(8), out=q)
    np.multiply(_scale(blocks, 0), q, out=out)


def _q4_1(blocks: np.ndarray, out: np.ndarray) -> None:
    np.multiply(_scale(blocks, 0), _nibbles(blocks[:, 4:]), out=out)
    np.add(out, _scale(blocks, 2), out=out)


def _q8_0(blocks: np.ndarray, out: np.ndarray) -> None:
    np.multiply(blocks[:, 2:].view(np.int8), _scale(blocks, 0), out=out)


DECODERS: dict[GGMLQuantizationType, Callable[[np.ndarray, np.ndarray], None]] = {
    GGMLQuantizationType.Q4_0: _q4_0,
    GGMLQuantizationType.Q4_1: _q4_1,
    GGMLQuantizationType.Q8_0: _q8_0,
}
