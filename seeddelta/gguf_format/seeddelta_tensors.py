"""Reading SeedΔ files: which weights a GGUF holds as SeedΔ, their keys and stored arrays.

Works on files we write and on files the original wrote (same schema, spec-builder-runtime §8);
the arrays are read without decoding until `arrays()` or `read_seeddelta_weights` asks for them.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from gguf.constants import GGMLQuantizationType
from gguf.gguf_reader import ReaderTensor

from seeddelta.codec.encode import SeedDeltaWeight
from seeddelta.errors import SeedDeltaError
from seeddelta.gguf_format.reader import GGUFModel, _tensor_shape, field_value, tensor_nbytes
from seeddelta.gguf_format.schema import (
    SEEDDELTA_SUFFIXES,
    seeddelta_tensor_name,
    tensor_kv_prefix,
    weight_name,
)


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
    def scheme(self) -> str:
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
        return "d_row_scale" in self.tensors

    @property
    def nbytes(self) -> int:
        return sum(tensor_nbytes(t) for t in self.tensors.values())

    @property
    def stripped(self) -> bool:
        return not self.dense_present

    def dtypes(self) -> dict[str, str]:
        return {s: GGMLQuantizationType(t.tensor_type).name for s, t in self.tensors.items()}

    def arrays(self) -> dict[str, np.ndarray]:
        """Copies of the stored arrays in numpy order with their stored dtypes."""
        out: dict[str, np.ndarray] = {}
        for suffix, tensor in self.tensors.items():
            qtype = GGMLQuantizationType(tensor.tensor_type)
            if qtype not in (GGMLQuantizationType.F16, GGMLQuantizationType.F32,
                             GGMLQuantizationType.I16, GGMLQuantizationType.I32):
                raise SeedDeltaError(
                    f"tensor blk.{self.layer}.{self.kind}.{suffix} has type {qtype.name}; "
                    "SeedΔ tensors must be F16, F32, I16 or I32"
                )
            out[suffix] = np.array(tensor.data, copy=True)
        return out


def _per_tensor_kv(model: GGUFModel, layer: int, kind: str) -> dict[str, Any]:
    prefix = tensor_kv_prefix(layer, kind) + "."
    return {key[len(prefix):]: field_value(fld) for key, fld in model.reader.fields.items() if key.startswith(prefix)}


def seeddelta_entries(model: GGUFModel) -> list[SeedDeltaEntry]:
    """Every weight of `model` that carries SeedΔ tensors, in build order."""
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
        if entry.scheme == "none":
            raise SeedDeltaError(
                f"{model.path}: blk.{entry.layer}.{entry.kind} has SeedΔ tensors but no complete "
                "residual pair (d_idx+d_val or b_idx+b_val)"
            )
        if entry.scheme == "block":
            arrays.pop("d_idx", None)
            arrays.pop("d_val", None)
        try:
            weights[(entry.layer, entry.kind)] = SeedDeltaWeight.from_tensors(arrays, entry.n_in, entry.n_out)
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


