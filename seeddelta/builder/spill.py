"""Where encoded tensors wait between their decision and the write: an anonymous temporary file.

The output's tensor table comes before any tensor data, and it can only be written once every
weight is decided (gating and the stack cost decide which tensors exist). Kept in memory, the
SeedΔ tensors of a 7B model at K 128 are ~0.5 GB, growing with the model; parked here, memory
holds the tensors of the weights being encoded and nothing else. The file is created next to the
output (same disk) already unlinked, so nothing is left behind whatever ends the process.

Worker processes forked by the builder (builder.decide) write into the same file: each write
reserves its byte range from an end offset shared between the processes, then `pwrite`s there, and
hands back a `Parked` reference (a few numbers) instead of the arrays.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
from gguf.constants import GGMLQuantizationType

from seeddelta.errors import SeedDeltaError
from seeddelta.gguf_format.writer import LazyTensor, RawTensor


@dataclass(frozen=True)
class Parked:
    """Where one array's bytes lie in the spill file (picklable: what a worker process returns)."""

    offset: int
    nbytes: int
    dtype: str
    shape: tuple[int, ...]
    tensor_type: GGMLQuantizationType | None = None  # set: the bytes of a RawTensor (a variant's quantized base)


class _LocalEnd:
    """The file's end offset within one process (threads reserve under the GIL: one attribute update)."""

    def __init__(self) -> None:
        self.value = 0

    def reserve(self, nbytes: int) -> int:
        offset, self.value = self.value, self.value + nbytes
        return offset


class _SharedEnd:
    """The file's end offset in shared memory, reserved under a lock: forked workers append concurrently."""

    def __init__(self, context: Any, start: int) -> None:
        self._value = context.Value("q", start)  # a lock-protected 64-bit integer

    def reserve(self, nbytes: int) -> int:
        with self._value.get_lock():
            offset = int(self._value.value)
            self._value.value = offset + nbytes
        return offset


class SpillFile:
    """Append arrays to an unlinked temporary file; hand them back as `LazyTensor`s the writer reads."""

    def __init__(self, directory: str) -> None:
        self._directory = directory or "."
        try:
            self._file = tempfile.TemporaryFile(dir=self._directory, prefix=".seeddelta-spill-", buffering=0)
        except OSError as exc:
            raise SeedDeltaError(f"cannot create a temporary file in {self._directory}: {exc.strerror or exc}") from None
        self._end: _LocalEnd | _SharedEnd = _LocalEnd()

    def share(self, context: Any) -> None:
        """Let processes forked from now on (multiprocessing `context`) store into this file too."""
        if isinstance(self._end, _LocalEnd):
            self._end = _SharedEnd(context, self._end.value)

    def store(self, name: str, array: np.ndarray | RawTensor) -> Parked:
        """`array`'s bytes written to the file; a `RawTensor` (a variant's quantized base) keeps its ggml type."""
        raw = array if isinstance(array, RawTensor) else None
        data = np.ascontiguousarray(array.data if raw is not None else array)
        view = data.data.cast("B")  # the array's own bytes, not a copy of them
        offset = self._end.reserve(data.nbytes)
        try:
            done = 0
            while done < len(view):
                done += os.pwrite(self._file.fileno(), view[done:], offset + done)
        except OSError as exc:
            raise SeedDeltaError(f"cannot park tensor {name} in a temporary file in {self._directory}: "
                                 f"{exc.strerror or exc}") from None
        return Parked(offset, data.nbytes, data.dtype.str, tuple(int(d) for d in data.shape),
                      None if raw is None else raw.tensor_type)

    def park(self, name: str, array: np.ndarray | RawTensor | Parked) -> LazyTensor:
        """`array` stored (unless it already is: a worker's `Parked`), as a tensor the writer copies from here."""
        where = array if isinstance(array, Parked) else self.store(name, array)
        dtype = np.dtype(where.dtype)
        return LazyTensor(name, where.shape, dtype, partial(self._read, where.offset, where.nbytes, dtype, where.shape),
                          where.tensor_type, partial(self._where, where.offset))

    def _where(self, offset: int) -> tuple[int, int]:
        """(file descriptor, offset) of parked bytes (written unbuffered): the writer has the kernel copy them."""
        return self._file.fileno(), offset

    def _read(self, offset: int, nbytes: int, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        raw = os.pread(self._file.fileno(), nbytes, offset)
        if len(raw) != nbytes:
            raise OSError(f"spill file: read {len(raw)} of {nbytes} bytes at {offset}")
        return np.frombuffer(raw, dtype=dtype).reshape(shape)

    def close(self) -> None:
        self._file.close()
