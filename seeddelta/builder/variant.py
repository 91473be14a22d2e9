"""Encoding one weight as a SeedΔ variant (today: `sdq`, a residual over a quantized base).

The builder's encode phase calls `encode_variant` instead of the plain codec when a weight's
`VariantSpec` (the command line's, or a version-2 policy's per tensor) names a variant. The extra
inputs a variant may read — the XᵀX file of `--refit full`, the GGUF of `--quant-base-from` — are
opened once per path and shared by every weight (and worker thread) of the build.
"""

from __future__ import annotations

import functools
import threading

import numpy as np
from gguf.constants import GGMLQuantizationType

from seeddelta.builder.options import BASE_FROM_FILE, BuildOptions, VariantSpec
from seeddelta.codec.sdq import SdqConfig, SdqWeight, encode_sdq
from seeddelta.errors import SeedDeltaError
from seeddelta.gguf_format.reader import GGUFModel
from seeddelta.gguf_format.xtx_file import XtX, read_xtx

_LOCK = threading.Lock()


@functools.lru_cache(maxsize=4)
def _xtx(path: str) -> XtX:
    return read_xtx(path)


@functools.lru_cache(maxsize=4)
def _quant_source(path: str) -> GGUFModel:
    return GGUFModel(path, what="--quant-base-from")


def xtx_file(path: str) -> XtX:
    with _LOCK:
        return _xtx(path)


def quant_source(path: str) -> GGUFModel:
    with _LOCK:
        return _quant_source(path)


def stored_base(opts: BuildOptions, name: str, n_in: int, n_out: int) -> tuple[np.ndarray, GGMLQuantizationType]:
    """The stored form and type of `name` in --quant-base-from (it must be the same weight's shape)."""
    if opts.quant_base_from is None:
        raise SeedDeltaError(f"{name}: base type 'file' needs --quant-base-from")
    src = quant_source(opts.quant_base_from)
    tensor = src.tensors.get(name)
    if tensor is None:
        raise SeedDeltaError(f"--quant-base-from {src.path} has no tensor {name}")
    shape = tuple(int(d) for d in tensor.shape)
    if shape != (n_in, n_out):
        raise SeedDeltaError(f"--quant-base-from {src.path}: {name} has ggml shape {list(shape)}, the model's is "
                             f"[{n_in}, {n_out}]")
    return np.array(tensor.data), GGMLQuantizationType(tensor.tensor_type)


def sdq_config(opts: BuildOptions, spec: VariantSpec, K: int, row_scale: bool, seed: int) -> SdqConfig:
    return SdqConfig(K=K, base_type=spec.base_type, quantizer=spec.quantizer, rotate=spec.rotate,
                     holdout=spec.holdout, coding=spec.coding, refit=spec.refit, row_scale=row_scale,
                     idx_type=opts.idx_type, val_type=opts.val_type, seed=seed)


def encode_variant(opts: BuildOptions, spec: VariantSpec, name: str, W: np.ndarray, K: int, row_scale: bool,
                   seed: int, scale: np.ndarray | None) -> SdqWeight:
    """One weight encoded as the variant `spec` names."""
    if spec.name != "sdq":
        raise SeedDeltaError(f"internal: unknown variant {spec.name!r}")
    n_out, n_in = W.shape
    xtx = None
    if spec.refit == "full" or spec.quantizer == "gptq":
        if opts.xtx is None:
            raise SeedDeltaError(f"{name}: refit full and quantizer gptq need --xtx FILE (seeddelta imatrix --xtx)")
        xtx = xtx_file(opts.xtx).matrix(name, n_in)
    base = stored_base(opts, name, n_in, n_out) if spec.base_type == BASE_FROM_FILE else None
    return encode_sdq(W, sdq_config(opts, spec, K, row_scale, seed), scale, xtx, base)


def check_variant_inputs(opts: BuildOptions, spec: VariantSpec, name: str, n_in: int, n_out: int) -> None:
    """Everything a variant weight will need, checked before any work (one SeedDeltaError line)."""
    if not spec.is_variant:
        return
    problem = spec.problem()
    if problem is not None:
        raise SeedDeltaError(f"{name}: {problem}")
    if spec.base_type == BASE_FROM_FILE:
        stored_base(opts, name, n_in, n_out)
    else:
        from seeddelta.codec.quant_base import check_base_type

        try:
            check_base_type(spec.base_type, n_in)
        except SeedDeltaError as exc:
            raise SeedDeltaError(f"{name}: {exc}") from None
    if spec.refit == "full" or spec.quantizer == "gptq":
        if opts.xtx is None:
            raise SeedDeltaError(f"{name}: refit full and quantizer gptq need --xtx FILE (seeddelta imatrix --xtx)")
        x = xtx_file(opts.xtx)
        from seeddelta.gguf_format.xtx_file import input_name

        if input_name(name) not in x.names:
            raise SeedDeltaError(f"XᵀX file {x.path} has no entry for {input_name(name)} (it does not match the model)")
