"""A SeedΔ file rewritten for stock llama.cpp: every SeedΔ weight reconstructed into a dense
`blk.N.<kind>.weight` exactly as the torch runtime's materialized mode computes it, everything else
copied as stored, the SeedΔ tensors and `seeddelta.*` keys dropped. A weight with a delta regime
(extension delta_regime/1: Δ for some tokens only) has no single dense form and is refused.

Ŵ is the float64 reconstruction of the stored arrays rounded once (`projections.materialize`) to
float32 for an F32 model and float16 otherwise (`model.materialized_dtype`): the same bits the torch
runtime multiplies, so both engines run one function. F16 rather than F32 for 16-bit and quantized
models: the rounding (≤ 2⁻¹¹ relative) is below the precision the model came with, llama.cpp's F16
matmul path is the one it takes for F16 models anyway, and a 7B model's FFN stays ~9 GB instead of
~19 GB. Written streamed (one Ŵ in memory at a time).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGMLQuantizationType

from seeddelta.errors import SeedDeltaError
from seeddelta.gguf_format.reader import GGUFModel
from seeddelta.gguf_format.schema import SEEDDELTA_SUFFIXES, seeddelta_tensor_name, weight_name
from seeddelta.gguf_format.seeddelta_tensors import StoredArray
from seeddelta.gguf_format.writer import LazyTensor, RawTensor, write_model_copy
from seeddelta.runtime.model import materialized_dtype
from seeddelta.runtime.projections import SeedDeltaPayload, materialize, parse_payload
from seeddelta.runtime.sdq_projections import SdqPayload


@dataclass(frozen=True)
class MaterializeResult:
    weights: int  # SeedΔ weights written dense
    dropped_tensors: int  # SeedΔ tensors (and dense weights they replaced) left out
    dropped_keys: int
    output_bytes: int


def _payload_arrays(model: GGUFModel, layer: int, kind: str) -> dict[str, StoredArray]:
    out: dict[str, StoredArray] = {}
    for suffix in SEEDDELTA_SUFFIXES:
        name = seeddelta_tensor_name(layer, kind, suffix)
        if model.has(name):
            if suffix == "sdq_base":  # a variant's base keeps its ggml type (any quantization)
                t = model.tensors[name]
                out[suffix] = RawTensor(model.array(name), GGMLQuantizationType(t.tensor_type), tuple(t.shape))
            else:
                out[suffix] = model.array(name)
    return out


def materialize_file(src: str | os.PathLike[str] | GGUFModel, out_path: str | os.PathLike[str], *,
                     use_seeddelta: bool = True) -> MaterializeResult:
    """Write `out_path` for stock llama.cpp (see the module docstring). With use_seeddelta=False the
    SeedΔ tensors are dropped and the dense weights kept (a stripped file is then an error)."""
    model = src if isinstance(src, GGUFModel) else GGUFModel(src, what="model")
    weights = model.seeddelta_weights()
    drop = set(model.seeddelta_tensor_names())
    added: list[LazyTensor] = []
    if use_seeddelta:
        for layer, kind in weights:
            n_in, n_out = model.weight_dims(layer, kind)
            name = f"blk.{layer}.{kind}"
            payload = parse_payload(name, _payload_arrays(model, layer, kind), n_in, n_out)
            if payload is None:  # seeddelta_weights() found a tensor, so parse_payload returns or raises
                raise SeedDeltaError(f"{model.path}: {name}: no SeedΔ tensors")
            if isinstance(payload, SeedDeltaPayload) and payload.regime is not None:
                raise SeedDeltaError(f"{model.path}: {name} applies Δ only for tokens in a regime (extension "
                                     "delta_regime/1): a token-dependent weight has no single dense form; run it "
                                     "with the torch runtime")
            dtype = materialized_dtype(model.tensors, layer, kind)
            np_dtype = np.dtype(np.float32) if dtype == torch.float32 else np.dtype(np.float16)

            def produce(payload: SeedDeltaPayload | SdqPayload = payload, dtype: torch.dtype = dtype) -> np.ndarray:
                return materialize(payload, dtype).numpy()

            added.append(LazyTensor(weight_name(layer, kind), (n_out, n_in), np_dtype, produce))
            drop.add(weight_name(layer, kind))
    else:
        stripped = [weight_name(layer, kind) for layer, kind in weights if not model.has(weight_name(layer, kind))]
        if stripped:
            raise SeedDeltaError(f"{model.path}: {stripped[0]} is stripped (seeddelta.strip_dense) and cannot run "
                                 "dense: SeedΔ is disabled")
    keys = {k for k in model.kv_keys() if k.startswith("seeddelta.")}
    write_model_copy(model, out_path, drop_tensors=drop, add_tensors=added, drop_keys=keys)
    return MaterializeResult(len(added), len([n for n in drop if model.has(n)]), len(keys), os.path.getsize(out_path))
