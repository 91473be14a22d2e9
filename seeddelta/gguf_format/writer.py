"""Writing GGUF files: a model's copy with tensors dropped or added and keys set, atomically.

Every KV pair of the input is copied byte-for-byte (its raw encoding, so value types are preserved
exactly), then the new keys are set; every input tensor is copied byte-for-byte in its original type
unless dropped (stripped dense weights, replaced SeedΔ tensors); the output is written to a
temporary file next to the target and renamed. Tensors are streamed (see `write_model_copy`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf import GGUFValueType, GGUFWriter
from gguf.constants import GGMLQuantizationType
from gguf.gguf_reader import ReaderTensor

from seeddelta.errors import SeedDeltaError
from seeddelta.gguf_format.reader import GGUFModel, drop_mapped_pages, field_raw_value
from seeddelta.outputs import AtomicOutput, same_file, write_error


@dataclass(frozen=True)
class KV:
    """A key to set in the output, with its exact GGUF value type."""

    key: str
    value: Any
    type: GGUFValueType
    sub_type: GGUFValueType | None = None


@dataclass
class _RawKV:
    raw: bytes  # type tag + encoded value, copied from the input


class _Writer(GGUFWriter):
    """GGUFWriter that writes copied KV values byte-for-byte and accepts empty typed arrays."""

    def write_kv_data_to_file(self) -> None:
        from gguf.gguf_writer import WriterState

        if self.state is not WriterState.HEADER:
            raise ValueError(f"Expected output file to contain the header, got {self.state}")
        assert self.fout is not None and len(self.fout) == 1
        buf = bytearray()
        for key, val in self.kv_data[0].items():
            buf += self._pack_val(key, GGUFValueType.STRING, add_vtype=False)
            if isinstance(val.value, _RawKV):
                buf += val.value.raw
            elif val.type == GGUFValueType.ARRAY and len(val.value) == 0:
                assert val.sub_type is not None
                buf += self._pack("I", GGUFValueType.ARRAY) + self._pack("I", val.sub_type) + self._pack("Q", 0)
            else:
                buf += self._pack_val(val.value, val.type, add_vtype=True, sub_type=val.sub_type)
        self.fout[0].write(buf)
        self.flush()
        self.state = WriterState.KV_DATA

    def write_tensor_from_file(self, fd: int, offset: int, nbytes: int) -> bool:
        """`write_tensor_data` for a tensor whose bytes lie in the file `fd` at `offset`: copied by the
        kernel (`os.copy_file_range`: no page faults on a mapping, no copy through this process).
        False, with nothing written, where the kernel cannot (the caller writes the bytes itself)."""
        from gguf.gguf_writer import WriterState

        assert self.fout is not None and len(self.fout) == 1 and self.state in (WriterState.TI_DATA,
                                                                                 WriterState.WEIGHTS)
        fout = self.fout[0]
        first = next(iter(self.tensors[0]))
        if self.tensors[0][first].nbytes != nbytes:
            raise ValueError(f"tensor {first}: {nbytes} bytes given, {self.tensors[0][first].nbytes} announced")
        self.write_padding(fout, fout.tell())
        fout.flush()
        start = fout.tell()
        done = 0
        try:
            while done < nbytes:
                n = os.copy_file_range(fd, fout.fileno(), nbytes - done, offset + done, start + done)
                if n <= 0:
                    raise OSError("copy_file_range copied nothing")
                done += n
        except (OSError, AttributeError):
            if done == 0:
                return False
            fout.seek(start + done)
            fout.write(os.pread(fd, nbytes - done, offset + done))  # the rest, through this process
        else:
            fout.seek(start + nbytes)
        self.tensors[0].pop(first)
        self.write_padding(fout, nbytes)
        self.state = WriterState.WEIGHTS
        return True


def new_writer(path: str, arch: str, alignment: int) -> _Writer:
    writer = _Writer(path, arch)
    writer.kv_data[0].clear()  # the caller decides every key, including general.architecture
    writer.data_alignment = int(alignment)
    return writer


def set_kv(writer: GGUFWriter, kv: KV) -> None:
    from gguf.gguf_writer import GGUFValue

    kv_data = writer.kv_data[0]
    kv_data.pop(kv.key, None)  # setting an existing key removes it and appends the new value (§8.1)
    value = kv.value
    if kv.type == GGUFValueType.BOOL:
        value = bool(value)
    elif kv.type in (GGUFValueType.UINT8, GGUFValueType.UINT16, GGUFValueType.UINT32, GGUFValueType.UINT64,
                     GGUFValueType.INT8, GGUFValueType.INT16, GGUFValueType.INT32, GGUFValueType.INT64):
        value = int(value)
    elif kv.type in (GGUFValueType.FLOAT32, GGUFValueType.FLOAT64):
        value = float(value)
    kv_data[kv.key] = GGUFValue(value=value, type=kv.type, sub_type=kv.sub_type)


@dataclass(frozen=True)
class RawTensor:
    """A tensor's stored form, as GGUFReader hands it out: `data` in the stored dtype (quantized
    types as uint8 bytes, one row of blocks per weight row), `tensor_type`, `shape` in ggml order."""

    data: np.ndarray
    tensor_type: GGMLQuantizationType
    shape: tuple[int, ...]


@dataclass(frozen=True)
class _Replacement:
    """Bytes written in place of an input tensor (`replace_tensors`)."""

    data: np.ndarray


def _tensor_for_copy(tensor: ReaderTensor | RawTensor) -> tuple[np.ndarray, GGMLQuantizationType]:
    return tensor.data, GGMLQuantizationType(tensor.tensor_type)


@dataclass(frozen=True)
class LazyTensor:
    """A tensor to add whose values are produced only when the writer reaches it, so a file of any
    size is written holding one produced tensor at a time."""

    name: str
    shape: tuple[int, ...]  # numpy order
    dtype: np.dtype
    produce: Callable[[], np.ndarray]
    tensor_type: GGMLQuantizationType | None = None  # set: the produced array is a `RawTensor`'s stored bytes
    # where the produced bytes already lie in a file: () -> (fd, offset), for a copy by the kernel
    stored_at: Callable[[], tuple[int, int]] | None = None


AddedTensor = tuple[str, "np.ndarray | RawTensor"] | LazyTensor
_ADD_DTYPES = (np.float16, np.float32, np.int8, np.int16, np.int32)


def write_model_copy(
    src: GGUFModel,
    out_path: str | os.PathLike[str],
    *,
    drop_tensors: Iterable[str] = (),
    add_tensors: Iterable[AddedTensor] = (),
    drop_keys: Iterable[str] = (),
    set_keys: Sequence[KV] = (),
    replace_tensors: Mapping[str, ReaderTensor | RawTensor] = {},
) -> None:
    """Write `src` to `out_path` atomically: its KV pairs (minus `drop_keys`) copied byte-for-byte,
    then `set_keys`; its tensors (minus `drop_tensors`) copied byte-for-byte in their original
    order and type — or, for a name in `replace_tensors`, that tensor's bytes and type at the same
    place (same shape required; e.g. the weight as another file quantized it) — then `add_tensors`
    (numpy order; dtype float16/float32/int8/int16/int32, or a `RawTensor` in any ggml type: a SeedΔ
    variant's quantized base) in the given order. The alignment of `src` is kept.

    Streamed: the header and tensor table are written first, then each tensor's data in turn —
    input tensors straight from the memory map (whose pages are dropped from this process once
    copied), `LazyTensor`s produced when reached — so memory is bounded by the largest single added
    tensor, not by the file."""
    drop_t = set(drop_tensors)
    for name, other in replace_tensors.items():
        mine = src.tensors.get(name)
        if mine is None or [int(d) for d in mine.shape] != [int(d) for d in other.shape]:
            raise SeedDeltaError(f"internal: replacement for tensor {name} does not match a tensor of {src.path}")
    drop_k = set(drop_keys)
    if same_file(src.path, out_path):
        raise SeedDeltaError(f"output {os.fspath(out_path)} is the input file; choose another -o")
    out = AtomicOutput(out_path)
    try:
        writer = new_writer(out.tmp, src.arch, src.alignment)
        from gguf.gguf_writer import GGUFValue

        for key, fld in src.reader.fields.items():
            if key.startswith("GGUF.") or key in drop_k:
                continue
            writer.kv_data[0][key] = GGUFValue(value=_RawKV(field_raw_value(fld)), type=fld.types[0])
        for kv in set_keys:
            set_kv(writer, kv)
        names: set[str] = set()
        sources: list[ReaderTensor | _Replacement | AddedTensor] = []
        for tensor in src.reader.tensors:
            if tensor.name in drop_t:
                continue
            replacement = replace_tensors.get(tensor.name)
            data, qtype = _tensor_for_copy(replacement if replacement is not None else tensor)
            writer.add_tensor_info(tensor.name, data.shape, data.dtype, data.nbytes, raw_dtype=qtype)
            names.add(tensor.name)
            sources.append(tensor if replacement is None else _Replacement(data))
        for added in add_tensors:
            name, shape, dtype = _added_info(added)
            if name in names:
                raise SeedDeltaError(f"internal: tensor {name} would be written twice")
            if isinstance(added, tuple) and isinstance(added[1], RawTensor):
                raw = added[1]
                data = np.ascontiguousarray(raw.data)
                writer.add_tensor_info(name, data.shape, data.dtype, data.nbytes,
                                       raw_dtype=GGMLQuantizationType(raw.tensor_type))
                names.add(name)
                sources.append(_Replacement(data))
                continue
            if isinstance(added, LazyTensor) and added.tensor_type is not None:  # stored bytes, produced later
                writer.add_tensor_info(name, shape, dtype, int(np.prod(shape, dtype=np.int64)) * dtype.itemsize,
                                       raw_dtype=GGMLQuantizationType(added.tensor_type))
                names.add(name)
                sources.append(added)
                continue
            if dtype not in _ADD_DTYPES:
                raise SeedDeltaError(f"internal: tensor {name} has unsupported dtype {dtype}")
            writer.add_tensor_info(name, shape, dtype, int(np.prod(shape, dtype=np.int64)) * dtype.itemsize)
            names.add(name)
            sources.append(added)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        src_fd = os.open(src.path, os.O_RDONLY)
        try:
            for item in sources:
                if isinstance(item, _Replacement):
                    writer.write_tensor_data(item.data)
                elif isinstance(item, ReaderTensor):
                    if not writer.write_tensor_from_file(src_fd, int(item.data_offset), int(item.n_bytes)):
                        writer.write_tensor_data(item.data)
                        drop_mapped_pages(src.reader.data, int(item.data_offset), int(item.n_bytes))
                elif isinstance(item, LazyTensor) and item.stored_at is not None and \
                        writer.write_tensor_from_file(*item.stored_at(), _lazy_nbytes(item)):
                    pass  # parked bytes copied by the kernel
                else:
                    writer.write_tensor_data(_added_data(item))
        finally:
            os.close(src_fd)
        writer.close()
        out.commit()
    except OSError as exc:
        raise write_error(exc, out_path, "GGUF output") from None
    finally:
        out.discard()


def _lazy_nbytes(item: LazyTensor) -> int:
    return int(np.prod(item.shape, dtype=np.int64)) * np.dtype(item.dtype).itemsize


def _added_info(item: AddedTensor) -> tuple[str, tuple[int, ...], np.dtype]:
    if isinstance(item, LazyTensor):
        return item.name, tuple(int(d) for d in item.shape), np.dtype(item.dtype)
    name, array = item
    data = array.data if isinstance(array, RawTensor) else array
    return name, tuple(int(d) for d in data.shape), np.dtype(data.dtype)


def _added_data(item: AddedTensor) -> np.ndarray:
    name, shape, dtype = _added_info(item)
    arr = np.ascontiguousarray(item.produce() if isinstance(item, LazyTensor) else item[1])
    if tuple(arr.shape) != shape or arr.dtype != dtype:
        raise SeedDeltaError(f"internal: tensor {name} was produced as {arr.dtype}{tuple(arr.shape)}, "
                             f"announced as {dtype}{shape}")
    return arr
