"""The policy schema: names, aliases, limits, and the typed form of a loaded policy.

A policy file (spec-policy-eval §1) is read once into these frozen objects; resolution and
export work on them, never on raw JSON. Every rule remembers its JSON path (`defaults`,
`ranges[1]`, `layers.12`, `layers.12.tensors.ffn_down`), which is the provenance reported for
each value it sets.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from seeddelta.builder.options import VariantSpec
from seeddelta.codec.regime import DeltaRegime
from seeddelta.gguf_format.schema import KINDS

# Short kind names used inside `K`, `gating.min_mean` and `gating.min_p05` objects.
SHORT: Mapping[str, str] = {"ffn_gate": "gate", "ffn_up": "up", "ffn_down": "down"}
KIND_OF_SHORT: Mapping[str, str] = {v: k for k, v in SHORT.items()}

# Gating metrics (canonical names, as the builder's report writes them) and the original's aliases.
METRICS: tuple[str, ...] = ("cos", "cos_w", "cos_x", "cos_x_w", "ffn_score")
METRIC_ALIASES: Mapping[str, str] = {
    "cos": "cos", "cos_w": "cos_w", "cos-w": "cos_w", "cos_x": "cos_x", "cos-x": "cos_x",
    "cos_x_w": "cos_x_w", "cos-x-w": "cos_x_w", "ffn_score": "ffn_score", "ffn-score": "ffn_score",
    "ffn": "ffn_score",
}
NEEDS_EVAL_X: frozenset[str] = frozenset({"cos_x", "cos_x_w", "ffn_score"})
NEEDS_IMATRIX: frozenset[str] = frozenset({"cos_w", "cos_x_w", "ffn_score"})

# The original's baseline gating thresholds (min_mean, min_p05) per kind, §1.7.
BASELINE_THRESHOLDS: Mapping[str, tuple[float, float]] = {
    "ffn_gate": (0.45, 0.30), "ffn_up": (0.45, 0.30), "ffn_down": (0.25, 0.15),
}

VERSIONS: tuple[int, ...] = (1, 2)
# Keys of a rule object (`defaults`, `ranges[i]`, `layers.N`, `tensors.<kind>`), original's schema.
RULE_KEYS_V1: frozenset[str] = frozenset({
    "enabled", "enable", "strip_dense", "strip", "block", "K", "metric", "gating_metric", "gating",
    "autotune", "tensors",
})
# Our additions, accepted only under "version": 2 (under version 1 they are unknown keys).
# `dense_rows` (v1 plan H3b): share of the tensor's rows kept dense, a file-schema extension (dense_rows/1).
# `delta_regime` (v1 plan mechanism 3): Δ only for tokens whose input statistic lies in a regime, a file-schema
# extension (delta_regime/1, codec.regime).
RULE_KEYS_V2: frozenset[str] = frozenset({"base", "row_scale", "delta_norm_clamp", "variant", "dense_rows",
                                          "delta_regime"})
# Keys of a version-2 `delta_regime` object ("statistic" is required; an omitted bound is open).
DELTA_REGIME_KEYS: tuple[str, ...] = ("statistic", "min", "max")
# Keys of a version-2 `variant` object (builder.options.VariantSpec; "name" is required).
VARIANT_KEYS: tuple[str, ...] = ("name", "base_type", "quantizer", "rotate", "holdout", "coding", "refit")
TOP_KEYS: frozenset[str] = frozenset({"version", "defaults", "ranges", "layers"})
GATING_KEYS: frozenset[str] = frozenset({"metric", "min_mean", "min_p05"})
AUTOTUNE_KEYS: tuple[str, ...] = ("enabled", "schedule_gate_up", "schedule_down", "max_iters")
ALIASES: Mapping[str, str] = {"enable": "enabled", "strip": "strip_dense", "gating_metric": "metric"}

# Base kinds a policy may name under version 2: the ones a GGUF can carry (the original runtime's).
POLICY_BASE_KINDS: tuple[str, ...] = ("none", "xor_circulant")

MAX_LAYER_ID = 4095  # no model has more layers; bounds the work of `check` and of selector expansion
MAX_BLOCK = 4096  # the CLI's --block range 1..4096


@dataclass(frozen=True)
class Autotune:
    """An `autotune` object as written; fields it omits take the original's defaults.

    `given` lists the keys the file actually wrote (used to refuse a replacement that would
    silently drop an earlier object's settings, see resolve.py)."""

    enabled: bool = False
    schedule_gate_up: tuple[int, ...] = ()
    schedule_down: tuple[int, ...] = ()
    max_iters: int = 0
    given: frozenset[str] = field(default=frozenset(), compare=False)

    def schedule(self, kind: str) -> tuple[int, ...]:
        return self.schedule_down if kind == "ffn_down" else self.schedule_gate_up

    def to_json(self) -> dict[str, object]:
        return {"enabled": self.enabled, "schedule_gate_up": list(self.schedule_gate_up),
                "schedule_down": list(self.schedule_down), "max_iters": self.max_iters}


AUTOTUNE_OFF = Autotune()


@dataclass(frozen=True)
class Rule:
    """One rule object. `None` / empty mapping = not set here (earlier stages' value stays).

    `K`, `min_mean` and `min_p05` are keyed by full kind name; a scalar in the file fills all
    three kinds, an object only the kinds it lists."""

    path: str
    enabled: bool | None = None
    strip_dense: bool | None = None
    block: int | None = None
    K: Mapping[str, int] = field(default_factory=dict)
    metric: str | None = None
    min_mean: Mapping[str, float] = field(default_factory=dict)
    min_p05: Mapping[str, float] = field(default_factory=dict)
    autotune: Autotune | None = None
    tensors: Mapping[str, Rule] = field(default_factory=dict)
    # version 2
    base: str | None = None
    row_scale: bool | None = None
    delta_norm_clamp: float | None = None
    variant: VariantSpec | None = None
    dense_rows: float | None = None
    delta_regime: DeltaRegime | None = None


@dataclass(frozen=True)
class RangeRule:
    """A `ranges[i]` element: its layer selector (inclusive intervals) and its rule."""

    selector: str
    intervals: tuple[tuple[int, int], ...]
    rule: Rule

    def contains(self, layer: int) -> bool:
        return any(lo <= layer <= hi for lo, hi in self.intervals)

    @property
    def max_layer(self) -> int:
        return max(hi for _, hi in self.intervals)


@dataclass(frozen=True)
class Policy:
    """A loaded, validated policy. `hash` is the original's `fnv1a64:` hash of the file bytes."""

    source: str
    version: int
    defaults: Rule | None
    ranges: tuple[RangeRule, ...]
    layers: Mapping[int, Rule]
    warnings: tuple[str, ...]
    hash: str

    def max_layer(self) -> int | None:
        """Highest layer id the policy names (selectors and `layers` keys), None if it names none."""
        ids = [r.max_layer for r in self.ranges] + list(self.layers)
        return max(ids) if ids else None

    def rules(self) -> list[Rule]:
        """Every top-level rule (defaults, ranges, layers) in file order of precedence."""
        out = [self.defaults] if self.defaults is not None else []
        return out + [r.rule for r in self.ranges] + [self.layers[k] for k in sorted(self.layers)]


__all__ = [
    "ALIASES", "AUTOTUNE_KEYS", "AUTOTUNE_OFF", "Autotune", "BASELINE_THRESHOLDS", "GATING_KEYS", "KINDS",
    "KIND_OF_SHORT", "MAX_BLOCK", "MAX_LAYER_ID", "METRICS", "METRIC_ALIASES", "NEEDS_EVAL_X", "NEEDS_IMATRIX",
    "POLICY_BASE_KINDS", "Policy", "RULE_KEYS_V1", "RULE_KEYS_V2", "RangeRule", "Rule", "SHORT", "TOP_KEYS",
    "VARIANT_KEYS", "VERSIONS",
]
