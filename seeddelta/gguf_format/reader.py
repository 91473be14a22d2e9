"""GGUF input/output for SeedΔ: read llama-like models, write SeedΔ files, read them back.

Everything goes through the `gguf` package (`GGUFReader`, `GGUFWriter`, `gguf.quants`); no
hand-written GGUF parsing. Conventions (spec-builder-runtime §1.2, §8):

* a dense weight `blk.N.T.weight` has ggml shape `ne = [n_in, n_out]`; we hand it out as a
  float32 numpy array `(n_out, n_in)` (one output per row);
* SeedΔ tensors are named `blk.N.T.<suffix>` with the suffixes of `SEEDDELTA_SUFFIXES` and
  written in the order of §8.1;
* writing copies every KV pair of the input byte-for-byte (its raw encoding, so value types
  are preserved exactly), then sets the `seeddelta.*` keys; every input tensor is copied
  byte-for-byte in its original type unless it is dropped (stripped dense weights, replaced
  SeedΔ tensors); the output is written to a temporary file next to the target and renamed.
"""

from __future__ import annotations

import os
import re
import stat
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf import GGUFReader, GGUFValueType, GGUFWriter
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.gguf_reader import ReaderField, ReaderTensor
from gguf.quants import dequantize

from seeddelta.errors import SeedDeltaError
from seeddelta.outputs import AtomicOutput, same_file

KINDS: tuple[str, ...] = ("ffn_gate", "ffn_up", "ffn_down")

# Output order of one weight's SeedΔ tensors (spec §8.1): residual idx, residual val, row scale, base.
SEEDDELTA_SUFFIXES: tuple[str, ...] = (
    "d_idx", "d_val", "b_idx", "b_val", "d_row_scale",
    "base_d1", "base_d2", "base_d3", "base_perm1", "base_perm2",
)
RESIDUAL_SUFFIXES: tuple[str, ...] = ("d_idx", "d_val", "b_idx", "b_val")

# Architectures whose loader in the original accepts SeedΔ tensors in the dense-FFN branch
# (spec §8.6), as spelled in GGUF's `general.architecture`. All are llama-like: per layer
# dense `ffn_gate`, `ffn_up`, `ffn_down`.
SUPPORTED_ARCHITECTURES: tuple[str, ...] = (
    "llama", "refact", "minicpm", "granite", "granitemoe", "mistral3", "llama-embed",
    "baichuan", "qwen2", "qwen2vl", "dream", "gemma2", "gemma3", "gemma-embedding",
)

_SEEDDELTA_NAME = re.compile(
    r"^blk\.(\d+)\.(ffn_gate|ffn_up|ffn_down)\.(" + "|".join(SEEDDELTA_SUFFIXES) + r")$"
)
_BLK_NAME = re.compile(r"^blk\.(\d+)\.")


def weight_name(layer: int, kind: str) -> str:
    return f"blk.{layer}.{kind}.weight"


def seeddelta_tensor_name(layer: int, kind: str, suffix: str) -> str:
    return f"blk.{layer}.{kind}.{suffix}"


def tensor_kv_prefix(layer: int, kind: str) -> str:
    return f"seeddelta.blk.{layer}.{kind}"


def parse_seeddelta_name(name: str) -> tuple[int, str, str] | None:
    """(layer, kind, suffix) of a SeedΔ tensor name, None for any other name."""
    match = _SEEDDELTA_NAME.match(name)
    if match is None:
        return None
    return int(match.group(1)), match.group(2), match.group(3)


def _p(path: str | os.PathLike[str]) -> str:
    return os.fspath(path)


# --------------------------------------------------------------------------------------------
# Opening and validating
# --------------------------------------------------------------------------------------------


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
    try:
        reader = GGUFReader(p, "r")
    except Exception as exc:  # the reader raises ValueError/IndexError/KeyError/... on damage
        raise SeedDeltaError(f"{what} {p} is a truncated or corrupt GGUF ({type(exc).__name__}: {exc})") from None
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
    # parts = [key length, key bytes, type tag, value parts...], all views of the file in order.
    return b"".join(part.tobytes() for part in fld.parts[2:])


def _tensor_shape(tensor: ReaderTensor) -> tuple[int, ...]:
    return tuple(int(d) for d in tensor.shape)


def tensor_nbytes(tensor: ReaderTensor) -> int:
    return int(tensor.n_bytes)


class GGUFModel:
    """A GGUF model opened read-only (memory-mapped; the file is never modified)."""

    def __init__(self, path: str | os.PathLike[str], *, require_llama: bool = True, what: str = "input") -> None:
        self.path = _p(path)
        self.reader = open_gguf(self.path, what)
        self.file_size = os.path.getsize(self.path)
        self.tensors: dict[str, ReaderTensor] = {t.name: t for t in self.reader.tensors}
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
        from_names = [int(m.group(1)) for name in self.tensors if (m := _BLK_NAME.match(name))]
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
            for suffix in ("d_idx", "b_idx"):
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
        shape = _tensor_shape(tensor)
        if len(shape) != 2:
            raise SeedDeltaError(f"{self.path}: tensor {name} is not 2-D (ggml shape {list(shape)})")
        qtype = GGMLQuantizationType(tensor.tensor_type)
        try:
            values = dequantize(tensor.data, qtype)
        except NotImplementedError:
            raise SeedDeltaError(
                f"{self.path}: tensor {name} has type {qtype.name}, which gguf cannot dequantize"
            ) from None
        out = np.array(values, dtype=np.float32, copy=True).reshape(shape[1], shape[0])
        if check_finite and not np.isfinite(out).all():
            bad = int(np.size(out) - np.count_nonzero(np.isfinite(out)))
            rows = np.nonzero(~np.isfinite(out).all(axis=1))[0]
            raise SeedDeltaError(
                f"{self.path}: tensor {name} contains {bad} NaN/Inf value(s) (first in output row {int(rows[0])})"
            )
        return out

    def ffn_weight(self, layer: int, kind: str) -> np.ndarray:
        return self.dense(weight_name(layer, kind))



# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


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


def _new_writer(path: str, arch: str, alignment: int) -> _Writer:
    writer = _Writer(path, arch)
    writer.kv_data[0].clear()  # the caller decides every key, including general.architecture
    writer.data_alignment = int(alignment)
    return writer


def _set_kv(writer: GGUFWriter, kv: KV) -> None:
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


def _tensor_for_copy(tensor: ReaderTensor) -> tuple[np.ndarray, GGMLQuantizationType]:
    return tensor.data, GGMLQuantizationType(tensor.tensor_type)


def write_model_copy(
    src: GGUFModel,
    out_path: str | os.PathLike[str],
    *,
    drop_tensors: Iterable[str] = (),
    add_tensors: Sequence[tuple[str, np.ndarray]] = (),
    drop_keys: Iterable[str] = (),
    set_keys: Sequence[KV] = (),
) -> None:
    """Write `src` to `out_path` atomically: its KV pairs (minus `drop_keys`) copied byte-for-byte,
    then `set_keys`; its tensors (minus `drop_tensors`) copied byte-for-byte in their original
    order and type, then `add_tensors` (numpy order; dtype float16/float32/int16/int32) in the
    given order. The alignment of `src` is kept."""
    drop_t = set(drop_tensors)
    drop_k = set(drop_keys)
    if same_file(src.path, out_path):
        raise SeedDeltaError(f"output {_p(out_path)} is the input file; choose another -o")
    out = AtomicOutput(out_path)
    try:
        writer = _new_writer(out.tmp, src.arch, src.alignment)
        from gguf.gguf_writer import GGUFValue

        for key, fld in src.reader.fields.items():
            if key.startswith("GGUF.") or key in drop_k:
                continue
            writer.kv_data[0][key] = GGUFValue(value=_RawKV(field_raw_value(fld)), type=fld.types[0])
        for kv in set_keys:
            _set_kv(writer, kv)
        names = set()
        for tensor in src.reader.tensors:
            if tensor.name in drop_t:
                continue
            data, qtype = _tensor_for_copy(tensor)
            writer.add_tensor(tensor.name, data, raw_dtype=qtype)
            names.add(tensor.name)
        for name, array in add_tensors:
            if name in names:
                raise SeedDeltaError(f"internal: tensor {name} would be written twice")
            arr = np.ascontiguousarray(array)
            if arr.dtype not in (np.float16, np.float32, np.int16, np.int32):
                raise SeedDeltaError(f"internal: tensor {name} has unsupported dtype {arr.dtype}")
            writer.add_tensor(name, arr)
            names.add(name)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        out.commit()
    except OSError as exc:
        raise SeedDeltaError(f"cannot write {_p(out_path)}: {exc.strerror or exc}") from None
    finally:
        out.discard()


def iter_kv(model: GGUFModel) -> Iterator[tuple[str, Any, list[GGUFValueType]]]:
    for key, fld in model.reader.fields.items():
        if not key.startswith("GGUF."):
            yield key, field_value(fld), list(fld.types)


def quant_block(qtype: GGMLQuantizationType) -> tuple[int, int]:
    """(elements per block, bytes per block) of a ggml type."""
    return GGML_QUANT_SIZES[qtype]


def file_size(path: str | os.PathLike[str]) -> int:
    return os.stat(_p(path)).st_size


def file_fingerprint(path: str | os.PathLike[str]) -> tuple[int, int, int]:
    """(size, mtime_ns, inode) — used to prove an input was not modified."""
    st = os.stat(_p(path))
    return st.st_size, st.st_mtime_ns, st.st_ino if stat.S_ISREG(st.st_mode) else 0


def describe_types(model: GGUFModel) -> Mapping[str, int]:
    """Tensor count per ggml type name."""
    counts: dict[str, int] = {}
    for t in model.reader.tensors:
        name = GGMLQuantizationType(t.tensor_type).name
        counts[name] = counts.get(name, 0) + 1
    return counts


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


__all__ = [
    "KINDS", "KV", "SEEDDELTA_SUFFIXES", "RESIDUAL_SUFFIXES", "SUPPORTED_ARCHITECTURES",
    "GGUFModel", "field_value", "file_fingerprint", "file_size", "open_gguf",
    "parse_seeddelta_name", "seeddelta_tensor_name", "tensor_kv_prefix", "weight_name",
    "write_model_copy"
]
