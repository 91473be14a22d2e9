"""Stock llama.cpp's quantizer on the FFN weights only: `llama_model_quantize` through llama-cpp-python.

How only the FFN tensors change: the whole model is quantized by llama.cpp with the named file type
(its own per-tensor rules: Q4_K_M's Q6_K for some `ffn_down`, and its fallbacks for rows that are
not a multiple of a 256-wide super-block, e.g. Q4_K → Q5_0 on a 192-wide `ffn_gate`), then the FFN
weights of that file are copied byte-for-byte into a copy of the original with seeddelta's writer.
Every other tensor and every key of the original stays byte-identical, so a comparison with
SeedΔ (which only touches FFN weights) differs in the FFN weights alone. llama-cpp-python's
`tt_overrides` (per-tensor type patterns) could force a type per tensor, but it cannot keep the
other tensors in their original type, and the file type's own mixture is what a user gets.

The imatrix (per-input mean x², what llama-quantize passes after dividing sums by counts) goes in
through `llama_model_quantize_params.imatrix`, an array of {name, data, size} ended by a null name.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from seeddelta.errors import SeedDeltaError
from seeddelta.gguf_format.imatrix_file import Imatrix
from seeddelta.gguf_format.reader import GGUFModel
from seeddelta.gguf_format.schema import KINDS, weight_name
from seeddelta.gguf_format.writer import write_model_copy
from seeddelta.outputs import AtomicOutput

INSTALL_HINT = "install the interop extra: .venv/bin/pip install -e '.[interop]' (llama-cpp-python, diskcache)"

# llama.cpp file types offered (the names llama-quantize accepts) -> llama_ftype constant name.
FTYPES: Mapping[str, str] = {
    "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "Q6_K": "LLAMA_FTYPE_MOSTLY_Q6_K",
    "Q5_K_M": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
    "IQ4_XS": "LLAMA_FTYPE_MOSTLY_IQ4_XS",
}


class QuantizerUnavailable(SeedDeltaError):
    """llama-cpp-python cannot be imported; the message names the install command."""


def _llama_cpp() -> Any:
    try:
        import llama_cpp
    except ImportError as exc:  # absent, or present with a missing dependency (diskcache): say which
        raise QuantizerUnavailable(f"llama-cpp-python not importable ({exc}); {INSTALL_HINT}") from None
    return llama_cpp


def unavailable_reason() -> str | None:
    """None when the quantizer can run, else the one line saying why and how to install it."""
    try:
        _llama_cpp()
    except QuantizerUnavailable as exc:
        return str(exc)
    return None


def _previous_logger(llama_cpp: Any) -> Any:
    """llama-cpp-python's own log callback (it installs one at import), else llama.cpp's default."""
    try:
        from llama_cpp._logger import llama_log_callback
    except ImportError:
        return llama_cpp.llama_log_callback(0)
    return llama_log_callback


def ffn_names(model: GGUFModel) -> list[str]:
    return [weight_name(layer, kind) for layer in range(model.n_layer) for kind in KINDS
            if weight_name(layer, kind) in model.tensors]


def _imatrix_array(llama_cpp: Any, imatrix: Imatrix) -> tuple[Any, list[Any]]:
    """The null-terminated C array of imatrix entries, and the buffers it points into (keep alive)."""
    keep: list[Any] = []
    entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix.values) + 1))()
    for i, (name, values) in enumerate(sorted(imatrix.values.items())):
        buf = np.ascontiguousarray(values, dtype=np.float32)
        cname = ctypes.c_char_p(name.encode("utf-8"))
        keep += [buf, cname]
        entries[i].name = cname.value
        entries[i].data = buf.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        entries[i].size = buf.size
    entries[len(imatrix.values)].name = None
    return entries, keep


def quantize_ffn(src: str | os.PathLike[str], out: str | os.PathLike[str], ftype: str, *,
                 imatrix: Imatrix | None = None, threads: int = 0) -> dict[str, str]:
    """Write `out`: `src` with its FFN weights replaced by llama.cpp's `ftype` quantization of them.
    Returns {FFN tensor name: ggml type name} of what was written."""
    if ftype not in FTYPES:
        raise SeedDeltaError(f"unknown llama.cpp file type {ftype!r} (expected one of {', '.join(FTYPES)})")
    llama_cpp = _llama_cpp()
    src_model = GGUFModel(src, what="model")
    lines: list[str] = []

    @llama_cpp.llama_log_callback
    def quiet(level: int, text: bytes, user_data: Any) -> None:  # keep llama.cpp's log for an error message
        lines.append(text.decode("utf-8", errors="replace"))

    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = int(threads)
    params.ftype = getattr(llama_cpp, FTYPES[ftype])
    params.allow_requantize = True  # a quantized source (SmolLM2 Q4_1) is dequantized first, as llama-quantize would
    keep: list[Any] = []
    if imatrix is not None:
        entries, keep = _imatrix_array(llama_cpp, imatrix)
        params.imatrix = ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
        keep.append(entries)
    full = AtomicOutput(Path(out).with_suffix(".llama-quantize.gguf"))
    try:
        llama_cpp.llama_log_set(quiet, None)
        try:
            status = llama_cpp.llama_model_quantize(os.fsencode(src_model.path), os.fsencode(full.tmp),
                                                    ctypes.byref(params))
        finally:
            llama_cpp.llama_log_set(_previous_logger(llama_cpp), None)
        if status != 0:
            tail = "".join(lines).strip().splitlines()[-1:] or ["no log"]
            raise SeedDeltaError(f"llama_model_quantize {ftype} of {src_model.path} failed ({status}): {tail[0]}")
        quant = GGUFModel(full.tmp, what="quantized model")
        names = ffn_names(src_model)
        replace = {name: quant.tensors[name] for name in names}
        write_model_copy(src_model, out, replace_tensors=replace)
        return {name: quant.tensor_type(name).name for name in names}
    finally:
        full.discard()
