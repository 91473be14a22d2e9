"""Where encoded tensors wait between their decision and the write: an anonymous temporary file.

The output's tensor table comes before any tensor data, and it can only be written once every
weight is decided (gating and the stack cost decide which tensors exist). Kept in memory, the
SeedΔ tensors of a 7B model at K 128 are ~0.5 GB, growing with the model; parked here, memory
holds the tensors of the weights being encoded and nothing else. The file is created next to the
output (same disk) already unlinked, so nothing is left behind whatever ends the process.
"""

from __future__ import annotations

import os
import tempfile
from functools import partial

import numpy as np

from seeddelta.errors import SeedDeltaError
from seeddelta.gguf_format.writer import LazyTensor, RawTensor


class SpillFile:
    """Append arrays to an unlinked temporary file; hand them back as `LazyTensor`s the writer reads."""

    def __init__(self, directory: str) -> None:
        self._directory = directory or "."
        try:
            self._file = tempfile.TemporaryFile(dir=self._directory, prefix=".seeddelta-spill-")
        except OSError as exc:
            raise SeedDeltaError(f"cannot create a temporary file in {self._directory}: {exc.strerror or exc}") from None
        self._end = 0

    def park(self, name: str, array: np.ndarray | RawTensor) -> LazyTensor:
        """`array`'s bytes appended to the file; a `RawTensor` (a variant's quantized base) keeps its
        ggml type, so the writer gets the same tensor back either way."""
        raw = array if isinstance(array, RawTensor) else None
        data = np.ascontiguousarray(array.data if raw is not None else array)
        offset = self._end
        try:
            self._file.seek(offset)
            self._file.write(data.data.cast("B"))  # the array's own bytes, not a copy of them
        except OSError as exc:
            raise SeedDeltaError(f"cannot park tensor {name} in a temporary file in {self._directory}: "
                                 f"{exc.strerror or exc}") from None
        self._end += data.nbytes
        return LazyTensor(name, tuple(int(d) for d in data.shape), data.dtype,
                          partial(self._read, offset, data.nbytes, data.dtype, data.shape),
                          None if raw is None else raw.tensor_type, partial(self._where, offset))

    def _where(self, offset: int) -> tuple[int, int]:
        """(file descriptor, offset) of parked bytes, flushed: the writer has the kernel copy them."""
        self._file.flush()
        return self._file.fileno(), offset

    def _read(self, offset: int, nbytes: int, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        self._file.flush()
        raw = os.pread(self._file.fileno(), nbytes, offset)
        if len(raw) != nbytes:
            raise OSError(f"spill file: read {len(raw)} of {nbytes} bytes at {offset}")
        return np.frombuffer(raw, dtype=dtype).reshape(shape)

    def close(self) -> None:
        self._file.close()
