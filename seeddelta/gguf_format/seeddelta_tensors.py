"""Reading SeedΔ files: which weights a GGUF holds as SeedΔ, their keys and stored arrays, and the one
validation of those arrays (`check_seeddelta_arrays`) that the runtime's loader, `inspect` and
`read_seeddelta_file` all run before using them.

Works on files we write and on files the original wrote (same schema, spec-builder-runtime §8);
the arrays are read without decoding until `arrays()` or `read_seeddelta_weights` asks for them.

Validation (the original's runtime skips out-of-range entries and computes on NaN; we refuse the
file, because a skipped entry or a NaN changes the function computed without a word):

* dtypes — indices and permutations I16/I32, values, scales and diagonals F16/F32;
* shapes — `d_idx`/`d_val` (n_out, K); `b_idx` (n_out, nb) and `b_val` (n_out, nb, block);
  `d_row_scale` (n_out,); every `base_*` (B, L) like `base_d1` (B = 1 may be stored 1-D), L a power
  of two >= min(n_in, n_out), B >= ceil(max(n_in, n_out) / L); a residual pair complete;
* indices — every `d_idx` in 0 <= i < n_in, every `b_idx` in 0 <= j < ceil(n_in / block);
* permutations — every block's `base_perm1`/`base_perm2` a permutation of 0 … L-1;
* values — `d_val`, `b_val`, `d_row_scale` and the base diagonals finite (no NaN/Inf).

A weight of the variant `sdq` (residual over a quantized base, docs/file-format.md) holds only `sdq_*`
tensors (`check_sdq_arrays`): mixing them with plain SeedΔ tensors is refused. Which variant and
extension version a file uses is checked when it is opened (`GGUFModel`, `schema.extension_problem`).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from gguf.constants import GGMLQuantizationType
from gguf.gguf_reader import ReaderTensor

from seeddelta.codec.encode import SeedDeltaWeight
from seeddelta.codec.partial import check_dense_rows
from seeddelta.codec.regime import check_regime_tensors
from seeddelta.codec.sdq import sdq_from_tensors
from seeddelta.errors import SeedDeltaError
from seeddelta.gguf_format.extensions import EXTENSIONS_KEY, check_extensions
from seeddelta.gguf_format.reader import GGUFModel, _tensor_shape, field_value, tensor_nbytes
from seeddelta.gguf_format.schema import (
    PLAIN_SUFFIXES,
    SDQ_SUFFIXES,
    SEEDDELTA_SUFFIXES,
    seeddelta_tensor_name,
    tensor_kv_prefix,
    variant_of_suffix,
    weight_name,
)
from seeddelta.gguf_format.sdq_tensors import check_sdq_arrays
from seeddelta.gguf_format.writer import RawTensor

StoredArray = np.ndarray | RawTensor  # RawTensor: a variant's quantized base (its ggml type travels with it)
_PLAIN_TYPES = (GGMLQuantizationType.F16, GGMLQuantizationType.F32, GGMLQuantizationType.I16,
                GGMLQuantizationType.I32)


@dataclass
class SeedDeltaEntry:
    """What a SeedΔ file holds for one weight (layer, kind), read without decoding the arrays."""

    layer: int
    kind: str
    n_in: int
    n_out: int
    tensors: dict[str, ReaderTensor]  # suffix -> tensor
    dense_present: bool
    dense_type: str | None
    dense_nbytes: int
    kv: dict[str, Any] = field(default_factory=dict)  # per-tensor keys without the prefix

    @property
    def variant(self) -> str | None:
        """The variant family of this weight's tensors (None: plain SeedΔ)."""
        return next((v for s in self.tensors if (v := variant_of_suffix(s)) is not None), None)

    @property
    def coding(self) -> str:
        """Residual coding of a variant weight: coo, c8 (compact) or none (base alone)."""
        if "sdq_coff" in self.tensors:
            return "c8"
        return "coo" if "sdq_idx" in self.tensors else "none"

    @property
    def base_type(self) -> str | None:
        t = self.tensors.get("sdq_base")
        return None if t is None else GGMLQuantizationType(t.tensor_type).name

    @property
    def scheme(self) -> str:
        if self.variant is not None:
            return "coo" if self.coding != "none" else "none"
        if "b_idx" in self.tensors and "b_val" in self.tensors:
            return "block"  # the runtime prefers block when both are present (§8.2)
        if "d_idx" in self.tensors and "d_val" in self.tensors:
            return "coo"
        return "none"

    @property
    def block(self) -> int:
        if self.scheme == "block":
            return _tensor_shape(self.tensors["b_val"])[0]
        return 0

    @property
    def n_blocks(self) -> int:
        if self.scheme == "block":
            return _tensor_shape(self.tensors["b_idx"])[0]
        return 0

    @property
    def K(self) -> int:
        if self.scheme == "block":
            return self.n_blocks * self.block
        if self.variant is not None:
            key = {"c8": "sdq_coff", "coo": "sdq_idx"}.get(self.coding)
            return _tensor_shape(self.tensors[key])[0] if key is not None else 0
        if self.scheme == "coo":
            return _tensor_shape(self.tensors["d_idx"])[0]
        return 0

    @property
    def has_base(self) -> bool:
        return "base_d1" in self.tensors

    @property
    def base_L(self) -> int:
        return _tensor_shape(self.tensors["base_d1"])[0] if self.has_base else 0

    @property
    def base_B(self) -> int:
        if not self.has_base:
            return 0
        shape = _tensor_shape(self.tensors["base_d1"])
        return shape[1] if len(shape) > 1 else 1

    @property
    def row_scale(self) -> bool:
        return "d_row_scale" in self.tensors or "sdq_scale" in self.tensors

    @property
    def nbytes(self) -> int:
        return sum(tensor_nbytes(t) for t in self.tensors.values())

    @property
    def stripped(self) -> bool:
        return not self.dense_present

    def dtypes(self) -> dict[str, str]:
        return {s: GGMLQuantizationType(t.tensor_type).name for s, t in self.tensors.items()}

    def arrays(self) -> dict[str, StoredArray]:
        """Copies of the stored arrays in numpy order with their stored dtypes (a variant's base as a RawTensor)."""
        return {suffix: _copy(a) for suffix, a in self.views().items()}

    def views(self) -> dict[str, StoredArray]:
        """The stored arrays as read-only views of the file (nothing is copied into memory)."""
        out: dict[str, StoredArray] = {}
        for suffix, tensor in self.tensors.items():
            out[suffix] = stored_array(f"blk.{self.layer}.{self.kind}", suffix, tensor)
        return out


def _copy(a: StoredArray) -> StoredArray:
    if isinstance(a, RawTensor):
        return RawTensor(np.array(a.data, copy=True), a.tensor_type, a.shape)
    return np.array(a, copy=True)


def stored_array(name: str, suffix: str, tensor: ReaderTensor) -> StoredArray:
    """One SeedΔ tensor of the file as the validators take it: a numpy view in numpy order, or — for a
    variant's base — a RawTensor carrying its ggml type. A plain SeedΔ tensor must be F16/F32/I16/I32,
    a variant's byte tensors I8 (one SeedDeltaError line otherwise)."""
    qtype = GGMLQuantizationType(tensor.tensor_type)
    if suffix == "sdq_base":
        return RawTensor(np.asarray(tensor.data), qtype, tuple(int(d) for d in tensor.shape))
    allowed = _PLAIN_TYPES + ((GGMLQuantizationType.I8,) if suffix in SDQ_SUFFIXES else ())
    if qtype not in allowed:
        raise SeedDeltaError(f"tensor {name}.{suffix} has type {qtype.name}; this SeedΔ tensor must be "
                             f"{', '.join(t.name for t in allowed)}")
    return np.asarray(tensor.data)


_INT_DTYPES = (np.dtype(np.int16), np.dtype(np.int32))
_FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32))


def _bad(name: str, suffix: str, problem: str) -> SeedDeltaError:
    return SeedDeltaError(f"SeedΔ tensor {name}.{suffix}: {problem}")


def _first(mask: np.ndarray) -> tuple[int, ...]:
    return tuple(int(i) for i in np.argwhere(mask)[0])


def _check_dtype(name: str, suffix: str, a: np.ndarray, allowed: tuple[np.dtype, ...]) -> None:
    if a.dtype not in allowed:
        raise _bad(name, suffix, f"dtype {a.dtype} not accepted (expected {'/'.join(str(d) for d in allowed)})")


def _check_finite(name: str, suffix: str, a: np.ndarray) -> None:
    finite = np.isfinite(a)
    if not finite.all():
        raise _bad(name, suffix, f"{int(a.size - np.count_nonzero(finite))} NaN/Inf value(s) "
                   f"(first at {list(_first(~finite))})")


def _check_range(name: str, suffix: str, idx: np.ndarray, hi: int, what: str) -> None:
    i = idx.astype(np.int64)
    bad = (i < 0) | (i >= hi)
    if bad.any():
        at = _first(bad)
        raise _bad(name, suffix, f"{int(bad.sum())} index value(s) outside 0 <= i < {what} = {hi} "
                   f"(first at row {at[0]}: {int(i[at])})")


def _check_permutation(name: str, suffix: str, perm: np.ndarray, L: int) -> None:
    """Every row (block) must hold each of 0 … L-1 exactly once."""
    ok = (np.sort(perm.astype(np.int64), axis=1) == np.arange(L, dtype=np.int64)[None, :]).all(axis=1)
    if not ok.all():
        b = int(np.flatnonzero(~ok)[0])
        row = perm[b].astype(np.int64)
        outside = row[(row < 0) | (row >= L)]
        why = (f"value {int(outside[0])} outside 0 … {L - 1}" if outside.size
               else f"value {int(np.flatnonzero(np.bincount(row, minlength=L) > 1)[0])} repeated")
        raise _bad(name, suffix, f"block {b} is not a permutation of 0 … {L - 1} ({why}; "
                   f"{int((~ok).sum())} of {ok.size} block(s) invalid)")


def check_seeddelta_arrays(name: str, arrays: Mapping[str, StoredArray | None], n_in: int, n_out: int) -> None:
    """Validate the SeedΔ tensors of one weight (`name` like "blk.3.ffn_gate"; keys = suffixes as stored,
    numpy order): one SeedDeltaError naming the tensor and the problem, see the module docstring."""
    given = {k: v for k, v in arrays.items() if k in SEEDDELTA_SUFFIXES and v is not None}
    if not given:
        return
    variant = {k: v for k, v in given.items() if k in SDQ_SUFFIXES}
    if variant:
        plain_too = sorted(k for k in given if k in PLAIN_SUFFIXES)
        if plain_too:
            raise _bad(name, plain_too[0], f"plain SeedΔ tensor next to variant sdq tensors "
                       f"({', '.join(sorted(variant))}); a weight holds one or the other")
        check_sdq_arrays(name, variant, n_in, n_out)
        return
    present: dict[str, np.ndarray] = {}
    for k, v in given.items():
        if isinstance(v, RawTensor):
            raise _bad(name, k, f"type {v.tensor_type.name} not accepted (expected F16/F32/I16/I32)")
        present[k] = v

    def pair(idx_key: str, val_key: str, what: str) -> bool:
        if idx_key not in present and val_key not in present:
            return False
        if idx_key not in present or val_key not in present:
            missing = val_key if idx_key in present else idx_key
            raise _bad(name, missing, f"missing ({what} residual needs both {idx_key} and {val_key})")
        _check_dtype(name, idx_key, present[idx_key], _INT_DTYPES)
        _check_dtype(name, val_key, present[val_key], _FLOAT_DTYPES)
        return True

    has_coo = pair("d_idx", "d_val", "COO")
    if has_coo:
        d_idx, d_val = present["d_idx"], present["d_val"]
        if d_idx.ndim != 2 or d_idx.shape != d_val.shape or d_idx.shape[0] != n_out:
            raise _bad(name, "d_idx", f"shapes d_idx {d_idx.shape} / d_val {d_val.shape}, expected equal "
                       f"(n_out={n_out}, K)")
        _check_range(name, "d_idx", d_idx, n_in, "n_in")
        _check_finite(name, "d_val", d_val)
    has_block = pair("b_idx", "b_val", "block")
    if has_block:
        b_idx, b_val = present["b_idx"], present["b_val"]
        if b_idx.ndim != 2 or b_val.ndim != 3 or b_val.shape[:2] != b_idx.shape or b_idx.shape[0] != n_out:
            raise _bad(name, "b_idx", f"shapes b_idx {b_idx.shape} / b_val {b_val.shape}, expected (n_out={n_out}, "
                       "nb) and (n_out, nb, block)")
        if b_val.shape[2] < 1:
            raise _bad(name, "b_val", "block size 0")
        _check_range(name, "b_idx", b_idx, math.ceil(n_in / b_val.shape[2]), "the number of blocks")
        _check_finite(name, "b_val", b_val)
    if not has_coo and not has_block:
        first = sorted(present)[0]
        raise _bad(name, first, f"{'/'.join(sorted(present))} present without residual tensors (d_idx/d_val or "
                   "b_idx/b_val)")

    if "dr_idx" in present or "dr_val" in present:
        if "dr_idx" not in present or "dr_val" not in present:
            missing = "dr_val" if "dr_idx" in present else "dr_idx"
            raise _bad(name, missing, "missing (dense rows need both dr_idx and dr_val)")
        check_dense_rows(name, present["dr_idx"], present["dr_val"], n_in, n_out)

    if "rg_stat" in present or "rg_lim" in present:
        if "rg_stat" not in present or "rg_lim" not in present:
            missing = "rg_lim" if "rg_stat" in present else "rg_stat"
            raise _bad(name, missing, "missing (a delta regime needs both rg_stat and rg_lim)")
        check_regime_tensors(name, present["rg_stat"], present["rg_lim"])

    row_scale = present.get("d_row_scale")
    if row_scale is not None:
        _check_dtype(name, "d_row_scale", row_scale, _FLOAT_DTYPES)
        if row_scale.ndim != 1 or row_scale.shape[0] != n_out:
            raise _bad(name, "d_row_scale", f"shape {row_scale.shape}, expected ({n_out},)")
        _check_finite(name, "d_row_scale", row_scale)

    base_keys = sorted(k for k in present if k.startswith("base_"))
    if not base_keys:
        return
    if "base_d1" not in present:
        raise _bad(name, "base_d1", f"missing but {', '.join(base_keys)} present")

    def as2d(key: str) -> np.ndarray:
        a = present[key]
        return a.reshape(1, -1) if a.ndim == 1 else a  # B == 1 may be stored 1-D (§12.2)

    _check_dtype(name, "base_d1", present["base_d1"], _FLOAT_DTYPES)
    d1 = as2d("base_d1")
    if d1.ndim != 2:
        raise _bad(name, "base_d1", f"shape {present['base_d1'].shape}, expected (B, L)")
    B, L = d1.shape
    need_l = min(n_in, n_out)
    need_b = math.ceil(max(n_in, n_out) / L) if L > 0 else 0
    if L < 1 or (L & (L - 1)) or L < need_l or B < need_b:
        raise _bad(name, "base_d1", f"shape (B={B}, L={L}) invalid for n_in={n_in}, n_out={n_out} "
                   f"(L must be a power of two >= {need_l}, B >= ceil(max/L))")
    for key in base_keys:
        a = as2d(key)
        if key != "base_d1":
            _check_dtype(name, key, present[key], _INT_DTYPES if "perm" in key else _FLOAT_DTYPES)
            if a.shape != d1.shape:
                raise _bad(name, key, f"shape {present[key].shape}, expected {d1.shape} like base_d1")
        if "perm" in key:
            _check_permutation(name, key, a, L)
        else:
            _check_finite(name, key, a)


def entry_problem(entry: SeedDeltaEntry) -> str | None:
    """Why the stored tensors of `entry` cannot run (None: they are valid)."""
    try:
        check_seeddelta_arrays(f"blk.{entry.layer}.{entry.kind}", entry.views(), entry.n_in, entry.n_out)
    except SeedDeltaError as exc:
        return str(exc)
    return None


def check_seeddelta_file(model: GGUFModel) -> None:
    """Every SeedΔ weight of an opened file valid, or one SeedDeltaError naming the file, tensor and problem.
    Reads the arrays through the memory map (no copy), so it can run before a load is measured."""
    for entry in seeddelta_entries(model):
        problem = entry_problem(entry)
        if problem is not None:
            raise SeedDeltaError(f"{model.path}: {problem}")


def _per_tensor_kv(model: GGUFModel, layer: int, kind: str) -> dict[str, Any]:
    prefix = tensor_kv_prefix(layer, kind) + "."
    return {key[len(prefix):]: field_value(fld) for key, fld in model.reader.fields.items() if key.startswith(prefix)}


def seeddelta_entries(model: GGUFModel) -> list[SeedDeltaEntry]:
    """Every weight of `model` that carries SeedΔ tensors, in build order (a file using a SeedΔ extension
    this reader does not know is refused, gguf_format.extensions)."""
    check_extensions(model.get(EXTENSIONS_KEY), (n.rsplit(".", 1)[-1] for n in model.tensors), model.path)
    entries: list[SeedDeltaEntry] = []
    for layer, kind in model.seeddelta_weights():
        tensors = {
            s: model.tensors[seeddelta_tensor_name(layer, kind, s)]
            for s in SEEDDELTA_SUFFIXES
            if seeddelta_tensor_name(layer, kind, s) in model.tensors
        }
        dense = model.tensors.get(weight_name(layer, kind))
        n_in, n_out = model.weight_dims(layer, kind)
        for suffix in ("d_idx", "b_idx"):
            if dense is None and suffix in tensors and len(tensors[suffix].shape) >= 2:
                n_out = _tensor_shape(tensors[suffix])[1]
        entries.append(SeedDeltaEntry(
            layer=layer, kind=kind, n_in=n_in, n_out=n_out, tensors=tensors,
            dense_present=dense is not None,
            dense_type=GGMLQuantizationType(dense.tensor_type).name if dense is not None else None,
            dense_nbytes=tensor_nbytes(dense) if dense is not None else 0,
            kv=_per_tensor_kv(model, layer, kind),
        ))
    return entries


def global_seeddelta_kv(model: GGUFModel) -> dict[str, Any]:
    """The global `seeddelta.*` keys (not the per-tensor `seeddelta.blk.*` ones)."""
    return {
        key: field_value(fld) for key, fld in model.reader.fields.items()
        if key.startswith("seeddelta.") and not key.startswith("seeddelta.blk.")
    }


@dataclass
class SeedDeltaFile:
    path: str
    weights: dict[tuple[int, str], SeedDeltaWeight]
    entries: dict[tuple[int, str], SeedDeltaEntry]
    global_kv: dict[str, Any]
    tensor_kv: dict[tuple[int, str], dict[str, Any]]


def read_seeddelta_file(path: str | os.PathLike[str]) -> SeedDeltaFile:
    """Read every SeedΔ weight of a file (ours or the original's) as codec objects plus its keys."""
    model = GGUFModel(path, require_llama=False)
    entries = seeddelta_entries(model)
    weights: dict[tuple[int, str], SeedDeltaWeight] = {}
    for entry in entries:
        arrays = entry.arrays()
        if entry.variant is not None:
            try:
                check_seeddelta_arrays(f"blk.{entry.layer}.{entry.kind}", arrays, entry.n_in, entry.n_out)
            except SeedDeltaError as exc:
                raise SeedDeltaError(f"{model.path}: {exc}") from None
            base = arrays["sdq_base"]
            assert isinstance(base, RawTensor)
            plain = {k: v for k, v in arrays.items() if not isinstance(v, RawTensor)}
            plain["sdq_base"] = base.data
            weights[(entry.layer, entry.kind)] = sdq_from_tensors(plain, base.tensor_type, entry.n_in, entry.n_out)
            continue
        if entry.scheme == "none":
            raise SeedDeltaError(
                f"{model.path}: blk.{entry.layer}.{entry.kind} has SeedΔ tensors but no complete "
                "residual pair (d_idx+d_val or b_idx+b_val)"
            )
        try:
            check_seeddelta_arrays(f"blk.{entry.layer}.{entry.kind}", arrays, entry.n_in, entry.n_out)
        except SeedDeltaError as exc:
            raise SeedDeltaError(f"{model.path}: {exc}") from None
        if entry.scheme == "block":
            arrays.pop("d_idx", None)
            arrays.pop("d_val", None)
        plain_arrays = {k: v for k, v in arrays.items() if isinstance(v, np.ndarray)}
        try:
            weights[(entry.layer, entry.kind)] = SeedDeltaWeight.from_tensors(plain_arrays, entry.n_in, entry.n_out)
        except (SeedDeltaError, ValueError, IndexError) as exc:  # malformed shapes from a foreign writer
            raise SeedDeltaError(f"{model.path}: blk.{entry.layer}.{entry.kind}: invalid SeedΔ tensors ({exc})") from None
    return SeedDeltaFile(
        path=model.path,
        weights=weights,
        entries={(e.layer, e.kind): e for e in entries},
        global_kv=global_seeddelta_kv(model),
        tensor_kv={(e.layer, e.kind): dict(e.kv) for e in entries},
    )


def read_seeddelta_weights(path: str | os.PathLike[str]) -> dict[tuple[int, str], SeedDeltaWeight]:
    """(layer, kind) -> SeedDeltaWeight for every SeedΔ weight in the file."""
    return read_seeddelta_file(path).weights


def read_seeddelta_kv(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[tuple[int, str], dict[str, Any]]]:
    """(global seeddelta.* keys, per-weight keys without their `seeddelta.blk.N.T.` prefix)."""
    model = GGUFModel(path, require_llama=False)
    per = {(e.layer, e.kind): dict(e.kv) for e in seeddelta_entries(model)}
    # keys of weights whose tensors are gone (e.g. rejected by gating) are still listed
    pattern = re.compile(r"^seeddelta\.blk\.(\d+)\.(ffn_gate|ffn_up|ffn_down)\.(.+)$")
    for key, fld in model.reader.fields.items():
        m = pattern.match(key)
        if m:
            per.setdefault((int(m.group(1)), m.group(2)), {})[m.group(3)] = field_value(fld)
    return global_seeddelta_kv(model), per


