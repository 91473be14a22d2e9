"""Validation of one weight's tensors of the SeedΔ variant `sdq`, extension version 1
(docs/file-format.md, "Variant sdq"). Each problem is one SeedDeltaError naming the tensor.

* `sdq_base` — required; a RawTensor of any ggml type gguf-py can dequantize (or an F16/F32 array),
  logical shape (n_out, n_in) (ggml ne [n_in, n_out]); its dequantized values finite;
* `sdq_rot` — optional; I8 (n_in / b, b), b a power of two, every value −1 or +1;
* residual — none (the base alone), or COO `sdq_idx` (I16/I32) + `sdq_val` (F16/F32), both
  (n_out, K), indices in 0 … n_in − 1, values finite; or compact `sdq_coff`, `sdq_ccnt`, `sdq_cval`
  (I8) + `sdq_cscale` (F16/F32): offsets and values (n_out, K), counts (n_out, ⌈n_in/256⌉) read as
  unsigned bytes summing to K per row, every index 256·block + offset < n_in, steps finite and
  ≥ 0; never both residual forms;
* `sdq_scale` — optional; F16/F32 (n_out,), finite.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import dequantize

from seeddelta.errors import SeedDeltaError
from seeddelta.gguf_format.writer import RawTensor

_INT = (np.dtype(np.int16), np.dtype(np.int32))
_FLOAT = (np.dtype(np.float16), np.dtype(np.float32))
_BYTE = (np.dtype(np.int8),)
COMPACT = ("sdq_coff", "sdq_ccnt", "sdq_cval", "sdq_cscale")
INDEX_BLOCK = 256
_CHECK_ROWS = 1 << 12  # rows dequantized at once when checking the base for NaN/Inf


def _bad(name: str, suffix: str, problem: str) -> SeedDeltaError:
    return SeedDeltaError(f"SeedΔ tensor {name}.{suffix}: {problem}")


def _array(name: str, suffix: str, a: np.ndarray | RawTensor, dtypes: tuple[np.dtype, ...]) -> np.ndarray:
    if isinstance(a, RawTensor):
        raise _bad(name, suffix, f"type {a.tensor_type.name} not accepted")
    if a.dtype not in dtypes:
        raise _bad(name, suffix, f"dtype {a.dtype} not accepted (expected {'/'.join(str(d) for d in dtypes)})")
    return a


def _finite(name: str, suffix: str, a: np.ndarray) -> None:
    ok = np.isfinite(a)
    if not ok.all():
        raise _bad(name, suffix, f"{int(a.size - np.count_nonzero(ok))} NaN/Inf value(s) "
                   f"(first at {[int(i) for i in np.argwhere(~ok)[0]]})")


def base_shape_problem(base: np.ndarray | RawTensor, n_in: int, n_out: int) -> str | None:
    """Why `base` is not a (n_out, n_in) matrix of a dequantizable type (None: it is)."""
    if isinstance(base, RawTensor):
        qtype = base.tensor_type
        block, nbytes = GGML_QUANT_SIZES[qtype]
        if n_in % block:
            return f"{qtype.name} rows hold multiples of {block} values; n_in = {n_in} is not one"
        want = (n_out, n_in // block * nbytes) if base.data.dtype == np.uint8 else (n_out, n_in)
        if tuple(base.data.shape) != want:
            return f"{qtype.name} data of shape {tuple(base.data.shape)}, expected {want} for ({n_out}, {n_in})"
        return None
    if base.dtype not in _FLOAT:
        return f"dtype {base.dtype} not accepted (a quantized ggml type, F16 or F32)"
    if base.shape != (n_out, n_in):
        return f"shape {base.shape}, expected ({n_out}, {n_in})"
    return None


def _check_base(name: str, base: np.ndarray | RawTensor, n_in: int, n_out: int) -> None:
    problem = base_shape_problem(base, n_in, n_out)
    if problem is not None:
        raise _bad(name, "sdq_base", problem)
    data, qtype = (base.data, base.tensor_type) if isinstance(base, RawTensor) else (base, None)
    for r0 in range(0, n_out, _CHECK_ROWS):
        chunk = data[r0: r0 + _CHECK_ROWS]
        if qtype is not None:
            try:
                values = dequantize(chunk, qtype)
            except NotImplementedError:
                raise _bad(name, "sdq_base", f"type {qtype.name} cannot be dequantized by gguf-py") from None
        else:
            values = chunk
        ok = np.isfinite(values)
        if not ok.all():
            r, c = np.argwhere(~ok)[0]
            raise _bad(name, "sdq_base", f"{int(values.size - np.count_nonzero(ok))} NaN/Inf value(s) after "
                       f"dequantization (first at row {r0 + int(r)}, column {int(c)})")


def _check_rot(name: str, rot: np.ndarray, n_in: int) -> None:
    if rot.ndim != 2 or rot.shape[0] * rot.shape[1] != n_in:
        raise _bad(name, "sdq_rot", f"shape {rot.shape}, expected (n_in / b, b) with n_in = {n_in}")
    b = rot.shape[1]
    if b < 1 or b & (b - 1):
        raise _bad(name, "sdq_rot", f"rotation block {b} is not a power of two")
    bad = (rot != 1) & (rot != -1)
    if bad.any():
        raise _bad(name, "sdq_rot", f"{int(bad.sum())} value(s) other than -1/+1 (first {int(rot[bad][0])})")


def _check_coo(name: str, idx: np.ndarray, val: np.ndarray, n_in: int, n_out: int) -> None:
    if idx.ndim != 2 or idx.shape != val.shape or idx.shape[0] != n_out:
        raise _bad(name, "sdq_idx", f"shapes sdq_idx {idx.shape} / sdq_val {val.shape}, expected equal (n_out={n_out}, K)")
    i = idx.astype(np.int64)
    bad = (i < 0) | (i >= n_in)
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise _bad(name, "sdq_idx", f"{int(bad.sum())} index value(s) outside 0 <= i < n_in = {n_in} "
                   f"(first at row {int(r)}: {int(i[r, c])})")
    _finite(name, "sdq_val", val)


def _check_compact(name: str, t: Mapping[str, np.ndarray], n_in: int, n_out: int) -> None:
    off, cnt, q, step = (t[k] for k in COMPACT)
    nb = -(-n_in // INDEX_BLOCK)
    if off.ndim != 2 or off.shape[0] != n_out or q.shape != off.shape:
        raise _bad(name, "sdq_coff", f"shapes sdq_coff {off.shape} / sdq_cval {q.shape}, expected equal (n_out={n_out}, K)")
    if cnt.shape != (n_out, nb):
        raise _bad(name, "sdq_ccnt", f"shape {cnt.shape}, expected (n_out={n_out}, ceil(n_in/256)={nb})")
    if step.shape != (n_out,):
        raise _bad(name, "sdq_cscale", f"shape {step.shape}, expected ({n_out},)")
    counts = cnt.view(np.uint8).astype(np.int64)
    k = off.shape[1]
    sums = counts.sum(axis=1)
    if np.any(sums != k):
        r = int(np.flatnonzero(sums != k)[0])
        raise _bad(name, "sdq_ccnt", f"row {r} counts {int(sums[r])} entries, sdq_coff holds K = {k}")
    ends = np.cumsum(counts, axis=1)
    block = (ends[:, None, :] <= np.arange(k)[None, :, None]).sum(axis=2)
    index = block * INDEX_BLOCK + off.view(np.uint8).astype(np.int64)
    bad = index >= n_in
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise _bad(name, "sdq_coff", f"{int(bad.sum())} entr(ies) decode to an index >= n_in = {n_in} "
                   f"(first at row {int(r)}: {int(index[r, c])})")
    _finite(name, "sdq_cscale", step)
    if np.any(step < 0):
        raise _bad(name, "sdq_cscale", f"negative step at row {int(np.flatnonzero(step < 0)[0])}")


def check_sdq_arrays(name: str, arrays: Mapping[str, np.ndarray | RawTensor], n_in: int, n_out: int) -> None:
    """Validate one weight's `sdq_*` tensors (keys = suffixes; see the module docstring)."""
    if "sdq_base" not in arrays:
        raise _bad(name, "sdq_base", f"missing (variant sdq tensors {', '.join(sorted(arrays))} need a base)")
    _check_base(name, arrays["sdq_base"], n_in, n_out)
    if "sdq_rot" in arrays:
        _check_rot(name, _array(name, "sdq_rot", arrays["sdq_rot"], _BYTE), n_in)
    coo = [k for k in ("sdq_idx", "sdq_val") if k in arrays]
    packed = [k for k in COMPACT if k in arrays]
    if coo and packed:
        raise _bad(name, packed[0], "compact residual next to a COO residual (sdq_idx/sdq_val); one or the other")
    if coo:
        if len(coo) != 2:
            missing = "sdq_val" if coo == ["sdq_idx"] else "sdq_idx"
            raise _bad(name, missing, "missing (a COO residual needs both sdq_idx and sdq_val)")
        _check_coo(name, _array(name, "sdq_idx", arrays["sdq_idx"], _INT),
                   _array(name, "sdq_val", arrays["sdq_val"], _FLOAT), n_in, n_out)
    if packed:
        if len(packed) != len(COMPACT):
            missing = next(k for k in COMPACT if k not in arrays)
            raise _bad(name, missing, f"missing (a compact residual needs {', '.join(COMPACT)})")
        typed = {k: _array(name, k, arrays[k], _FLOAT if k == "sdq_cscale" else _BYTE) for k in COMPACT}
        _check_compact(name, typed, n_in, n_out)
    if "sdq_scale" in arrays:
        scale = _array(name, "sdq_scale", arrays["sdq_scale"], _FLOAT)
        if scale.shape != (n_out,):
            raise _bad(name, "sdq_scale", f"shape {scale.shape}, expected ({n_out},)")
        _finite(name, "sdq_scale", scale)
