"""The SeedΔ GGUF schema: FFN kinds, tensor and key names, and the architectures SeedΔ applies to.

Conventions (the original's §8): a dense weight is `blk.N.<kind>.weight`; its SeedΔ tensors are
`blk.N.<kind>.<suffix>` with the suffixes of `SEEDDELTA_SUFFIXES`, written in that order; per-weight
keys live under `seeddelta.blk.N.<kind>.`. Every module that names a tensor or a kind takes it from here.
"""

from __future__ import annotations

import re

KINDS: tuple[str, ...] = ("ffn_gate", "ffn_up", "ffn_down")

# Output order of one weight's SeedΔ tensors (spec §8.1): residual idx, residual val, row scale, base.
PLAIN_SUFFIXES: tuple[str, ...] = (
    "d_idx", "d_val", "b_idx", "b_val", "d_row_scale",
    "base_d1", "base_d2", "base_d3", "base_perm1", "base_perm2",
    "dr_idx", "dr_val",  # extension dense_rows/1 (gguf_format.extensions): output rows kept dense
    "rg_stat", "rg_lim",  # extension delta_regime/1 (codec.regime): Δ only for tokens in a regime
)
RESIDUAL_SUFFIXES: tuple[str, ...] = ("d_idx", "d_val", "b_idx", "b_val")

# --- Extension: SeedΔ variants (ours; docs/file-format.md "Variants") -----------------------------
# A variant weight's tensors all carry the variant's own prefix, never a plain SeedΔ name, so that
# no reader of plain SeedΔ (the original runtime included) can take part of a variant for plain
# SeedΔ. The file says which variant and which version of its definition it uses:
VARIANT_KEY = "seeddelta.variant"  # string: the variant family of the file's variant weights
EXT_VERSION_KEY = "seeddelta.ext_version"  # u32: version of that family's definition
TENSOR_VARIANT_KEY = "variant"  # per-weight key seeddelta.blk.N.<kind>.variant (string)
# Variant families this reader knows, with the extension version it reads.
KNOWN_VARIANTS: dict[str, int] = {"sdq": 1}
# sdq (residual over a quantized base), version 1, in output order: base (any ggml type), rotation
# signs, COO residual, compact residual, row scale.
SDQ_SUFFIXES: tuple[str, ...] = (
    "sdq_base", "sdq_rot", "sdq_idx", "sdq_val", "sdq_coff", "sdq_ccnt", "sdq_cval", "sdq_cscale", "sdq_scale",
)
SDQ_PREFIX = "sdq_"

# Every SeedΔ tensor suffix, plain and variant (a weight holds one family only).
SEEDDELTA_SUFFIXES: tuple[str, ...] = PLAIN_SUFFIXES + SDQ_SUFFIXES

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
BLK_NAME = re.compile(r"^blk\.(\d+)\.")


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


_VARIANT_LIKE_NAME = re.compile(r"^blk\.(\d+)\.(ffn_gate|ffn_up|ffn_down)\.(" + SDQ_PREFIX + r"\w*)$")


def variant_of_suffix(suffix: str) -> str | None:
    """The variant family a tensor suffix belongs to (None: plain SeedΔ)."""
    return "sdq" if suffix.startswith(SDQ_PREFIX) else None


def extension_problem(variant: object, ext_version: object, tensor_names: list[str]) -> str | None:
    """Why a file's variant declaration cannot be read by this version (None: it can, or there is none).

    `variant`/`ext_version`: the values of VARIANT_KEY / EXT_VERSION_KEY (None when absent)."""
    unknown = [n for n in tensor_names if (m := _VARIANT_LIKE_NAME.match(n)) and m.group(3) not in SDQ_SUFFIXES]
    variant_tensors = [n for n in tensor_names if _VARIANT_LIKE_NAME.match(n)]
    if variant is None:
        if ext_version is not None:
            return f"{EXT_VERSION_KEY} is set but {VARIANT_KEY} is not"
        if variant_tensors:
            return f"tensor {variant_tensors[0]} belongs to a SeedΔ variant but the file has no {VARIANT_KEY} key"
        return None
    if not isinstance(variant, str) or variant not in KNOWN_VARIANTS:
        known = ", ".join(f"{k} (version {v})" for k, v in KNOWN_VARIANTS.items())
        return f"the file uses SeedΔ variant {variant!r}, which this seeddelta does not know (it reads {known})"
    supported = KNOWN_VARIANTS[variant]
    if isinstance(ext_version, bool) or not isinstance(ext_version, int):
        return f"SeedΔ variant {variant}: {EXT_VERSION_KEY} is missing or not an integer ({ext_version!r})"
    if ext_version != supported:
        return (f"SeedΔ variant {variant} extension version {ext_version} is not supported (this seeddelta reads "
                f"version {supported})")
    if unknown:
        return f"tensor {unknown[0]} is not defined by SeedΔ variant {variant} version {supported}"
    return None


# Architectures our torch runtime can run (its forward pass is llama's); a subset of the above.
RUNTIME_ARCHITECTURES: tuple[str, ...] = ("llama",)
