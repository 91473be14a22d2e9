"""Second moments of FFN inputs, XᵀX, for the activation-aware values of the variant sdq (`--refit full`).

Our own GGUF (no llama.cpp tool writes one): KV `general.type = "seeddelta.xtx"`, `xtx.datasets`
(array of strings), `xtx.chunk_count`, `xtx.chunk_size` (u32); per FFN input one tensor
`blk.N.<kind>.weight.in_xtx` (F32, n_in × n_in, Σ_t x_t x_tᵀ over every accumulated row, symmetric)
and `blk.N.<kind>.weight.counts` (F32 [1]: the number of rows), for kind ffn_gate (the input of
ffn_gate and ffn_up, which read the same vector) and ffn_down. `XtX.matrix` gives the mean E[x xᵀ].
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from gguf import GGUFValueType

from seeddelta.errors import SeedDeltaError
from seeddelta.gguf_format.reader import field_value, open_gguf
from seeddelta.gguf_format.writer import KV, new_writer, set_kv
from seeddelta.outputs import AtomicOutput

TYPE = "seeddelta.xtx"
XTX_SUFFIX = ".in_xtx"
COUNT_SUFFIX = ".counts"


def input_name(weight: str) -> str:
    """The weight whose input statistics `weight` uses: ffn_up reads ffn_gate's input."""
    return weight.replace(".ffn_up.", ".ffn_gate.")


@dataclass
class XtX:
    path: str
    reader: object  # the GGUFReader (memory-mapped); matrices are read on demand
    names: dict[str, tuple[object, int]]  # input weight name -> (in_xtx tensor, count)

    def matrix(self, weight: str, n_in: int) -> np.ndarray:
        """E[x xᵀ] (n_in, n_in) float64 at the input of `weight` (one SeedDeltaError line if absent or wrong)."""
        key = input_name(weight)
        entry = self.names.get(key)
        if entry is None:
            raise SeedDeltaError(f"XᵀX file {self.path} has no entry for {key} (it does not match the model)")
        tensor, count = entry
        data = np.asarray(tensor.data, dtype=np.float64)  # type: ignore[attr-defined]
        if data.shape != (n_in, n_in):
            raise SeedDeltaError(f"XᵀX file {self.path}: {key} is {data.shape}, the weight has {n_in} inputs")
        if count <= 0:
            raise SeedDeltaError(f"XᵀX file {self.path}: {key} has count {count} (no rows accumulated)")
        if not np.all(np.isfinite(data)):
            raise SeedDeltaError(f"XᵀX file {self.path}: {key} holds NaN/Inf")
        return data / count


def read_xtx(path: str | os.PathLike[str]) -> XtX:
    reader = open_gguf(path, "XᵀX")
    kind = reader.fields.get("general.type")
    if kind is None or field_value(kind) != TYPE:
        raise SeedDeltaError(f"{os.fspath(path)} is not an XᵀX file (general.type is not {TYPE!r}; "
                             "write one with seeddelta imatrix --xtx)")
    tensors = {t.name: t for t in reader.tensors}
    names: dict[str, tuple[object, int]] = {}
    for name, t in tensors.items():
        if name.endswith(XTX_SUFFIX):
            weight = name[: -len(XTX_SUFFIX)]
            c = tensors.get(weight + COUNT_SUFFIX)
            if c is None:
                raise SeedDeltaError(f"XᵀX file {os.fspath(path)}: {weight} has no counts tensor")
            names[weight] = (t, int(np.asarray(c.data).reshape(-1)[0]))
    return XtX(os.fspath(path), reader, names)


def write_xtx(path: str | os.PathLike[str], sums: Mapping[str, np.ndarray], counts: Mapping[str, int],
              datasets: Sequence[str], chunk_count: int, chunk_size: int) -> None:
    """Write Σ x xᵀ per input weight name (ffn_gate and ffn_down entries) atomically."""
    with AtomicOutput(path, "XᵀX") as out:
        writer = new_writer(out.tmp, "xtx", 32)
        set_kv(writer, KV("general.type", TYPE, GGUFValueType.STRING))
        set_kv(writer, KV("xtx.datasets", [str(d) for d in datasets], GGUFValueType.ARRAY, GGUFValueType.STRING))
        set_kv(writer, KV("xtx.chunk_count", int(chunk_count), GGUFValueType.UINT32))
        set_kv(writer, KV("xtx.chunk_size", int(chunk_size), GGUFValueType.UINT32))
        for name in sorted(sums):
            m = np.asarray(sums[name], dtype=np.float32)
            if m.ndim != 2 or m.shape[0] != m.shape[1]:
                raise SeedDeltaError(f"write_xtx: {name} must be a square matrix, got {m.shape}")
            writer.add_tensor(name + XTX_SUFFIX, np.ascontiguousarray(m))
            writer.add_tensor(name + COUNT_SUFFIX, np.array([int(counts[name])], dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
