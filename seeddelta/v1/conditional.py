"""The v1 plan's mechanism 3, dendritic (conditional) Δ, as measured settings and a verdict.

On top of the gate-only reference (same gate layers, same K), each gate's Δ is applied only for the
tokens whose input statistic (`M3_STATISTIC` of the ffn_gate input row) lies on one side of its
calibration quantile: **above** (Δ for the large inputs, the small ones skip it — TEAL/CATS skip small
activations) or **below** (the reverse), at each q of `M3_QUANTILES`. The quantile is taken per gate
layer over every position of the calibration text (the run's --calibration, windows of 512) on the
original model, and the resolved bound is written into the policy (so into the file, as float32).
At q the share of calibration tokens that skip Δ is q ("above") or 1 − q ("below"); the measured
share on the evaluation text is reported per context beside the quality (compute saved: the share of
(token, gate) pairs whose Δ was skipped, and the Δ FLOPs skipped as a share of the dense FFN's FLOPs).

Exit rule (the note's "keep if it removes the ctx>1280 flip or reduces variance", made measurable
with the brief's "quality within the reference's while saving compute"): a setting passes when, paired
against the gate-only reference, ΔPPL's 95 % interval reaches ≤ 0 at ctx 512 and 1024 (those measured;
no measurable loss), ΔPPL at ctx 2048 is ≤ +M3_MAX_DPPL_PCT_2048 % (the v1 tolerance at 2048), and it skipped Δ for
some tokens. Keep when some setting passes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from seeddelta.v1.experiments import Setting, _spec
from seeddelta.v1.policies import policy_text
from seeddelta.v1.profiles import Profile

M3_STATISTIC = "rms"  # cheap per token: one reduction over the input row
M3_QUANTILES = (0.25, 0.5, 0.75)
M3_SIDES = ("above", "below")
M3_MAX_DPPL_PCT_2048 = 0.5
# (side, q) measured: both sides at each of M3_QUANTILES, and both sides skipping a tenth of the tokens;
# SmolLM2 (slow on a shared 2-core machine): the two tenth-skipping settings and "above" at 0.25
M3_GRID: tuple[tuple[str, float], ...] = tuple((s, q) for s in M3_SIDES for q in M3_QUANTILES) + (
    ("above", 0.1), ("below", 0.9))
M3_GRID_SMOLLM2: tuple[tuple[str, float], ...] = (("above", 0.1), ("below", 0.9), ("above", 0.25))


def grid(p: Profile) -> tuple[tuple[str, float], ...]:
    return M3_GRID_SMOLLM2 if p.name == "smollm2" else M3_GRID


def quantiles(p: Profile) -> tuple[float, ...]:
    """The calibration quantiles the profile's settings need."""
    return tuple(sorted({q for _, q in grid(p)}))


def m3(p: Profile, calibration: Mapping[str, Any], encoding: Mapping[str, Any], evals: tuple[tuple[int, int], ...],
       greedy: int | None) -> list[Setting]:
    """The gate-only reference with each gate's Δ applied above (or below) its layer's q-quantile."""
    out = []
    stat = calibration["statistic"]
    for side, q in grid(p):
        doc = json.loads(policy_text(p, p.gate_layers))
        bounds = {}
        for layer in p.gate_layers:
            b = calibration["quantiles"][str(layer)][f"{q:g}"]
            regime = {"statistic": stat, "min": b} if side == "above" else {"statistic": stat, "max": b}
            doc["layers"][str(layer)]["tensors"]["ffn_gate"]["delta_regime"] = regime
            bounds[str(layer)] = b
        skip = q if side == "above" else 1 - q
        out.append(Setting("m3", f"Δ when {stat} {'≥' if side == 'above' else '≤'} q{q:g} (skip ~{skip:.0%})",
                           {"side": side, "quantile": q, "statistic": stat, "bounds": bounds,
                            "calibration_skip": skip},
                           _spec(f"v1-m3-{side}-{q:g}", json.dumps(doc, indent=2) + "\n", encoding, evals, greedy)))
    return out


def add_compute_saved(row: dict[str, Any], result: Mapping[str, Any]) -> dict[str, Any]:
    """The measured compute saved at each context beside the row's quality figures."""
    for ctx, c in row["ctx"].items():
        saved = result.get(f"ctx{ctx}", {}).get("conditional_delta")
        if saved is not None:
            c["compute_saved"] = {k: saved[k] for k in ("pairs", "pairs_skipped", "pairs_skipped_fraction",
                                                        "delta_flops_skipped_fraction", "ffn_flops_skipped_fraction",
                                                        "per_tensor")}
    return row


def m3_verdict(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    passing, details = [], []
    for r in rows:
        c = r["ctx"]
        mid = [c[x]["vs_reference"] for x in ("512", "1024") if "vs_reference" in c.get(x, {})]  # those measured
        last = c.get("2048", {}).get("vs_reference")
        saved = max((x.get("compute_saved", {}).get("pairs_skipped", 0) for x in c.values()), default=0)
        ok_mid = all(m["ci95"][0] <= 0 for m in mid)
        ok_last = last is not None and last["pct"] <= M3_MAX_DPPL_PCT_2048
        if ok_mid and ok_last and saved > 0:
            passing.append(r["label"])
        details.append(f"{r['label']}: vs gate-only " + ", ".join(
            f"@{x} {c[x]['vs_reference']['pct']:+.2f} %" for x in ("512", "1024", "2048") if "vs_reference" in c.get(x, {})))
    return {"keep": bool(passing), "passing": passing, "details": details,
            "rule": "against the gate-only reference: ΔPPL 95 % interval reaches ≤ 0 at ctx 512 and 1024 (where measured), "
                    "ΔPPL@2048 ≤ "
                    f"+{M3_MAX_DPPL_PCT_2048:g} %, and Δ skipped for some tokens",
            "side_effect": side_comparison(rows)}


def side_comparison(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Which side matters: at the same calibration skip share, ΔPPL@2048 vs the reference above vs below."""
    by = {(r["side"], round(float(r["calibration_skip"]), 6)): r for r in rows}
    out = []
    for skip in sorted({k[1] for k in by}):
        a, b = by.get(("above", skip)), by.get(("below", skip))
        if a is None or b is None:
            continue

        def at(r: Mapping[str, Any]) -> float | None:
            c = r["ctx"].get("2048", {}).get("vs_reference")
            return None if c is None else float(c["pct"])
        out.append({"skip": skip, "above_2048": at(a), "below_2048": at(b)})
    return out


def markdown_lines(exp: Mapping[str, Any], ctxs: Sequence[str]) -> list[str]:
    """Compute saved per setting and context, the calibration bounds, and the side comparison."""
    cal = exp["calibration"]
    lines = [f"Calibration: {cal['statistic']} of each gate's input over {cal['tokens']:,} calibration positions; "
             f"bounds per layer {cal['quantiles']}.", "",
             "| setting | " + " | ".join(f"Δ skipped @{c} (pairs) | FFN FLOPs saved @{c}" for c in ctxs) + " |",
             "|---|" + "---|---|" * len(ctxs)]
    for r in exp["rows"]:
        cells = []
        for c in ctxs:
            s = r["ctx"].get(c, {}).get("compute_saved")
            cells += ["–", "–"] if s is None else [f"{100 * s['pairs_skipped_fraction']:.1f} %",
                                                  f"{100 * s['ffn_flops_skipped_fraction']:.2f} %"]
        lines.append(f"| {r['label']} | " + " | ".join(cells) + " |")
    side = exp["verdict"].get("side_effect") or []
    if side:
        lines += ["", "Which side matters (ΔPPL@2048 vs gate-only at the same calibration skip share): " + "; ".join(
            f"skip {x['skip']:.0%}: above {x['above_2048']:+.2f} %, below {x['below_2048']:+.2f} %" for x in side
            if x["above_2048"] is not None and x["below_2048"] is not None) + "."]
    return lines + [""]
