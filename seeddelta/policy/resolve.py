"""Resolution: the setting of one (layer, kind) under a policy, and where each value came from.

The original's merge rules (spec-policy-eval §2), restated as an order of application onto
the CLI baseline:

1. the plain fields of `defaults`, of every range whose selector holds the layer (file
   order) and of `layers.<L>`, each overriding the earlier field by field;
2. then the `tensors.<kind>` rules of the same sources in the same order — so a tensor
   override from any level beats every plain field (`defaults.tensors.ffn_up.enabled=false`
   wins over `layers.3.enabled=true`).

This equals the original's "accumulate, union the tensors maps, merge the tensor rule last".
Thresholds are per kind and per field (`min_mean` and `min_p05` independently); a negative
threshold switches gating off; `K` is per kind. The one difference: the original replaced an
earlier `autotune` object wholesale, so a later partial object (`{"enabled": true}`) silently
dropped the schedules set before it. Here such a replacement is an error naming both objects,
unless the later object says `"enabled": false` (switching autotune off needs nothing else).

Each resolved field carries its provenance: `baseline` (the CLI) or the JSON path of the
last rule that set it (`defaults`, `ranges[1]`, `layers.12`, `layers.12.tensors.ffn_down`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from seeddelta.builder.options import VariantSpec
from seeddelta.codec.regime import DeltaRegime
from seeddelta.errors import SeedDeltaError
from seeddelta.policy.schema import (
    AUTOTUNE_OFF,
    BASELINE_THRESHOLDS,
    KINDS,
    NEEDS_EVAL_X,
    NEEDS_IMATRIX,
    SHORT,
    Autotune,
    Policy,
    Rule,
)

BASELINE = "baseline"


@dataclass(frozen=True)
class Baseline:
    """The starting point of resolution: the builder's CLI (spec §1.7), per kind where it differs."""

    strip_dense: bool = False
    block: int = 32
    K: Mapping[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 32))
    metric: str = "cos_x_w"
    thresholds: Mapping[str, tuple[float, float]] = field(default_factory=lambda: dict(BASELINE_THRESHOLDS))
    enabled: bool = True
    base: str = "none"
    row_scale: bool = False
    delta_norm_clamp: Mapping[str, float] = field(default_factory=lambda: dict.fromkeys(KINDS, 0.0))
    variant: VariantSpec = field(default_factory=VariantSpec)
    dense_rows: Mapping[str, float] = field(default_factory=lambda: dict.fromkeys(KINDS, 0.0))
    delta_regime: Mapping[str, DeltaRegime | None] = field(default_factory=lambda: dict.fromkeys(KINDS))


# Resolved fields in output order; K_<kind> are all three kinds' budgets (the original resolves all).
FIELDS: tuple[str, ...] = (
    "enabled", "strip_dense", "block", "K_gate", "K_up", "K_down", "metric", "min_mean", "min_p05", "autotune",
    "base", "row_scale", "delta_norm_clamp", "variant", "dense_rows", "delta_regime",
)


@dataclass(frozen=True)
class Resolved:
    """The resolved setting of one (layer, kind) (spec §1.7) and the source of every field."""

    layer: int
    kind: str
    enabled: bool
    strip_dense: bool
    block: int
    K_gate: int
    K_up: int
    K_down: int
    metric: str
    min_mean: float
    min_p05: float
    autotune: Autotune
    base: str
    row_scale: bool
    delta_norm_clamp: float
    variant: VariantSpec
    source: Mapping[str, str]
    dense_rows: float = 0.0
    delta_regime: DeltaRegime | None = None

    @property
    def K(self) -> int:
        """This kind's budget."""
        return int(getattr(self, "K_" + SHORT[self.kind]))

    @property
    def gating_enabled(self) -> bool:
        return not (self.min_mean < 0 or self.min_p05 < 0)

    @property
    def require_eval_x(self) -> bool:
        return self.gating_enabled and self.metric in NEEDS_EVAL_X

    @property
    def require_imatrix(self) -> bool:
        return self.gating_enabled and self.metric in NEEDS_IMATRIX

    def k_schedule(self) -> list[int]:
        """The K values the builder tries, in order (§1.8 step 7): this kind's autotune schedule when
        autotune is on and the schedule is not empty, else the single K; duplicates dropped, order
        kept, cut to `max_iters` when that is > 0."""
        at = self.autotune
        values = list(at.schedule(self.kind)) if at.enabled and at.schedule(self.kind) else [self.K]
        unique = list(dict.fromkeys(values))
        return unique[: at.max_iters] if at.enabled and at.max_iters > 0 else unique

    def to_json(self) -> dict[str, Any]:
        """One row of `policy resolve --json`: this kind's values, derived flags and sources."""
        src = dict(self.source)
        k_src = src["K_" + SHORT[self.kind]]
        return {
            "layer": self.layer, "kind": self.kind, "enabled": self.enabled, "strip_dense": self.strip_dense,
            "block": self.block, "K": self.K, "metric": self.metric, "min_mean": self.min_mean,
            "min_p05": self.min_p05, "gating_enabled": self.gating_enabled, "require_eval_x": self.require_eval_x,
            "require_imatrix": self.require_imatrix, "autotune": self.autotune.to_json(),
            "k_schedule": self.k_schedule(), "base": self.base, "row_scale": self.row_scale,
            "delta_norm_clamp": self.delta_norm_clamp, "variant": self.variant.to_json(),
            "dense_rows": self.dense_rows,
            "delta_regime": None if self.delta_regime is None else self.delta_regime.to_json(),
            "source": {
                "enabled": src["enabled"], "strip_dense": src["strip_dense"], "block": src["block"], "K": k_src,
                "metric": src["metric"], "min_mean": src["min_mean"], "min_p05": src["min_p05"],
                "autotune": src["autotune"], "base": src["base"], "row_scale": src["row_scale"],
                "delta_norm_clamp": src["delta_norm_clamp"], "variant": src["variant"],
                "dense_rows": src["dense_rows"], "delta_regime": src["delta_regime"],
            },
        }


def sources(policy: Policy, layer: int) -> list[Rule]:
    """The top-level rules that apply to `layer`, lowest precedence first."""
    out = [policy.defaults] if policy.defaults is not None else []
    out += [r.rule for r in policy.ranges if r.contains(layer)]
    if layer in policy.layers:
        out.append(policy.layers[layer])
    return out


def resolve(policy: Policy, layer: int, kind: str, baseline: Baseline | None = None) -> Resolved:
    """The setting of (layer, kind). Raises SeedDeltaError for an unknown kind or a lossy autotune."""
    if kind not in KINDS:
        raise SeedDeltaError(f"unknown kind {kind!r} (expected {', '.join(KINDS)})")
    b = baseline if baseline is not None else Baseline()
    mean, p05 = b.thresholds[kind]
    values: dict[str, Any] = {
        "enabled": b.enabled, "strip_dense": b.strip_dense, "block": b.block, "K_gate": b.K["ffn_gate"],
        "K_up": b.K["ffn_up"], "K_down": b.K["ffn_down"], "metric": b.metric, "min_mean": mean, "min_p05": p05,
        "autotune": AUTOTUNE_OFF, "base": b.base, "row_scale": b.row_scale, "delta_norm_clamp": b.delta_norm_clamp[kind],
        "variant": b.variant,
        "dense_rows": b.dense_rows[kind],
        "delta_regime": b.delta_regime[kind],
    }
    source = dict.fromkeys(FIELDS, BASELINE)

    def apply(rule: Rule) -> None:
        def put(name: str, value: Any) -> None:
            values[name], source[name] = value, rule.path

        for name in ("enabled", "strip_dense", "block", "metric", "base", "row_scale", "delta_norm_clamp", "variant",
                     "dense_rows", "delta_regime"):
            value = getattr(rule, name)
            if value is not None:
                put(name, value)
        for k, budget in rule.K.items():
            put("K_" + SHORT[k], budget)
        if kind in rule.min_mean:
            put("min_mean", rule.min_mean[kind])
        if kind in rule.min_p05:
            put("min_p05", rule.min_p05[kind])
        if rule.autotune is not None:
            _check_replacement(values["autotune"], source["autotune"], rule.autotune, rule.path, policy.source)
            put("autotune", rule.autotune)

    applicable = sources(policy, layer)
    for rule in applicable:
        apply(rule)
    for rule in applicable:
        if kind in rule.tensors:
            apply(rule.tensors[kind])
    k_name = "K_" + SHORT[kind]
    if values[k_name] == 0 and values["enabled"] and not values["variant"].is_variant:
        # version 2 admits K 0 for a variant (its quantized base alone); plain SeedΔ needs entries
        raise SeedDeltaError(f"{policy.source}: {source[k_name]}.K: K 0 is only for a variant weight (the quantized "
                             f"base alone); blk.{layer}.{kind} is plain SeedΔ")
    return Resolved(layer=layer, kind=kind, source=source, **values)


def _check_replacement(old: Autotune, old_path: str, new: Autotune, new_path: str, file: str) -> None:
    if old_path == BASELINE or ("enabled" in new.given and not new.enabled):
        return
    dropped = [k for k in old.given if k not in new.given]
    if dropped:
        names = ", ".join(sorted(dropped))
        raise SeedDeltaError(
            f"{file}: {new_path}.autotune: replaces {old_path}.autotune as a whole and would drop its {names} "
            "(the original silently fell back to their defaults); repeat them, or write \"enabled\": false"
        )


def check_layers(policy: Policy, n_layer: int, model: str = "the model") -> None:
    """Every layer the policy names must exist in a model of `n_layer` layers."""
    last = n_layer - 1
    for i, r in enumerate(policy.ranges):
        if r.max_layer > last:
            raise SeedDeltaError(f"{policy.source}: ranges[{i}].layers: layer {r.max_layer} of {r.selector!r} is "
                                 f"beyond {model} (layers 0-{last})")
    for layer in sorted(policy.layers):
        if layer > last:
            raise SeedDeltaError(f"{policy.source}: layers.{layer}: layer {layer} is beyond {model} (layers 0-{last})")


def resolve_all(policy: Policy, n_layer: int, baseline: Baseline | None = None,
                model: str = "the model") -> list[Resolved]:
    """Every layer × kind of a model with `n_layer` layers, layers ascending, kinds gate, up, down."""
    if n_layer <= 0:
        raise SeedDeltaError(f"{model} has no layers")
    check_layers(policy, n_layer, model)
    return [resolve(policy, layer, kind, baseline) for layer in range(n_layer) for kind in KINDS]


def check_policy(policy: Policy) -> list[Resolved]:
    """Resolve every layer the policy names (and layer 0), so that `policy check` finds what only
    resolution can (an autotune replacement that would drop settings) without a model."""
    last = policy.max_layer()
    return resolve_all(policy, (last if last is not None else 0) + 1, model="the policy's layers")
