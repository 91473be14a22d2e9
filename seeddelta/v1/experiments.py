"""The down triage (H1, H2, H3a, H3b) as measurements and the analysis of their results.

Every setting is measured like a regress preset (`regress.measure`): built from its policy, then
paired ΔNLL/KLD against the original on the same windows at each context, the greedy pack (when
the model has one), file size and resident memory in a fresh process. Each row is also compared,
window by window, with the **gate-only reference** (the same gate layers, nothing else): that
difference is what adding ffn_down costs, and what the exit rule judges.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from seeddelta.regress.criteria import FIGURE_SPREAD_Z, FRAGILE_DELTA_NLL, PAGE_BYTES
from seeddelta.regress.measure import Spec
from seeddelta.regress.stats import bootstrap_windows, pct_from_nll, spearman
from seeddelta.v1.policies import gate_only, policy_text
from seeddelta.v1.profiles import Profile

REFERENCE = "gate-only"
# The note's exit rule for ffn_down: ΔPPL at ctx 2048 within +2 % (here: against the gate-only reference,
# the cost of adding down) together with a resident-memory drop beyond the measurement's spread.
DOWN_MAX_DPPL_PCT_2048 = 2.0
# H2: the harmless layers' quantiles the down-only thresholds are set at. Tighter than the gate's rule
# in the regress suite (the lowest value every harmless unit reached): a quarter of the harmless layers
# would already be refused, so the margin is inside the harmless range, not at its edge.
H2_COS_QUANTILE = 0.25
H2_L2_QUANTILE = 0.75
H2_METRICS = (("cos_p05_x_w", "min"), ("rel_l2_p95_x_w", "max"), ("cos_p05", "min"), ("rel_l2_p95", "max"))


@dataclass(frozen=True)
class Setting:
    """One measured setting: its experiment, a label, its parameters and the spec that measures it."""

    experiment: str
    label: str
    params: Mapping[str, Any]
    spec: Spec


def _spec(name: str, policy: str, encoding: Mapping[str, Any], evals: tuple[tuple[int, int], ...],
          greedy_limit: int | None) -> Spec:
    return Spec(name, dict(encoding), policy=policy, evals=evals, greedy_limit=greedy_limit, memory=True)


def reference(p: Profile, encoding: Mapping[str, Any], evals: tuple[tuple[int, int], ...],
              greedy_limit: int | None) -> Setting:
    return Setting("reference", REFERENCE, {"gate_layers": list(p.gate_layers), "K_gate": p.K_gate},
                   _spec("v1-gate-only", gate_only(p), encoding, evals, greedy_limit))


def h1(p: Profile, encoding: Mapping[str, Any], evals: tuple[tuple[int, int], ...], greedy_limit: int | None
       ) -> list[Setting]:
    """Gate fixed (the reference), ffn_down added in one layer at each K_down (each of p.down_layers)."""
    return [Setting("h1", f"down L{layer} K {k}", {"layer": layer, "K_down": k},
                    _spec(f"v1-h1-{layer}-{k}", policy_text(p, p.gate_layers, {layer: {"K": k}}), encoding, evals,
                          greedy_limit))
            for layer in p.down_layers for k in p.K_down]


def h3a(p: Profile, encoding: Mapping[str, Any], evals: tuple[tuple[int, int], ...], greedy_limit: int | None
        ) -> list[Setting]:
    """H1's setting at K_down_ref with ‖Δ_down‖ clamped to τ·‖W‖ (gate unchanged)."""
    return [Setting("h3a", f"down L{layer} K {p.K_down_ref} τ {tau:g}", {"layer": layer, "K_down": p.K_down_ref,
                                                                          "tau": tau},
                    _spec(f"v1-h3a-{layer}-{tau:g}", policy_text(p, p.gate_layers, {layer: {
                        "K": p.K_down_ref, "delta_norm_clamp": tau}}), encoding, evals, greedy_limit))
            for layer in p.down_layers[-1:] for tau in p.taus]  # the repair layer (run.repair_profile)


def h3b(p: Profile, encoding: Mapping[str, Any], evals: tuple[tuple[int, int], ...], greedy_limit: int | None
        ) -> list[Setting]:
    """H1's setting at K_down_ref with the share f of down's rows SeedΔ fits worst kept dense."""
    return [Setting("h3b", f"down L{layer} K {p.K_down_ref} dense rows {f:g}", {"layer": layer,
                                                                                 "K_down": p.K_down_ref,
                                                                                 "dense_rows": f},
                    _spec(f"v1-h3b-{layer}-{f:g}", policy_text(p, p.gate_layers, {layer: {
                        "K": p.K_down_ref, "dense_rows": f}}), encoding, evals, greedy_limit))
            for layer in p.down_layers[-1:] for f in p.dense_fractions]


def h2_units(p: Profile, encoding: Mapping[str, Any], chunks: int) -> list[Setting]:
    """ffn_down alone (no gate) in each H2 layer at K_down_ref, ctx 512: its metrics and its damage."""
    return [Setting("h2", f"down L{layer} alone K {p.K_down_ref}", {"layer": layer, "K_down": p.K_down_ref},
                    Spec(f"v1-h2-{layer}", dict(encoding), policy=policy_text(p, (), {layer: {"K": p.K_down_ref}}),
                         evals=((512, chunks),)))
            for layer in p.h2_layers]


# ---------------------------------------------------------------------------------- analysis
def _pct_ci(per_window: Sequence[float]) -> dict[str, Any]:
    b = bootstrap_windows(per_window)
    return {"pct": pct_from_nll(b["mean"]), "ci95": [pct_from_nll(b["lo95"]), pct_from_nll(b["hi95"])],
            "delta_nll": b["mean"], "sd": b["sd"]}


def row(s: Setting, r: Mapping[str, Any], ref: Mapping[str, Any] | None, base_memory: Mapping[str, Any]
        ) -> dict[str, Any]:
    """A setting's figures: per context ΔPPL vs the original and vs the reference (paired per window),
    KLD, same top-1; file and resident bytes and their drops vs the original and the reference; greedy."""
    out: dict[str, Any] = {"experiment": s.experiment, "label": s.label, **dict(s.params), "ctx": {}}
    for key, m in r.items():
        if not (key.startswith("ctx") and isinstance(m, dict)):
            continue
        c: dict[str, Any] = {"vs_original": _pct_ci(m["window_delta_nll"]), "kld_mean": m["kld_mean"],
                             "same_top_p": m["same_top_p"], "windows": len(m["window_delta_nll"])}
        if ref is not None and key in ref:
            c["vs_reference"] = _pct_ci([a - b for a, b in zip(m["window_delta_nll"], ref[key]["window_delta_nll"],
                                                                strict=True)])
        out["ctx"][key[3:]] = c
    build = r["build"]
    out["bytes_saved"] = build["bytes_saved"]
    out["weights_encoded"] = build["emitted"]
    mem = r.get("memory")
    if mem is not None:
        out["file_bytes"] = mem["file_bytes"]
        out["rss_bytes"] = mem["rss_anon_load_delta_bytes"]
        out["rss_drop_vs_original"] = base_memory["rss_anon_load_delta_bytes"] - out["rss_bytes"]
        out["file_drop_vs_original"] = base_memory["file_bytes"] - out["file_bytes"]
        if ref is not None and ref.get("memory"):
            out["rss_drop_vs_reference"] = ref["memory"]["rss_anon_load_delta_bytes"] - out["rss_bytes"]
            out["file_drop_vs_reference"] = ref["memory"]["file_bytes"] - out["file_bytes"]
    g = r.get("greedy")
    if g:
        out["greedy"] = {"verdict": g["verdict"], "flagged": g["flagged"], "n": g["n"], "accuracy": g["accuracy"]}
    return out


def rss_needed(base_memory: Mapping[str, Any]) -> float:
    """A resident-memory drop counts when it exceeds FIGURE_SPREAD_Z × the original's measured spread
    (at least one page), as the regress suite's memory criterion."""
    return FIGURE_SPREAD_Z * max(int(base_memory.get("rss_spread_bytes", 0)), PAGE_BYTES)


def down_exit_rule(rows: Sequence[Mapping[str, Any]], base_memory: Mapping[str, Any]) -> dict[str, Any]:
    """The note's rule for ffn_down over the H1/H3 rows: keep when some setting adds at most +2 % PPL at
    ctx 2048 to the gate-only reference while resident memory falls beyond the spread."""
    need = rss_needed(base_memory)
    passing, why = [], []
    for r in rows:
        c = r["ctx"].get("2048")
        if c is None or "vs_reference" not in c:
            why.append(f"{r['label']}: not measured at ctx 2048")
            continue
        dppl = c["vs_reference"]["pct"]
        drop = r.get("rss_drop_vs_reference")
        ok_ppl = dppl <= DOWN_MAX_DPPL_PCT_2048
        ok_mem = drop is not None and drop > need
        if ok_ppl and ok_mem:
            passing.append(r["label"])
        why.append(f"{r['label']}: ΔPPL@2048 vs gate-only {dppl:+.2f} % ({'≤' if ok_ppl else '>'} "
                   f"{DOWN_MAX_DPPL_PCT_2048:g} %), resident drop {drop if drop is not None else 'n/a'} B "
                   f"({'>' if ok_mem else '≤'} {need:.0f} B)")
    best = min((r for r in rows if "2048" in r["ctx"] and "vs_reference" in r["ctx"]["2048"]),
               key=lambda r: r["ctx"]["2048"]["vs_reference"]["pct"], default=None)
    return {"keep": bool(passing), "passing": passing, "rule": f"ΔPPL@2048 vs gate-only ≤ +{DOWN_MAX_DPPL_PCT_2048:g} % "
            f"and resident-memory drop > {need:.0f} B", "best": None if best is None else best["label"],
            "details": why}


def mechanism_effect(rows: Sequence[Mapping[str, Any]], h1_rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Does the repair (H3a clamp, H3b partial strip) help? Each row against H1's row in the same layer at the
    same K_down (no clamp, no dense rows): the change of ΔPPL at ctx 2048 (vs gate-only) and of resident bytes."""
    base = {(r["layer"], r["K_down"]): r for r in h1_rows}
    out = []
    for r in rows:
        b = base.get((r["layer"], r["K_down"]))
        c, cb = r["ctx"].get("2048", {}).get("vs_reference"), (b or {}).get("ctx", {}).get("2048", {}).get("vs_reference")
        if b is None or c is None or cb is None:
            continue
        out.append({"label": r["label"], "h1": b["label"], "dppl_2048_change": c["pct"] - cb["pct"],
                    "rss_drop_change": (r.get("rss_drop_vs_reference") or 0) - (b.get("rss_drop_vs_reference") or 0)})
    return {"against_h1": out, "helps": any(x["dppl_2048_change"] < 0 for x in out)}


def h2_analysis(units: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Down-only thresholds calibrated on the harmless layers, and whether they predict the damage.

    harmful = ΔNLL > FRAGILE_DELTA_NLL with its bootstrap interval above 0 (the regress suite's
    'fragile'). Thresholds: cos metrics at the H2_COS_QUANTILE of the harmless layers' values, l2 metrics
    at H2_L2_QUANTILE. Prediction: leave one layer out, calibrate on the other harmless layers, predict
    the left-out one (pass both = predicted harmless); Spearman ρ of every metric against ΔNLL."""
    import numpy as np

    pts = [u for u in units if u.get("metrics")]
    for u in pts:
        u["harmful"] = u["delta_nll"] > FRAGILE_DELTA_NLL and u["ci95"][0] > 0

    def thresholds(rows: Sequence[Mapping[str, Any]]) -> dict[str, float] | None:
        ok = [r for r in rows if not r["harmful"]]
        if not ok:
            return None
        out = {}
        for metric, side in H2_METRICS[:2]:
            vals = np.array([float(r["metrics"][metric]) for r in ok])
            out[metric] = float(np.quantile(vals, H2_COS_QUANTILE if side == "min" else H2_L2_QUANTILE))
        return out

    def passes(r: Mapping[str, Any], t: Mapping[str, float]) -> bool:
        return all((r["metrics"][m] >= t[m]) if side == "min" else (r["metrics"][m] <= t[m])
                   for m, side in H2_METRICS[:2])

    loo = []
    for i, u in enumerate(pts):
        t = thresholds([r for j, r in enumerate(pts) if j != i])
        if t is not None:
            loo.append({"layer": u["layer"], "harmful": u["harmful"], "predicted_harmless": passes(u, t)})
    tp = sum(1 for x in loo if x["harmful"] and not x["predicted_harmless"])
    fn = sum(1 for x in loo if x["harmful"] and x["predicted_harmless"])
    fp = sum(1 for x in loo if not x["harmful"] and not x["predicted_harmless"])
    tn = sum(1 for x in loo if not x["harmful"] and x["predicted_harmless"])
    rho: list[dict[str, Any]] = []
    for metric, side in H2_METRICS:
        vals = [(r["metrics"].get(metric), r["delta_nll"]) for r in pts if r["metrics"].get(metric) is not None]
        if len(vals) >= 3:
            s = spearman([v[0] for v in vals], [v[1] for v in vals])
            rho.append({"metric": metric, "direction": "higher is safer" if side == "min" else "lower is safer", **s})
    full = thresholds(pts)
    predicts = any(r["p"] < 0.05 and ((r["rho"] < 0) == (r["direction"] == "higher is safer")) for r in rho
                   if r["metric"] in dict(H2_METRICS[:2]))
    return {"thresholds": full, "quantiles": {"cos": H2_COS_QUANTILE, "l2": H2_L2_QUANTILE},
            "harmful_layers": [u["layer"] for u in pts if u["harmful"]],
            "leave_one_out": loo, "confusion": {"harmful_caught": tp, "harmful_missed": fn, "false_alarms": fp,
                                                "harmless_passed": tn},
            "spearman": rho, "predicts_damage": predicts}
