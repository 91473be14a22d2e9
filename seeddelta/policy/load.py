"""Loading a policy file: JSON → validated `Policy`, or one error line naming file and JSON path.

Follows the original's schema (spec-policy-eval §1) with these deliberate differences — each
was a silent misreading in the original and is a loud error here:

* an unknown gating metric (the original fell back to `cos`), a float or string `K` (ignored),
  a float `block` (truncated), `K`/`block`/schedule values <= 0 (dropped or divided by zero),
  a threshold that is neither a number nor a `{gate, up, down}` object (warned), a threshold
  above 1 (a cosine can never pass it), a non-object `defaults`/`layers`/`ranges[i]`/`gating`/
  `autotune`/`tensors` (ignored), an unknown kind in `tensors` or in a per-kind object (ignored:
  `attn_q` was "accepted but never matched"), `tensors` inside a tensor rule (no effect), an
  alias given next to its key (`enable` + `enabled`), duplicate object keys, NaN/Infinity;
* `version` must be 1 (the original's schema) or 2 (ours: adds `base`, `row_scale`,
  `delta_norm_clamp` and `variant` to rule objects); under version 1 those keys are unknown keys,
  so an original file keeps its meaning. `variant` is "none", "sdq", or an object
  {"name": "sdq", "base_type", "quantizer", "rotate", "holdout", "coding", "refit"} whose omitted
  fields take `VariantSpec`'s defaults (Q4_0, rtn, false, false, coo, none); it replaces an earlier
  rule's variant as a whole;
* unknown keys inside `gating` and `autotune` are unknown keys like any other (the original
  skipped them even in strict mode); `layers`/`version` inside a rule object are reported as
  having no effect. Every such warning is an error under `strict` (`--policy-strict`).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, NoReturn

from seeddelta.builder.options import VariantSpec
from seeddelta.builder.report import policy_hash
from seeddelta.codec.regime import STATISTICS, DeltaRegime
from seeddelta.errors import SeedDeltaError
from seeddelta.policy.jsontext import JSONObject, NonFinite, join, json_type, parse_json_text, read_json_file
from seeddelta.policy.schema import (
    ALIASES,
    AUTOTUNE_KEYS,
    DELTA_REGIME_KEYS,
    GATING_KEYS,
    KIND_OF_SHORT,
    KINDS,
    MAX_BLOCK,
    MAX_LAYER_ID,
    METRIC_ALIASES,
    METRICS,
    POLICY_BASE_KINDS,
    RULE_KEYS_V1,
    RULE_KEYS_V2,
    SHORT,
    TOP_KEYS,
    VARIANT_KEYS,
    VERSIONS,
    Autotune,
    Policy,
    RangeRule,
    Rule,
)
from seeddelta.policy.selector import parse_selector

_LAYER_KEY = re.compile(r"^\d+$")


@dataclass
class _Ctx:
    source: str
    strict: bool
    version: int = 1
    warnings: list[str] = field(default_factory=list)

    def fail(self, path: str, message: str) -> NoReturn:
        raise SeedDeltaError(f"{self.source}: {path}: {message}")

    def warn(self, path: str, message: str) -> None:
        if self.strict:
            self.fail(path, f"{message} (--policy-strict)")
        self.warnings.append(f"{self.source}: {path}: {message}")

    def obj(self, value: Any, path: str, what: str = "an object") -> JSONObject:
        if not isinstance(value, JSONObject):
            self.fail(path, f"must be {what}, got {json_type(value)}")
        if value.duplicates:
            self.fail(join(path, value.duplicates[0]), "key given more than once in the same object")
        return value

    def integer(self, value: Any, path: str, lo: int, hi: int | None = None, note: str = "") -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            shown = value if isinstance(value, float) else json_type(value)
            self.fail(path, f"must be an integer, got {shown}{note}")
        if value < lo or (hi is not None and value > hi):
            bound = f">= {lo}" if hi is None else f"in {lo}..{hi}"
            self.fail(path, f"must be {bound}, got {value}")
        return value

    def number(self, value: Any, path: str) -> float:
        if isinstance(value, NonFinite):
            self.fail(path, f"must be a finite number, got {value.text}")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.fail(path, f"must be a number, got {json_type(value)}")
        return float(value)

    def boolean(self, value: Any, path: str) -> bool:
        if not isinstance(value, bool):
            self.fail(path, f"must be true or false, got {json_type(value)}")
        return value


def load_policy(path: str | os.PathLike[str], *, strict: bool = False) -> Policy:
    """Read and validate a policy file. Raises SeedDeltaError naming the file and the place."""
    raw, doc = read_json_file(path, "policy file")
    return policy_from_json(doc, source=os.fspath(path), raw=raw, strict=strict)


def parse_policy(text: str, *, source: str = "<policy>", strict: bool = False) -> Policy:
    """A policy from JSON text (the hash is taken over its UTF-8 bytes)."""
    return policy_from_json(parse_json_text(text, source), source=source, raw=text.encode("utf-8"), strict=strict)


def policy_from_json(doc: Any, *, source: str, raw: bytes, strict: bool = False) -> Policy:
    ctx = _Ctx(source, strict)
    top = ctx.obj(doc, "top level", "a JSON object (a policy)")
    if "version" in top:
        ctx.version = ctx.integer(top["version"], "version", 0)
        if ctx.version not in VERSIONS:
            ctx.fail("version", f"unsupported policy version {ctx.version} (1: the original's schema, 2: 1 plus "
                                "seeddelta's keys base, row_scale, delta_norm_clamp, dense_rows, delta_regime)")
    for key in top:
        if key not in TOP_KEYS:
            ctx.warn(key, f"unknown top-level key in policy: {key}")
    defaults = _rule(ctx, top["defaults"], "defaults") if "defaults" in top else None
    ranges: list[RangeRule] = []
    if "ranges" in top:
        if not isinstance(top["ranges"], list):
            ctx.fail("ranges", f"must be an array of rule objects, got {json_type(top['ranges'])}")
        for i, item in enumerate(top["ranges"]):
            path = join("ranges", i)
            item = ctx.obj(item, path)
            if "layers" not in item:
                ctx.fail(path, "a range needs a \"layers\" selector string (e.g. \"8-20,24\")")
            selector = item["layers"]
            if not isinstance(selector, str):
                ctx.fail(join(path, "layers"), f"must be a selector string like \"8-20,24\", got {json_type(selector)}")
            try:
                intervals = parse_selector(selector)
            except ValueError as exc:
                ctx.fail(join(path, "layers"), str(exc))
            ranges.append(RangeRule(selector, intervals, _rule(ctx, item, path, in_range=True)))
    layers: dict[int, Rule] = {}
    if "layers" in top:
        for key, value in ctx.obj(top["layers"], "layers", "an object of layer id -> rule").items():
            path = join("layers", key)
            if not _LAYER_KEY.match(key):
                ctx.fail(path, f"a layer key must be a decimal layer id like \"12\", got {key!r}")
            layer = int(key)
            if layer > MAX_LAYER_ID:
                ctx.fail(path, f"layer {layer} is not a layer id (at most {MAX_LAYER_ID})")
            if layer in layers:
                ctx.fail(path, f"layer {layer} is given twice (as {layers[layer].path} and {path})")
            layers[layer] = _rule(ctx, value, f"layers.{layer}")
    return Policy(source, ctx.version, defaults, tuple(ranges), layers, tuple(ctx.warnings), policy_hash(raw))


def _rule(ctx: _Ctx, value: Any, path: str, *, in_range: bool = False, kind: str | None = None) -> Rule:
    obj = ctx.obj(value, path, "a rule object")
    known = RULE_KEYS_V1 | (RULE_KEYS_V2 if ctx.version >= 2 else frozenset())
    for key in obj:
        if key in known or (key == "layers" and in_range):
            continue
        if key in ("layers", "version"):
            ctx.warn(join(path, key), f"`{key}` has no effect inside a rule object (only ranges[i] take `layers`)")
        elif key in RULE_KEYS_V2:
            ctx.warn(path, f"unknown key in policy: {key} (a seeddelta key: declare \"version\": 2 to use it)")
        else:
            ctx.warn(path, f"unknown key in policy: {key}")
    for alias, name in ALIASES.items():
        if alias in obj and name in obj:
            ctx.fail(join(path, alias), f"both `{name}` and its alias `{alias}` are given")
    gating = ctx.obj(obj["gating"], join(path, "gating")) if "gating" in obj else JSONObject()
    metric_keys = [k for k in ("metric", "gating_metric") if k in obj] + (["gating.metric"] if "metric" in gating else [])
    if len(metric_keys) > 1:
        ctx.fail(path, f"the gating metric is given twice ({' and '.join(metric_keys)})")
    fields: dict[str, Any] = {}
    for key in ("enabled", "enable"):
        if key in obj:
            fields["enabled"] = ctx.boolean(obj[key], join(path, key))
    for key in ("strip_dense", "strip"):
        if key in obj:
            fields["strip_dense"] = ctx.boolean(obj[key], join(path, key))
    if "block" in obj:
        fields["block"] = ctx.integer(obj["block"], join(path, "block"), 1, MAX_BLOCK)
    if "K" in obj:
        fields["K"] = _per_kind(ctx, obj["K"], join(path, "K"), _k_value)
    for key in ("metric", "gating_metric"):
        if key in obj:
            fields["metric"] = _metric(ctx, obj[key], join(path, key))
    gpath = join(path, "gating")
    for key in gating:
        if key not in GATING_KEYS:
            ctx.warn(gpath, f"unknown key in policy: {key}")
    if "metric" in gating:
        fields["metric"] = _metric(ctx, gating["metric"], join(gpath, "metric"))
    for key in ("min_mean", "min_p05"):
        if key in gating:
            fields[key] = _per_kind(ctx, gating[key], join(gpath, key), _threshold)
    if "autotune" in obj:
        fields["autotune"] = _autotune(ctx, obj["autotune"], join(path, "autotune"))
    if "tensors" in obj:
        tpath = join(path, "tensors")
        if kind is not None:
            ctx.fail(tpath, "a tensor rule cannot hold `tensors` of its own (the original ignored them)")
        tensors: dict[str, Rule] = {}
        for name, sub in ctx.obj(obj["tensors"], tpath, "an object of kind -> rule").items():
            if name not in KINDS:
                ctx.fail(join(tpath, name), f"unknown kind {name!r} (expected {', '.join(KINDS)})")
            tensors[name] = _rule(ctx, sub, join(tpath, name), kind=name)
        fields["tensors"] = tensors
    if ctx.version >= 2:
        if "base" in obj:
            base = obj["base"]
            if not isinstance(base, str) or base not in POLICY_BASE_KINDS:
                shown = repr(base) if isinstance(base, str) else json_type(base)
                ctx.fail(join(path, "base"), f"unknown base kind {shown} (expected {', '.join(POLICY_BASE_KINDS)})")
            fields["base"] = base
        if "row_scale" in obj:
            fields["row_scale"] = ctx.boolean(obj["row_scale"], join(path, "row_scale"))
        if "delta_norm_clamp" in obj:
            clamp = ctx.number(obj["delta_norm_clamp"], join(path, "delta_norm_clamp"))
            if clamp < 0:
                ctx.fail(join(path, "delta_norm_clamp"), f"must be >= 0 (0: off), got {clamp:g}")
            fields["delta_norm_clamp"] = clamp
        if "variant" in obj:
            fields["variant"] = _variant(ctx, obj["variant"], join(path, "variant"))
        if "dense_rows" in obj:
            share = ctx.number(obj["dense_rows"], join(path, "dense_rows"))
            if not 0 <= share <= 1:
                ctx.fail(join(path, "dense_rows"), f"must be a share of the rows in [0, 1] (0: off), got {share:g}")
            fields["dense_rows"] = share
        if "delta_regime" in obj:
            fields["delta_regime"] = _delta_regime(ctx, obj["delta_regime"], join(path, "delta_regime"))
    return Rule(path=path, **fields)


def _delta_regime(ctx: _Ctx, value: Any, path: str) -> DeltaRegime:
    """A version-2 `delta_regime`: {"statistic": "rms"|"max_abs", "min": number, "max": number}, a bound
    omitted = open; Δ is applied where min ≤ statistic ≤ max (codec.regime)."""
    import math

    obj = ctx.obj(value, path, 'an object {"statistic", "min", "max"}')
    for key in obj:
        if key not in DELTA_REGIME_KEYS:
            ctx.fail(join(path, key), f"unknown delta_regime key (expected {', '.join(DELTA_REGIME_KEYS)})")
    if "statistic" not in obj:
        ctx.fail(join(path, "statistic"), f"missing (one of {', '.join(STATISTICS)})")
    stat = obj["statistic"]
    if not isinstance(stat, str) or stat not in STATISTICS:
        shown = repr(stat) if isinstance(stat, str) else json_type(stat)
        ctx.fail(join(path, "statistic"), f"unknown statistic {shown} (expected {', '.join(STATISTICS)})")
    lo = ctx.number(obj["min"], join(path, "min")) if "min" in obj else -math.inf
    hi = ctx.number(obj["max"], join(path, "max")) if "max" in obj else math.inf
    if lo > hi:
        ctx.fail(path, f"min {lo:g} > max {hi:g} (an empty regime)")
    return DeltaRegime(stat, lo, hi)


def _variant(ctx: _Ctx, value: Any, path: str) -> VariantSpec:
    """A version-2 `variant`: a name, or an object of VariantSpec fields (omitted ones: its defaults)."""
    if isinstance(value, str):
        spec = VariantSpec(name=value)
    else:
        obj = ctx.obj(value, path, 'a variant name ("none", "sdq") or an object')
        for key in obj:
            if key not in VARIANT_KEYS:
                ctx.fail(join(path, key), f"unknown variant key (expected {', '.join(VARIANT_KEYS)})")
        if "name" not in obj:
            ctx.fail(join(path, "name"), "missing (the variant's name: none or sdq)")
        fields: dict[str, Any] = {}
        for key in VARIANT_KEYS:
            if key not in obj:
                continue
            if key in ("rotate", "holdout"):
                fields[key] = ctx.boolean(obj[key], join(path, key))
            elif not isinstance(obj[key], str):
                ctx.fail(join(path, key), f"must be a string, got {json_type(obj[key])}")
            else:
                fields[key] = obj[key]
        spec = VariantSpec(**fields)
    problem = spec.problem()
    if problem is not None:
        ctx.fail(path, problem)
    return spec


def _k_value(ctx: _Ctx, value: Any, path: str) -> int:
    # version 2: K 0 = a variant's quantized base alone (resolve refuses it for a plain SeedΔ weight)
    return ctx.integer(value, path, 0 if ctx.version >= 2 else 1,
                       note=" (the original silently ignored a K that is not an integer)")


def _threshold(ctx: _Ctx, value: Any, path: str) -> float:
    number = ctx.number(value, path)
    if number > 1.0:
        ctx.fail(path, f"a cosine threshold must be <= 1 (negative: gating off), got {number:g}")
    return number


def _per_kind(ctx: _Ctx, value: Any, path: str, read: Any) -> dict[str, Any]:
    """A scalar (all three kinds) or a `{gate, up, down}` object (the listed kinds only)."""
    if isinstance(value, JSONObject):
        ctx.obj(value, path)
        out: dict[str, Any] = {}
        for short, member in value.items():
            if short not in KIND_OF_SHORT:
                ctx.fail(join(path, short), f"unknown kind {short!r} (expected {', '.join(SHORT.values())})")
            out[KIND_OF_SHORT[short]] = read(ctx, member, join(path, short))
        return out
    if isinstance(value, (list, str)) or value is None:
        ctx.fail(path, f"must be a number or an object {{gate, up, down}}, got {json_type(value)}")
    scalar = read(ctx, value, path)
    return {kind: scalar for kind in KINDS}


def _metric(ctx: _Ctx, value: Any, path: str) -> str:
    if not isinstance(value, str) or value not in METRIC_ALIASES:
        shown = repr(value) if isinstance(value, str) else json_type(value)
        aliases = sorted(set(METRIC_ALIASES) - set(METRICS))
        ctx.fail(path, f"unknown gating metric {shown} (expected {', '.join(METRICS)} or an alias: "
                       f"{', '.join(aliases)}; the original read anything else as cos)")
    return METRIC_ALIASES[value]


def _autotune(ctx: _Ctx, value: Any, path: str) -> Autotune:
    obj = ctx.obj(value, path)
    for key in obj:
        if key not in AUTOTUNE_KEYS:
            ctx.warn(path, f"unknown key in policy: {key}")
    fields: dict[str, Any] = {}
    if "enabled" in obj:
        fields["enabled"] = ctx.boolean(obj["enabled"], join(path, "enabled"))
    for key in ("schedule_gate_up", "schedule_down"):
        if key in obj:
            items = obj[key]
            if not isinstance(items, list):
                ctx.fail(join(path, key), f"must be an array of K values, got {json_type(items)}")
            fields[key] = tuple(_k_value(ctx, k, join(join(path, key), i)) for i, k in enumerate(items))
    if "max_iters" in obj:
        fields["max_iters"] = ctx.integer(obj["max_iters"], join(path, "max_iters"), 0)
    return Autotune(**fields, given=frozenset(k for k in obj if k in AUTOTUNE_KEYS))
