"""The one way into a GGUF file: `open_gguf` checks existence, magic, truncation and byte order
once and turns every failure into one `SeedDeltaError` line; `GGUFModel` is a llama-like model
opened read-only (memory-mapped) on top of it.

Everything goes through the `gguf` package (`GGUFReader`, `gguf.quants`); no hand-written GGUF
parsing. A dense weight `blk.N.T.weight` has ggml shape `ne = [n_in, n_out]`; it is handed out as a
float32 numpy array `(n_out, n_in)` (one output per row).
"""

from __future__ import annotations

import gc
import mmap
import os
import struct
from collections.abc import Sequence
from typing import Any, overload

import numpy as np
from gguf import GGUFReader, GGUFValueType
from gguf import quants as gguf_quants
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.gguf_reader import ReaderField, ReaderTensor
from gguf.quants import dequantize

from seeddelta.errors import SeedDeltaError
from seeddelta.gguf_format.dequant import DECODERS
from seeddelta.gguf_format.schema import (
    BLK_NAME,
    EXT_VERSION_KEY,
    KINDS,
    SEEDDELTA_SUFFIXES,
    SUPPORTED_ARCHITECTURES,
    VARIANT_KEY,
    extension_problem,
    parse_seeddelta_name,
    seeddelta_tensor_name,
    weight_name,
)


def _p(path: str | os.PathLike[str]) -> str:
    return os.fspath(path)


# --------------------------------------------------------------------------------------------
# Opening and validating
# --------------------------------------------------------------------------------------------


class _Reader(GGUFReader):
    """`GGUFReader` with the same fields and tensors, parsed in milliseconds instead of seconds.

    gguf's reader cuts one `numpy.memmap` view per array element (a tokenizer's 50 000 strings,
    scores and types: ~250 000 views, each paying numpy.memmap's Python-level hooks) — 2-4 s of
    every command's start on a real model. Here the views are cut from a plain ndarray over the same
    mapping (no hooks), arrays of scalars are sliced from one view of the whole array, and string
    lengths are read with `struct`. The result has gguf's structure exactly (parts, data indices,
    types; tests compare both readers part by part); `.data` stays the `numpy.memmap`."""

    def _plain(self) -> np.ndarray:
        plain = self.__dict__.get("_plain_data")
        if plain is None:
            plain = self.__dict__["_plain_data"] = self.data.view(np.ndarray)
        return plain

    def _get(self, offset: int, dtype: Any, count: int = 1, override_order: Any = None) -> np.ndarray:
        count = int(count)
        dt = np.dtype(dtype)
        arr = self._plain()[offset : offset + dt.itemsize * count].view(dtype=dt)[:count]
        return arr.view(arr.dtype.newbyteorder(self.byte_order if override_order is None else override_order))

    def _get_field_parts(self, orig_offs: int, raw_type: int) -> tuple[int, Any, list[int], list[GGUFValueType]]:
        if GGUFValueType(raw_type) != GGUFValueType.ARRAY or self.byte_order != "I":
            return super()._get_field_parts(orig_offs, raw_type)
        raw_itype = self._get(orig_offs, np.uint32)
        alen = self._get(orig_offs + 4, np.uint64)
        itype, n = GGUFValueType(int(raw_itype[0])), int(alen[0])
        nptype = self.gguf_scalar_to_np.get(itype)
        if n == 0 or (nptype is None and itype != GGUFValueType.STRING):
            return super()._get_field_parts(orig_offs, raw_type)  # empty or nested arrays: gguf's own way
        offs = orig_offs + 12
        if nptype is not None:
            whole = self._get(offs, nptype, n)
            parts = _ArrayParts([raw_itype, alen], orig_offs + 12 + int(whole.nbytes), whole=whole)
            return 12 + int(whole.nbytes), parts, list(range(2, 2 + n)), [GGUFValueType.ARRAY, itype]
        plain = self._plain()
        buf = memoryview(plain.data)
        unpack = struct.Struct("<Q" if np.little_endian else ">Q").unpack_from
        first = offs  # the first string's 8-byte length
        ends = [0] * n  # where each string ends: one store per string in this loop (~30 % faster than two lists)
        for i in range(n):
            offs += 8 + unpack(buf, offs)[0]
            ends[i] = offs
        end = np.array(ends, dtype=np.int64)
        starts = np.empty(n, dtype=np.int64)  # each string's bytes follow its 8-byte length
        starts[0] = first + 8
        starts[1:] = end[:-1] + 8
        strings = (plain, starts, (end - starts).astype(np.dtype(np.uint64).newbyteorder("I")))
        parts = _ArrayParts([raw_itype, alen], offs, strings=strings)
        return offs - orig_offs, parts, list(range(3, 2 + 2 * n, 2)), [GGUFValueType.ARRAY, itype]

    def _build_fields(self, offs: int, count: int) -> int:
        """gguf's `_build_fields`, keeping an array's parts lazy (`_ArrayParts`) instead of joining them
        into a list (which would cut every element's view)."""
        for _ in range(count):
            orig_offs = offs
            kv_klen, kv_kdata = self._get_str(offs)
            offs += int(kv_klen.nbytes + kv_kdata.nbytes)
            raw_kv_type = self._get(offs, np.uint32)
            offs += int(raw_kv_type.nbytes)
            head: list[np.ndarray] = [kv_klen, kv_kdata, raw_kv_type]
            field_size, field_parts, field_idxs, field_types = self._get_field_parts(offs, raw_kv_type[0])
            if isinstance(field_parts, _ArrayParts):
                parts: Any = field_parts.after(head, offs - int(raw_kv_type.nbytes))
                data = list(range(field_idxs[0] + len(head), field_idxs[-1] + len(head) + 1, 1 + parts.strings_step))
            else:
                parts, data = head + field_parts, [idx + len(head) for idx in field_idxs]
            self._push_field(ReaderField(orig_offs, str(bytes(kv_kdata), encoding="utf-8"), parts, data, field_types),
                             skip_sum=True)
            offs += field_size
        return offs


class _ArrayParts(Sequence[np.ndarray]):
    """The parts of an array field — gguf's list [key length, key, type tag, item type, count, then one
    part per scalar, or a length part and a bytes part per string] — with the elements' parts cut
    only when read: the same arrays (dtype, shape, bytes) as gguf's, without ~250 000 views made for a
    real tokenizer at every start. `raw_value` is the value's bytes as stored, in one slice."""

    def __init__(self, head: list[np.ndarray], end: int, *, whole: np.ndarray | None = None,
                 strings: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> None:
        self.head, self.end, self.whole, self.strings = head, end, whole, strings
        self.tag_offset = -1
        self.strings_step = 1 if strings is not None else 0
        self.n_items = len(whole) if whole is not None else len(strings[1]) if strings is not None else 0

    def after(self, key_parts: list[np.ndarray], tag_offset: int) -> _ArrayParts:
        """These parts with the field's key parts (length, key, type tag at `tag_offset`) in front."""
        out = _ArrayParts(key_parts + self.head, self.end, whole=self.whole, strings=self.strings)
        out.tag_offset = tag_offset
        return out

    def __len__(self) -> int:
        return len(self.head) + self.n_items * (1 + self.strings_step)

    @overload
    def __getitem__(self, index: int) -> np.ndarray: ...
    @overload
    def __getitem__(self, index: slice) -> list[np.ndarray]: ...

    def __getitem__(self, index: int | slice) -> np.ndarray | list[np.ndarray]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        i = index + len(self) if index < 0 else index
        if not 0 <= i < len(self):
            raise IndexError(index)
        if i < len(self.head):
            return self.head[i]
        j = i - len(self.head)
        if self.whole is not None:
            return self.whole[j : j + 1]
        assert self.strings is not None
        plain, starts, lengths = self.strings
        k = j // 2
        if j % 2 == 0:
            return lengths[k : k + 1]
        return plain[int(starts[k]) : int(starts[k]) + int(lengths[k])]

    def raw_value(self) -> bytes:
        """From the type tag to the end of the value, as the file holds it."""
        root = self.strings[0] if self.strings is not None else self.head[0]
        while isinstance(root.base, np.ndarray):
            root = root.base
        return bytes(root[self.tag_offset : self.end])

    def values(self) -> list[Any]:
        """The elements as Python values (str for strings)."""
        if self.whole is not None:
            return list(self.whole.tolist())
        assert self.strings is not None
        plain, starts, lengths = self.strings
        return [bytes(plain[s : s + n]).decode("utf-8", errors="replace")
                for s, n in zip(starts.tolist(), lengths.tolist(), strict=True)]


def open_gguf(path: str | os.PathLike[str], what: str = "input") -> GGUFReader:
    """Open a GGUF read-only; every way it can fail becomes one SeedDeltaError line."""
    p = _p(path)
    if not os.path.exists(p):
        raise SeedDeltaError(f"{'file' if what == 'file' else what + ' file'} not found: {p}")
    if os.path.isdir(p):
        raise SeedDeltaError(f"{what} is a directory, not a GGUF file: {p}")
    try:
        size = os.path.getsize(p)
        with open(p, "rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise SeedDeltaError(f"cannot read {what} {p}: {exc.strerror or exc}") from None
    if magic != b"GGUF":
        raise SeedDeltaError(f"{what} {p} is not a GGUF file (no GGUF magic)")
    # Parsing makes ~250 000 small objects for a real model's tokenizer and no reference cycle: the
    # cyclic collector, which would re-scan the growing heap several times meanwhile, waits until it is done.
    collecting = gc.isenabled()
    gc.disable()
    try:
        reader = _Reader(p, "r")
    except Exception as exc:  # the reader raises ValueError/IndexError/KeyError/... on damage
        raise SeedDeltaError(f"{what} {p} is a truncated or corrupt GGUF ({type(exc).__name__}: {exc})") from None
    finally:
        if collecting:
            gc.enable()
    if reader.byte_order != "I":
        raise SeedDeltaError(f"{what} {p}: GGUF files of the other byte order are not supported")
    for tensor in reader.tensors:
        if tensor.data_offset + tensor.n_bytes > size or tensor.data.nbytes != tensor.n_bytes:
            raise SeedDeltaError(
                f"{what} {p} is a truncated GGUF: tensor {tensor.name} ends at byte "
                f"{tensor.data_offset + tensor.n_bytes} but the file has {size} bytes"
            )
    return reader


def field_value(fld: ReaderField) -> Any:
    """Python value of a KV field: str, bool, int, float, or a list of them."""
    if not fld.types:
        return None
    main = fld.types[0]
    if isinstance(fld.parts, _ArrayParts):
        return fld.parts.values()
    if main == GGUFValueType.ARRAY:
        sub = fld.types[-1] if len(fld.types) > 1 else None
        if sub == GGUFValueType.STRING:
            return [bytes(fld.parts[i]).decode("utf-8", errors="replace") for i in fld.data]
        return [fld.parts[i].tolist()[0] for i in fld.data]
    if main == GGUFValueType.STRING:
        return bytes(fld.parts[-1]).decode("utf-8", errors="replace")
    value = fld.parts[-1].tolist()[0]
    if main == GGUFValueType.BOOL:
        return bool(value)
    return value


def field_raw_value(fld: ReaderField) -> bytes:
    """The field's value exactly as encoded in the file: u32 type tag followed by the value."""
    if isinstance(fld.parts, _ArrayParts):
        return fld.parts.raw_value()
    # parts = [key length, key bytes, type tag, value parts...], all views of the file in order:
    # when they lie end to end in one buffer (always, for a file read here), one slice of it.
    parts = fld.parts[2:]
    if len(parts) <= 2:
        return b"".join(part.tobytes() for part in parts)
    root = parts[0]
    while isinstance(root.base, np.ndarray):
        root = root.base
    if root.ndim == 1 and root.dtype == np.uint8:
        origin = root.__array_interface__["data"][0]
        start = parts[0].__array_interface__["data"][0] - origin
        end = parts[-1].__array_interface__["data"][0] - origin + parts[-1].nbytes
        if 0 <= start < end <= root.nbytes and end - start == sum(p.nbytes for p in parts):
            return root[start:end].tobytes()
    return b"".join(part.tobytes() for part in parts)


def _tensor_shape(tensor: ReaderTensor) -> tuple[int, ...]:
    return tuple(int(d) for d in tensor.shape)


def tensor_nbytes(tensor: ReaderTensor) -> int:
    return int(tensor.n_bytes)


def drop_mapped_pages(data: Any, offset: int, nbytes: int) -> None:
    """Let this process's resident set drop the pages of a read-only file mapping (`numpy.memmap`)
    in [offset, offset + nbytes) once copied: they stay in the page cache, and are read again from it
    if touched, so copying a file of any size never keeps it resident."""
    mm = getattr(data, "_mmap", None)
    if mm is None or not hasattr(mm, "madvise") or nbytes <= 0:
        return
    start = (int(offset) // mmap.PAGESIZE) * mmap.PAGESIZE
    try:
        mm.madvise(mmap.MADV_DONTNEED, start, min(int(offset) + int(nbytes), len(mm)) - start)
    except (OSError, ValueError):
        pass  # an optimisation only


_DEQUANT_CHUNK_BLOCKS = 4096  # blocks decoded per call (128K values of 32-value blocks: cache-sized temporaries)


def _dequantize(data: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """`gguf.quants.dequantize(data, qtype)`, the same values bit for bit, in fewer and larger steps.

    gguf decodes a block-quantized tensor 16 rows at a time (76 calls of its block decoder for one
    576 × 1536 weight, whose fixed costs dominate: 5.3 ms against 3.1 ms here, measured). Its block
    decoder is elementwise per block, so calling that same decoder on chunks of 4096 blocks gives
    identical values; types without one (or a gguf without `_type_traits`) go through gguf's own path."""
    traits = getattr(gguf_quants, "_type_traits", {}).get(qtype)
    decode = getattr(traits, "dequantize_blocks", None)
    size = GGML_QUANT_SIZES.get(qtype)
    raw = np.asarray(data)
    if traits is None or decode is None or size is None or raw.dtype != np.uint8 or raw.size % size[1]:
        return dequantize(data, qtype)
    block, type_size = size
    traits.init_grid()  # (a no-op for the plain types; the i-quants' lookup grids)
    blocks = raw.reshape(-1, type_size)
    out = np.empty((blocks.shape[0], block), dtype=np.float32)
    into = DECODERS.get(qtype)  # Q4_0, Q4_1, Q8_0: the same bits written in place (gguf_format.dequant)
    for start in range(0, blocks.shape[0], _DEQUANT_CHUNK_BLOCKS):
        part = slice(start, start + _DEQUANT_CHUNK_BLOCKS)
        if into is not None:
            into(blocks[part], out[part])
        else:
            out[part] = decode(blocks[part])
    return out.reshape(*raw.shape[:-1], raw.shape[-1] // type_size * block)


def dequantize_tensor(tensor: ReaderTensor, path: str = "") -> np.ndarray:
    """Any tensor as a private, writable float32 numpy array in numpy order (reversed ggml shape).

    Always a copy: an F32 tensor would otherwise be a view of the read-only memory map (a quantized
    one is decoded into a new array already, which is kept: no second copy of a large tensor)."""
    qtype = GGMLQuantizationType(tensor.tensor_type)
    try:
        values = _dequantize(tensor.data, qtype)
    except NotImplementedError:
        raise SeedDeltaError(f"{path}: tensor {tensor.name} has type {qtype.name}, which gguf cannot dequantize") from None
    shape = tuple(reversed(_tensor_shape(tensor)))
    fresh = values.dtype == np.float32 and values.flags.c_contiguous and values.flags.writeable \
        and not np.may_share_memory(values, tensor.data)
    return (values if fresh else np.array(values, dtype=np.float32, copy=True, order="C")).reshape(shape)


class GGUFModel:
    """A GGUF model opened read-only (memory-mapped; the file is never modified)."""

    def __init__(self, path: str | os.PathLike[str], *, require_llama: bool = True, what: str = "input") -> None:
        self.path = _p(path)
        self.reader = open_gguf(self.path, what)
        self.file_size = os.path.getsize(self.path)
        self.tensors: dict[str, ReaderTensor] = {t.name: t for t in self.reader.tensors}
        # a SeedΔ variant (or a version of one) this reader does not know is refused before anything else
        problem = extension_problem(self.get(VARIANT_KEY), self.get(EXT_VERSION_KEY), list(self.tensors))
        if problem is not None:
            raise SeedDeltaError(f"{what} {self.path}: {problem}")
        self.alignment = int(self.reader.alignment)
        arch = self.get("general.architecture")
        self.arch: str = arch if isinstance(arch, str) else ""
        if require_llama:
            if not self.arch:
                raise SeedDeltaError(f"{what} {self.path} has no general.architecture key; cannot tell the architecture")
            if self.arch not in SUPPORTED_ARCHITECTURES:
                raise SeedDeltaError(
                    f"{what} {self.path}: unsupported architecture '{self.arch}' "
                    f"(SeedΔ supports llama-like dense-FFN models: {', '.join(SUPPORTED_ARCHITECTURES)})"
                )
        self.n_layer = self._n_layer()
        self.n_embd = self._n_embd()
        self.n_ff = self._n_ff()
        if require_llama and not any(
            weight_name(layer, kind) in self.tensors or self._has_seeddelta(layer, kind)
            for layer in range(self.n_layer) for kind in KINDS
        ):
            raise SeedDeltaError(
                f"{what} {self.path} (architecture '{self.arch}') has no dense FFN weights "
                "blk.N.ffn_gate/ffn_up/ffn_down.weight (MoE experts are not supported)"
            )

    # metadata ---------------------------------------------------------------------------------

    def get(self, key: str, default: Any = None) -> Any:
        fld = self.reader.fields.get(key)
        return default if fld is None else field_value(fld)

    def field_type(self, key: str) -> list[GGUFValueType] | None:
        fld = self.reader.fields.get(key)
        return None if fld is None else list(fld.types)

    def kv_keys(self) -> list[str]:
        return [k for k in self.reader.fields if not k.startswith("GGUF.")]

    def _arch_int(self, suffix: str, layer: int | None = None) -> int | None:
        value = self.get(f"{self.arch}.{suffix}") if self.arch else None
        if isinstance(value, list):
            if not value:
                return None
            value = value[layer if layer is not None and layer < len(value) else 0]
        if isinstance(value, bool) or not isinstance(value, int):
            return None
        return int(value)

    def _n_layer(self) -> int:
        from_names = [int(m.group(1)) for name in self.tensors if (m := BLK_NAME.match(name))]
        n = 1 + max(from_names) if from_names else 0
        kv = self._arch_int("block_count")
        return max(n, kv or 0)

    def _n_embd(self) -> int:
        kv = self._arch_int("embedding_length")
        if kv:
            return kv
        tok = self.tensors.get("token_embd.weight")
        if tok is not None:
            return _tensor_shape(tok)[0]
        for layer in range(self.n_layer):
            w = self.tensors.get(weight_name(layer, "ffn_gate"))
            if w is not None:
                return _tensor_shape(w)[0]
        return 0

    def _n_ff(self) -> int:
        kv = self._arch_int("feed_forward_length")
        if kv:
            return kv
        for layer in range(self.n_layer):
            w = self.tensors.get(weight_name(layer, "ffn_gate"))
            if w is not None:
                return _tensor_shape(w)[1]
        return 0

    def n_ff_of(self, layer: int) -> int:
        for kind, axis in (("ffn_gate", 1), ("ffn_up", 1), ("ffn_down", 0)):
            w = self.tensors.get(weight_name(layer, kind))
            if w is not None and len(w.shape) >= 2:
                return _tensor_shape(w)[axis]
        for kind in ("ffn_gate", "ffn_up"):
            for suffix in ("d_idx", "b_idx", "sdq_base"):
                t = self.tensors.get(seeddelta_tensor_name(layer, kind, suffix))
                if t is not None and len(t.shape) >= 2:
                    return _tensor_shape(t)[1]
        return self._arch_int("feed_forward_length", layer) or self.n_ff

    def weight_dims(self, layer: int, kind: str) -> tuple[int, int]:
        """(n_in, n_out) of a FFN weight, from the dense tensor or, if it was stripped, the model."""
        w = self.tensors.get(weight_name(layer, kind))
        if w is not None and len(w.shape) >= 2:
            shape = _tensor_shape(w)
            return shape[0], shape[1]
        n_ff = self.n_ff_of(layer)
        return (self.n_embd, n_ff) if kind != "ffn_down" else (n_ff, self.n_embd)

    # tensors ----------------------------------------------------------------------------------

    def has(self, name: str) -> bool:
        return name in self.tensors

    def _has_seeddelta(self, layer: int, kind: str) -> bool:
        return any(seeddelta_tensor_name(layer, kind, s) in self.tensors for s in SEEDDELTA_SUFFIXES)

    def seeddelta_tensor_names(self) -> list[str]:
        return [name for name in self.tensors if parse_seeddelta_name(name) is not None]

    def seeddelta_weights(self) -> list[tuple[int, str]]:
        """(layer, kind) of every weight that has at least one SeedΔ tensor, in build order."""
        found = {(p[0], p[1]) for name in self.tensors if (p := parse_seeddelta_name(name)) is not None}
        return sorted(found, key=lambda lk: (lk[0], KINDS.index(lk[1])))

    def tensor_type(self, name: str) -> GGMLQuantizationType:
        return GGMLQuantizationType(self.tensors[name].tensor_type)

    def tensor_nbytes(self, name: str) -> int:
        return tensor_nbytes(self.tensors[name])

    def array(self, name: str) -> np.ndarray:
        """A copy of a non-quantized tensor in numpy order with its stored dtype."""
        tensor = self.tensors[name]
        return np.array(tensor.data, copy=True)

    def dense(self, name: str, *, check_finite: bool = True) -> np.ndarray:
        """A 2-D tensor dequantized to float32 numpy (n_out, n_in); NaN/Inf is an error naming it."""
        tensor = self.tensors.get(name)
        if tensor is None:
            raise SeedDeltaError(f"{self.path}: tensor {name} not found")
        if len(tensor.shape) != 2:
            raise SeedDeltaError(f"{self.path}: tensor {name} is not 2-D (ggml shape {list(_tensor_shape(tensor))})")
        out = dequantize_tensor(tensor, self.path)
        # the copy is made: let the file's pages leave this process (a model of any size is read one
        # tensor at a time without its pages piling up in the resident set)
        drop_mapped_pages(self.reader.data, int(tensor.data_offset), int(tensor.n_bytes))
        if check_finite and not np.isfinite(out).all():
            bad = int(np.size(out) - np.count_nonzero(np.isfinite(out)))
            rows = np.nonzero(~np.isfinite(out).all(axis=1))[0]
            raise SeedDeltaError(
                f"{self.path}: tensor {name} contains {bad} NaN/Inf value(s) (first in output row {int(rows[0])})"
            )
        return out

    def ffn_weight(self, layer: int, kind: str) -> np.ndarray:
        return self.dense(weight_name(layer, kind))
