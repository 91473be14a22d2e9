"""Importance matrices (activation statistics) in llama-imatrix's formats, and per-input scales.

GGUF format, as written by llama.cpp's `tools/imatrix/imatrix.cpp` (`save_imatrix`; checked
against ggml-org/llama.cpp): KV `general.type = "imatrix"` (string), `imatrix.datasets`
(array of strings), `imatrix.chunk_count` and `imatrix.chunk_size` (u32); per weight `<w>` the
tensors `<w>.in_sum2` (F32, ggml ne `[n_in, n_mat]`: Σ x_i² per input column) and `<w>.counts`
(F32, ne `[1, n_mat]`: number of rows of x accumulated), in sorted name order. gguf writes
`ggml_n_dims` dimensions, so for a dense weight (n_mat = 1) the file holds `in_sum2` as a 1-D
`[n_in]` tensor and `counts` as `[1]`. Newer llama-imatrix versions may add `<w>.in_sum`
(Σ x_i); it is ignored here, as by the original builder.

The legacy binary `.dat` format (fallback when the file is not a GGUF) is read too; its values
are used as stored (mean x² times the call count), as in the original.

Scale (spec-builder-runtime §5.2): `s_i = max(imat_i, eps)^(power/2)`, non-finite → 1, then
`s ← s / mean(s)` when the mean is positive.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from gguf import GGUFReader, GGUFValueType

from seeddelta.errors import SeedDeltaError
from seeddelta.gguf_format.reader import field_value, open_gguf
from seeddelta.gguf_format.writer import KV, new_writer, set_kv
from seeddelta.outputs import AtomicOutput

SUM_SUFFIX = ".in_sum2"
COUNT_SUFFIX = ".counts"
KEY_DATASETS = "imatrix.datasets"
KEY_CHUNK_COUNT = "imatrix.chunk_count"
KEY_CHUNK_SIZE = "imatrix.chunk_size"


@dataclass
class Imatrix:
    """An imatrix file: per weight name the mean of x_i² per input (already divided by counts)."""

    path: str
    values: dict[str, np.ndarray]  # weight name -> (n_in,) float32 mean x²
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0
    legacy: bool = False

    def entry(self, weight: str, n_in: int) -> np.ndarray:
        """The statistics of `weight`, which must exist and have exactly `n_in` values."""
        values = self.values.get(weight)
        if values is None:
            raise SeedDeltaError(
                f"imatrix {self.path} has no entry for {weight} (it does not match the model)"
            )
        if values.shape[0] != n_in:
            raise SeedDeltaError(
                f"imatrix {self.path}: entry {weight} has {values.shape[0]} values but the weight has "
                f"{n_in} inputs (it does not match the model)"
            )
        return values

    def scale(self, weight: str, n_in: int, eps: float = 1e-8, power: float = 1.0) -> np.ndarray:
        return imatrix_scale(self.entry(weight, n_in), eps=eps, power=power)


def imatrix_scale(values: np.ndarray, eps: float = 1e-8, power: float = 1.0) -> np.ndarray:
    """Per-input scale s (float32, mean 1 when the mean is positive) from mean-x² statistics."""
    eps = max(float(eps), 0.0)
    power = max(float(power), 0.0)
    v = np.asarray(values, dtype=np.float64)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        s = np.power(np.maximum(v, eps), power / 2.0)
    s = np.where(np.isfinite(s), s, 1.0)  # NaN/Inf statistics (or NaN from max) count as 1
    mean = float(s.mean()) if s.size else 0.0
    if mean > 0.0 and np.isfinite(mean):
        s = s / mean
    return s.astype(np.float32)


def _field(reader: GGUFReader, key: str) -> Any:
    fld = reader.fields.get(key)
    return None if fld is None else field_value(fld)


def read_imatrix(path: str | os.PathLike[str]) -> Imatrix:
    """Read an imatrix (GGUF, or the legacy binary format)."""
    p = os.fspath(path)
    if not os.path.exists(p):
        raise SeedDeltaError(f"imatrix file not found: {p}")
    with open(p, "rb") as fh:
        magic = fh.read(4)
    if magic != b"GGUF":
        return _read_legacy(p)
    reader = open_gguf(p, "imatrix")
    missing = [k for k in (KEY_DATASETS, KEY_CHUNK_COUNT, KEY_CHUNK_SIZE) if k not in reader.fields]
    if missing:
        raise SeedDeltaError(f"imatrix {p} is not an imatrix GGUF (missing key(s) {', '.join(missing)})")
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, np.ndarray] = {}
    for tensor in reader.tensors:
        if tensor.name.endswith(SUM_SUFFIX):
            target, name = sums, tensor.name[: -len(SUM_SUFFIX)]
        elif tensor.name.endswith(COUNT_SUFFIX):
            target, name = counts, tensor.name[: -len(COUNT_SUFFIX)]
        else:
            continue
        if tensor.data.dtype != np.float32:
            raise SeedDeltaError(f"imatrix {p}: tensor {tensor.name} is not F32")
        shape = [int(d) for d in tensor.shape]  # ggml order
        rows = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        target[name] = np.asarray(tensor.data, dtype=np.float32).reshape(rows, shape[0]).copy()
    values: dict[str, np.ndarray] = {}
    for name in sorted(set(sums) | set(counts)):
        if name not in sums or name not in counts:
            raise SeedDeltaError(f"imatrix {p}: {name} has {'no counts' if name in sums else 'counts but no sums'}")
        s, c = sums[name], counts[name]
        if c.shape[1] != 1 or c.shape[0] != s.shape[0]:
            raise SeedDeltaError(f"imatrix {p}: {name} has {s.shape[0]} sum rows but {c.size} counts")
        if s.shape[0] != 1:
            # merged-expert (MoE) weights; SeedΔ only encodes dense FFN weights
            continue
        _check_values(p, name + SUM_SUFFIX, s[0])
        count = float(c[0, 0])
        if not np.isfinite(count) or count <= 0:
            raise SeedDeltaError(f"imatrix {p}: {name}{COUNT_SUFFIX} is {count:g}; a count must be a positive number "
                                 "of accumulated rows (recompute the imatrix on text that reaches this weight)")
        values[name] = (s[0] / np.float32(count)).astype(np.float32)
    datasets = _field(reader, KEY_DATASETS)
    return Imatrix(
        path=p,
        values=values,
        datasets=[str(d) for d in datasets] if isinstance(datasets, list) else [],
        chunk_count=int(_field(reader, KEY_CHUNK_COUNT) or 0),
        chunk_size=int(_field(reader, KEY_CHUNK_SIZE) or 0),
    )


def _check_values(path: str, name: str, values: np.ndarray) -> None:
    """Statistics are sums of squares: finite and >= 0, or the file is damaged (never silently replaced)."""
    finite = np.isfinite(values)
    if not finite.all():
        i = int(np.flatnonzero(~finite)[0])
        raise SeedDeltaError(f"imatrix {path}: {name} holds {int((~finite).sum())} NaN/Inf value(s) (first at input "
                             f"{i}); the file is damaged")
    if (values < 0).any():
        i = int(np.flatnonzero(values < 0)[0])
        raise SeedDeltaError(f"imatrix {path}: {name} holds {int((values < 0).sum())} negative value(s) (first at input "
                             f"{i}: {float(values[i]):g}); sums of squares cannot be negative")


def _read_legacy(p: str) -> Imatrix:
    """llama-imatrix's legacy `.dat`: int32 n; n × (int32 len, name, int32 ncall, int32 nval, f32[nval]);
    then optionally int32 last_chunk, int32 len, dataset name."""
    with open(p, "rb") as fh:
        data = fh.read()
    bad = SeedDeltaError(f"imatrix {p} is neither an imatrix GGUF nor a legacy imatrix file")
    pos = 0

    def take(fmt: str) -> tuple[int, ...]:
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(data):
            raise bad
        out = struct.unpack_from(fmt, data, pos)
        pos += size
        return out

    (n_entries,) = take("<i")
    if n_entries < 1 or n_entries > 1_000_000:
        raise bad
    values: dict[str, np.ndarray] = {}
    for _ in range(n_entries):
        (length,) = take("<i")
        if length < 1 or length > 4096 or pos + length > len(data):
            raise bad
        name = data[pos:pos + length].decode("utf-8", errors="replace")
        pos += length
        _ncall, nval = take("<ii")
        if nval < 1 or pos + 4 * nval > len(data):
            raise bad
        values[name] = np.frombuffer(data, dtype="<f4", count=nval, offset=pos).astype(np.float32)
        _check_values(p, name, values[name])
        pos += 4 * nval
    datasets: list[str] = []
    chunk_count = 0
    if pos + 8 <= len(data):
        (chunk_count,) = take("<i")
        (length,) = take("<i")
        if 0 < length <= len(data) - pos:
            datasets.append(data[pos:pos + length].decode("utf-8", errors="replace"))
    return Imatrix(path=p, values=values, datasets=datasets, chunk_count=chunk_count, legacy=True)


def write_imatrix(
    path: str | os.PathLike[str],
    sums: Mapping[str, np.ndarray],
    counts: Mapping[str, int],
    datasets: Sequence[str],
    chunk_count: int,
    chunk_size: int,
) -> None:
    """Write an imatrix GGUF the way llama-imatrix does (see the module docstring).

    `sums[w]` is Σ x_i² over all accumulated rows for weight `w` (shape (n_in,)); `counts[w]` the
    number of rows. Written atomically (temporary file + rename)."""
    if set(sums) != set(counts):
        only = sorted(set(sums) ^ set(counts))
        raise SeedDeltaError(f"write_imatrix: sums and counts name different weights: {', '.join(only[:5])}")
    if chunk_count < 0 or chunk_size < 0:
        raise SeedDeltaError("write_imatrix: chunk_count and chunk_size must be >= 0")
    prepared: list[tuple[str, np.ndarray, np.ndarray]] = []
    for name in sorted(sums):
        s = np.asarray(sums[name], dtype=np.float32)
        if s.ndim != 1 or s.size == 0:
            raise SeedDeltaError(f"write_imatrix: sums for {name} must be a non-empty 1-D array")
        count = int(counts[name])
        if count < 0:
            raise SeedDeltaError(f"write_imatrix: negative count for {name}")
        prepared.append((name, s, np.array([count], dtype=np.float32)))
    with AtomicOutput(path, "imatrix") as out:
        writer = new_writer(out.tmp, "imatrix", 32)
        set_kv(writer, KV("general.type", "imatrix", GGUFValueType.STRING))
        set_kv(writer, KV(KEY_DATASETS, [str(d) for d in datasets], GGUFValueType.ARRAY, GGUFValueType.STRING))
        set_kv(writer, KV(KEY_CHUNK_COUNT, int(chunk_count), GGUFValueType.UINT32))
        set_kv(writer, KV(KEY_CHUNK_SIZE, int(chunk_size), GGUFValueType.UINT32))
        # llama-imatrix sorts the weight names and writes in_sum2 then counts for each
        for name, s, c in prepared:
            writer.add_tensor(name + SUM_SUFFIX, s)
            writer.add_tensor(name + COUNT_SUFFIX, c)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
