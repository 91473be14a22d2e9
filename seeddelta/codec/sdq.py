"""The SeedΔ variant `sdq`: a residual over a quantized base (extension version 1).

    ŷ = s ⊙ (W0·x + Δ·x),   W0 = the weight in a ggml quantization type (optionally rotated),
                             Δ  = the K largest imatrix-weighted entries per row of W − W0.

Encoding steps (`encode_sdq`):

1. **Base** — W quantized by gguf-py's round-to-nearest (`codec.quant_base`) or by error feedback
   on the calibration XᵀX (`quantizer="gptq"`, `codec.gptq`), after a random-sign block Hadamard
   rotation when asked; or a base taken from another GGUF (any type gguf-py dequantizes, e.g. a
   K-quant written by llama-quantize). With `holdout`, each row's K largest |w|·s entries are set
   to 0 before quantizing (SpQR's idea: an outlier no longer sets its block's scale, so the rest of
   the block is quantized finer; Δ then carries the outlier whole).
2. **Support** — per row the K largest |w − w0|·s (s = imatrix scale; ties lowest index first).
3. **Values** — `refit="none"`: δ = w − w0 on the support (row scale, if asked, fitted off the
   support with the imatrix weights); `refit="full"`: least squares on the calibration
   activations' XᵀX (`codec.refit`).
4. **Storage** — COO (`sdq_idx` i16/i32 + `sdq_val` f16/f32, 4 bytes per entry) or compact
   (`codec.compact`: 2 bytes per entry + ⌈n_in/256⌉ + 2 bytes per row); row scale `sdq_scale` f16.

The result is a `SeedDeltaWeight` (subclass `SdqWeight`) whose idx/val are the *decoded* stored
residual, so `dense()`/`apply()` and every metric of the codec describe exactly the stored file.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from gguf.constants import GGMLQuantizationType

from seeddelta.codec import compact
from seeddelta.codec.encode import SeedDeltaWeight
from seeddelta.codec.gptq import gptq_quantize, grid_for
from seeddelta.codec.quant_base import (
    QuantBase,
    base_from_stored,
    check_base_type,
    quantize_base,
    rotate_rows,
    rotation_signs,
)
from seeddelta.codec.refit import refit_diagonal, refit_full
from seeddelta.codec.residual import coo_select, topk_indices
from seeddelta.codec.storage import index_type_for, store_indices, store_values
from seeddelta.errors import SeedDeltaError

VARIANT = "sdq"
EXT_VERSION = 1
CODINGS = ("coo", "c8")
REFITS = ("none", "full")
QUANTIZERS = ("rtn", "gptq")


@dataclass(frozen=True)
class SdqConfig:
    K: int = 8  # residual entries per row; 0 = the quantized base alone
    base_type: str = "Q4_0"
    quantizer: str = "rtn"  # rtn: gguf-py's round-to-nearest; gptq: error feedback on XᵀX (codec.gptq)
    rotate: bool = False
    holdout: bool = False
    coding: str = "coo"
    refit: str = "none"
    row_scale: bool = False
    idx_type: str = "i16"
    val_type: str = "f16"
    seed: int = 1234

    def validate(self) -> None:
        if self.K < 0:
            raise SeedDeltaError(f"K must be >= 0 for variant sdq (0: the quantized base alone), got {self.K}")
        if self.coding not in CODINGS:
            raise SeedDeltaError(f"unknown residual coding {self.coding!r} (expected {' or '.join(CODINGS)})")
        if self.refit not in REFITS:
            raise SeedDeltaError(f"unknown refit {self.refit!r} (expected {' or '.join(REFITS)})")
        if self.quantizer not in QUANTIZERS:
            raise SeedDeltaError(f"unknown quantizer {self.quantizer!r} (expected {' or '.join(QUANTIZERS)})")


@dataclass
class SdqWeight(SeedDeltaWeight):
    """A `sdq` weight: base is a `QuantBase`; idx/val hold the decoded residual ((n_out, K), COO order
    as selected, or ascending index for the compact coding)."""

    coding: str = "coo"
    packed: compact.CompactResidual | None = None
    variant: str = field(default=VARIANT)

    def tensors(self) -> dict[str, np.ndarray]:
        """Suffix → stored array (numpy order). `sdq_base` holds the base's stored form (block bytes for
        quantized types): its ggml type is `ggml_types()["sdq_base"]`."""
        assert isinstance(self.base, QuantBase)
        out: dict[str, np.ndarray] = dict(self.base.tensors())
        if self.K > 0:
            if self.coding == "c8":
                assert self.packed is not None
                out.update(self.packed.tensors())
            else:
                out.update({"sdq_idx": self.idx, "sdq_val": self.val})
        if self.row_scale is not None:
            out["sdq_scale"] = self.row_scale
        return out

    def ggml_types(self) -> dict[str, GGMLQuantizationType]:
        """The ggml types of stored arrays whose numpy dtype does not say it (the quantized base)."""
        assert isinstance(self.base, QuantBase)
        return {"sdq_base": self.base.qtype}

    @property
    def base_type(self) -> str:
        assert isinstance(self.base, QuantBase)
        return self.base.qtype.name


def _holdout(W: np.ndarray, k: int, scale: np.ndarray | None) -> np.ndarray:
    """W with each row's k largest |w|·s entries set to 0 (they no longer set their block's scale)."""
    if k <= 0:
        return W
    score = np.abs(W) if scale is None else np.abs(W) * scale[None, :]
    idx = topk_indices(score.astype(np.float64), k)
    out = np.array(W, copy=True)
    np.put_along_axis(out, idx, 0.0, axis=1)
    return out


def gptq_base(W: np.ndarray, xtx: np.ndarray, qtype: GGMLQuantizationType, signs: np.ndarray | None) -> QuantBase:
    """The base quantized by GPTQ (error feedback on XᵀX); with a rotation, W·Rᵀ on the rotated inputs'
    second moment R·XᵀX·Rᵀ."""
    n_out, n_in = W.shape
    target, C = np.asarray(W, dtype=np.float64), np.asarray(xtx, dtype=np.float64)
    if signs is not None:
        target = rotate_rows(target, signs)
        C = rotate_rows(rotate_rows(C, signs).T, signs).T  # R·C·Rᵀ (rotate_rows(M) = M·Rᵀ)
    data, _ = gptq_quantize(target, C, grid_for(qtype.name))
    return QuantBase(n_in, n_out, qtype, np.ascontiguousarray(data), signs)


def encode_sdq(W: np.ndarray, config: SdqConfig, imatrix_scale: np.ndarray | None = None,
               xtx: np.ndarray | None = None, stored_base: tuple[np.ndarray, GGMLQuantizationType] | None = None,
               ) -> SdqWeight:
    """Encode W (n_out, n_in) as variant sdq. `imatrix_scale`: s per input (support selection, and the
    weights of the diagonal refit); `xtx`: E[x xᵀ] (n_in, n_in) for `refit="full"`; `stored_base`:
    (stored array, ggml type) of a base quantized elsewhere (no rotation, no holdout then)."""
    config.validate()
    W = np.asarray(W, dtype=np.float32)
    if W.ndim != 2 or min(W.shape) < 1:
        raise SeedDeltaError(f"weight must be a non-empty 2-D matrix, got shape {W.shape}")
    if not np.all(np.isfinite(W)):
        r, c = np.argwhere(~np.isfinite(W))[0]
        raise SeedDeltaError(f"weight has a non-finite value ({W[r, c]}) at row {r}, column {c}")
    n_out, n_in = W.shape
    scale = None if imatrix_scale is None else np.asarray(imatrix_scale, dtype=np.float64).reshape(-1)
    if scale is not None and (scale.shape != (n_in,) or not np.all(np.isfinite(scale)) or np.any(scale < 0)):
        raise SeedDeltaError(f"imatrix scale must be {n_in} finite non-negative values, got shape {scale.shape}")
    if config.refit == "full" or config.quantizer == "gptq":
        if xtx is None:
            raise SeedDeltaError(f"{'refit full' if config.refit == 'full' else 'quantizer gptq'} needs the "
                                 "calibration activations' XᵀX (--xtx FILE)")
        xtx = np.asarray(xtx, dtype=np.float64)
        if xtx.shape != (n_in, n_in) or not np.all(np.isfinite(xtx)):
            raise SeedDeltaError(f"XᵀX must be a finite {n_in}×{n_in} matrix, got shape {xtx.shape}")
    k = min(config.K, n_in)
    warnings: list[str] = []

    if stored_base is not None:
        data, qtype = stored_base
        if config.rotate or config.holdout:
            raise SeedDeltaError("a base taken from another file cannot be rotated or hold out entries")
        base = base_from_stored(data, qtype, n_in, n_out)
        if base.values.shape != (n_out, n_in) or not np.all(np.isfinite(base.values)):
            raise SeedDeltaError(f"the given base ({qtype.name}) is not a finite {n_out}×{n_in} matrix")
    else:
        qtype = check_base_type(config.base_type, n_in)
        signs = rotation_signs(n_in, config.seed) if config.rotate else None
        target = _holdout(W, k, scale) if config.holdout else W
        if config.quantizer == "gptq":
            assert xtx is not None
            base = gptq_base(target, xtx, qtype, signs)
        else:
            base = quantize_base(target, qtype, signs)
    W0 = base.dense_rows(np.arange(n_out))
    W64 = W.astype(np.float64)

    omega = None if scale is None else scale * scale
    if k > 0:
        idx = coo_select(W64 - W0, k, scale)
    else:
        idx = np.zeros((n_out, 0), dtype=np.int64)
    if config.refit == "full":
        assert xtx is not None
        values, a = refit_full(W64, W0, idx, xtx, config.row_scale)
    else:
        values, a = refit_diagonal(W64, W0, idx, omega, config.row_scale)
    row_scale = None if a is None else a.astype(np.float16)

    packed = None
    if config.coding == "c8" and k > 0:
        packed = compact.pack(idx, values, n_in)
        idx_dec, val_dec = compact.unpack(packed)
        idx_stored = idx_dec.astype(np.int32)
        val_stored: np.ndarray = val_dec
    else:
        idx_name, warning = index_type_for(n_in, config.idx_type)
        if warning:
            warnings.append(warning)
        idx_stored = store_indices(idx, idx_name)
        val_stored = store_values(values, config.val_type)
    return SdqWeight(n_in, n_out, "coo", 32, idx_stored, val_stored, row_scale, base, k, warnings,
                     coding=config.coding, packed=packed)


def sdq_from_tensors(tensors: Mapping[str, np.ndarray], base_type: GGMLQuantizationType, n_in: int,
                     n_out: int) -> SdqWeight:
    """Rebuild a codec `SdqWeight` from stored arrays (validated beforehand by
    `gguf_format.seeddelta_tensors.check_seeddelta_arrays`)."""
    t = dict(tensors)
    base = base_from_stored(np.asarray(t["sdq_base"]), base_type, n_in, n_out,
                            None if "sdq_rot" not in t else np.asarray(t["sdq_rot"]).astype(np.int8))
    scale = t.get("sdq_scale")
    row_scale = None if scale is None else np.asarray(scale).reshape(-1)
    if "sdq_coff" in t:
        packed = compact.CompactResidual(np.asarray(t["sdq_coff"]), np.asarray(t["sdq_ccnt"]),
                                         np.asarray(t["sdq_cval"]), np.asarray(t["sdq_cscale"]).reshape(-1))
        idx, val = compact.unpack(packed)
        return SdqWeight(n_in, n_out, "coo", 32, idx.astype(np.int32), val, row_scale, base, int(idx.shape[1]),
                         coding="c8", packed=packed)
    if "sdq_idx" in t:
        idx = np.asarray(t["sdq_idx"]).reshape(n_out, -1)
        val = np.asarray(t["sdq_val"]).reshape(n_out, -1)
    else:
        idx, val = np.zeros((n_out, 0), np.int32), np.zeros((n_out, 0), np.float16)
    return SdqWeight(n_in, n_out, "coo", 32, idx, val, row_scale, base, int(idx.shape[1]))


__all__ = ["CODINGS", "EXT_VERSION", "REFITS", "SdqConfig", "SdqWeight", "VARIANT", "encode_sdq", "rotation_signs",
           "sdq_from_tensors"]
