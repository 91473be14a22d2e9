"""Hypothesis-generated policies resolve totally (every layer × kind gets a complete setting),
deterministically (same text → same values and provenance) and as an independent, literal
reading of spec-policy-eval §2 says (the oracle below), provenance included.

Run: .venv/bin/python -m pytest tests/toy/test_policy_properties.py
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from seeddelta.policy import parse_policy, resolve_all

KINDS = ("ffn_gate", "ffn_up", "ffn_down")
SHORTS = ("gate", "up", "down")

# --- oracle: spec §2 read literally (accumulate an empty rule, union the tensors maps, merge the
# tensor rule last, copy what is set over the baseline). Values carry the path that set them.
METRIC = {"cos": "cos", "cos_w": "cos_w", "cos-w": "cos_w", "cos_x": "cos_x", "cos-x": "cos_x",
          "cos_x_w": "cos_x_w", "cos-x-w": "cos_x_w", "ffn_score": "ffn_score", "ffn-score": "ffn_score",
          "ffn": "ffn_score"}
BASE_THRESHOLDS = {"gate": (0.45, 0.30), "up": (0.45, 0.30), "down": (0.25, 0.15)}


def o_merge(acc: dict[str, Any], rule: dict[str, Any], label: str) -> None:
    for key, name in (("enabled", "enabled"), ("enable", "enabled"), ("strip_dense", "strip_dense"),
                      ("strip", "strip_dense"), ("block", "block"), ("base", "base"), ("row_scale", "row_scale"),
                      ("delta_norm_clamp", "delta_norm_clamp")):
        if key in rule:
            acc[name] = (rule[key], label)
    if "K" in rule:
        K = rule["K"]
        for s in SHORTS:
            if not isinstance(K, dict) or s in K:
                acc["K_" + s] = (K[s] if isinstance(K, dict) else K, label)
    gating = rule.get("gating", {})
    for metric in (rule.get("metric"), rule.get("gating_metric"), gating.get("metric")):
        if metric is not None:
            acc["metric"] = (METRIC[metric], label)
    for name in ("min_mean", "min_p05"):
        if name in gating:
            v = gating[name]
            for s in SHORTS:
                if not isinstance(v, dict) or s in v:
                    acc[f"{name}.{s}"] = (float(v[s] if isinstance(v, dict) else v), label)
    if "autotune" in rule:
        a = rule["autotune"]
        acc["autotune"] = ((a.get("enabled", False), a.get("schedule_gate_up", []), a.get("schedule_down", []),
                            a.get("max_iters", 0)), label)
    for kind, sub in rule.get("tensors", {}).items():
        o_merge(acc.setdefault("tensors", {}).setdefault(kind, {}), sub, f"{label}.tensors.{kind}")


def o_selects(selector: str, layer: int) -> bool:
    for token in selector.split(","):
        lo, _, hi = token.strip().partition("-")
        a, b = int(lo), int(hi) if hi else int(lo)
        if min(a, b) <= layer <= max(a, b):
            return True
    return False


def oracle(doc: dict[str, Any], layer: int, kind: str) -> dict[str, tuple[Any, str]]:
    acc: dict[str, Any] = {}
    if "defaults" in doc:
        o_merge(acc, doc["defaults"], "defaults")
    for i, rng in enumerate(doc.get("ranges", [])):
        if o_selects(rng["layers"], layer):
            o_merge(acc, rng, f"ranges[{i}]")
    if str(layer) in doc.get("layers", {}):
        o_merge(acc, doc["layers"][str(layer)], f"layers.{layer}")
    acc.update(acc.pop("tensors", {}).get(kind, {}))
    short = {"ffn_gate": "gate", "ffn_up": "up", "ffn_down": "down"}[kind]
    out: dict[str, tuple[Any, str]] = {
        "enabled": (True, "baseline"), "strip_dense": (False, "baseline"), "block": (32, "baseline"),
        "K_gate": (32, "baseline"), "K_up": (32, "baseline"), "K_down": (32, "baseline"),
        "metric": ("cos_x_w", "baseline"), "min_mean": (BASE_THRESHOLDS[short][0], "baseline"),
        "min_p05": (BASE_THRESHOLDS[short][1], "baseline"), "autotune": ((False, [], [], 0), "baseline"),
        "base": ("none", "baseline"), "row_scale": (False, "baseline"), "delta_norm_clamp": (0.0, "baseline"),
    }
    for name, value in acc.items():
        if name.startswith(("min_mean.", "min_p05.")):
            field, s = name.split(".")
            if s == short:
                out[field] = value
        else:
            out[name] = value
    return out


# --- strategies: valid policies only (partial autotune objects never replace others: such a
# replacement is an error, tested in test_policy_rules.py).
ks = st.integers(1, 512)
thr = st.floats(-1.0, 1.0, allow_nan=False, width=32)


def per_kind(values: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return values | st.dictionaries(st.sampled_from(SHORTS), values, min_size=1)


autotune = st.just({"enabled": False}) | st.builds(
    lambda e, gu, d, m: {"enabled": e, "schedule_gate_up": gu, "schedule_down": d, "max_iters": m},
    st.booleans(), st.lists(ks, max_size=4), st.lists(ks, max_size=4), st.integers(0, 5))


@st.composite
def rule(draw: st.DrawFn, version: int, with_tensors: bool) -> dict[str, Any]:
    r: dict[str, Any] = {}
    if draw(st.booleans()):
        r[draw(st.sampled_from(["enabled", "enable"]))] = draw(st.booleans())
    if draw(st.booleans()):
        r[draw(st.sampled_from(["strip_dense", "strip"]))] = draw(st.booleans())
    if draw(st.booleans()):
        r["block"] = draw(st.integers(1, 64))
    if draw(st.booleans()):
        r["K"] = draw(per_kind(ks))
    where = draw(st.sampled_from(["none", "metric", "gating_metric", "gating"]))
    gating: dict[str, Any] = {}
    if where != "none":
        metric = draw(st.sampled_from(sorted(METRIC)))
        (gating if where == "gating" else r)["metric" if where != "gating_metric" else "gating_metric"] = metric
    for name in ("min_mean", "min_p05"):
        if draw(st.booleans()):
            gating[name] = draw(per_kind(thr))
    if gating:
        r["gating"] = gating
    if draw(st.integers(0, 3)) == 0:
        r["autotune"] = draw(autotune)
    if version == 2:
        if draw(st.booleans()):
            r["base"] = draw(st.sampled_from(["none", "xor_circulant"]))
        if draw(st.booleans()):
            r["row_scale"] = draw(st.booleans())
        if draw(st.booleans()):
            r["delta_norm_clamp"] = draw(st.floats(0.0, 4.0, allow_nan=False, width=32))
    if with_tensors and draw(st.booleans()):
        r["tensors"] = draw(st.dictionaries(st.sampled_from(KINDS), rule(version, False), max_size=3))
    return r


@st.composite
def selector(draw: st.DrawFn, n_layer: int) -> str:
    layer = st.integers(0, n_layer - 1)
    tokens = []
    for _ in range(draw(st.integers(1, 3))):
        a = draw(layer)
        tokens.append(f"{a}-{draw(layer)}" if draw(st.booleans()) else str(a))
    return draw(st.sampled_from([",", ", "])).join(tokens)


@st.composite
def policies(draw: st.DrawFn) -> tuple[int, dict[str, Any]]:
    n_layer = draw(st.integers(1, 6))
    version = draw(st.sampled_from([1, 2]))
    doc: dict[str, Any] = {"version": version}
    if draw(st.booleans()):
        doc["defaults"] = draw(rule(version, True))
    if draw(st.booleans()):
        doc["ranges"] = [{"layers": draw(selector(n_layer)), **draw(rule(version, True))}
                         for _ in range(draw(st.integers(0, 3)))]
    if draw(st.booleans()):
        chosen = draw(st.lists(st.integers(0, n_layer - 1), unique=True, max_size=3))
        doc["layers"] = {str(layer): draw(rule(version, True)) for layer in chosen}
    return n_layer, doc


def resolved_table(text: str, n_layer: int) -> list[dict[str, Any]]:
    return [dict(r.to_json(), all_sources=dict(r.source)) for r in resolve_all(parse_policy(text, strict=True), n_layer)]


@given(policies())
def test_resolution_is_total_deterministic_and_matches_the_spec_oracle(case):
    n_layer, doc = case
    text = json.dumps(doc)
    rows = resolve_all(parse_policy(text, strict=True), n_layer)
    # total: every layer × kind, in order, every field of the right type
    assert [(r.layer, r.kind) for r in rows] == [(layer, k) for layer in range(n_layer) for k in KINDS]
    for r in rows:
        assert isinstance(r.enabled, bool) and isinstance(r.strip_dense, bool) and r.block >= 1
        assert min(r.K_gate, r.K_up, r.K_down) >= 1 and r.metric in set(METRIC.values())
        assert r.k_schedule() and all(k >= 1 for k in r.k_schedule())
    # deterministic: a second load and resolution gives the same values and provenance
    assert json.dumps(resolved_table(text, n_layer)) == json.dumps(resolved_table(text, n_layer))
    # as the spec says
    for r in rows:
        want = oracle(doc, r.layer, r.kind)
        at = r.autotune
        got = {name: (getattr(r, name), r.source[name]) for name in want if name != "autotune"}
        got["autotune"] = ((at.enabled, list(at.schedule_gate_up), list(at.schedule_down), at.max_iters),
                           r.source["autotune"])
        assert got == want, (r.layer, r.kind)
