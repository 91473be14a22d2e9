"""The SeedΔ GGUF schema: FFN kinds, tensor and key names, and the architectures SeedΔ applies to.

Conventions (the original's §8): a dense weight is `blk.N.<kind>.weight`; its SeedΔ tensors are
`blk.N.<kind>.<suffix>` with the suffixes of `SEEDDELTA_SUFFIXES`, written in that order; per-weight
keys live under `seeddelta.blk.N.<kind>.`. Every module that names a tensor or a kind takes it from here.
"""

from __future__ import annotations

import re

KINDS: tuple[str, ...] = ("ffn_gate", "ffn_up", "ffn_down")

# Output order of one weight's SeedΔ tensors (spec §8.1): residual idx, residual val, row scale, base.
SEEDDELTA_SUFFIXES: tuple[str, ...] = (
    "d_idx", "d_val", "b_idx", "b_val", "d_row_scale",
    "base_d1", "base_d2", "base_d3", "base_perm1", "base_perm2",
    "dr_idx", "dr_val",  # extension dense_rows/1 (gguf_format.extensions): output rows kept dense
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


# Architectures our torch runtime can run (its forward pass is llama's); a subset of the above.
RUNTIME_ARCHITECTURES: tuple[str, ...] = ("llama",)
