"""The v1 plan's mechanisms 2, 4, 5 and 7 as measured settings and verdicts (the note's exit rules).

* **m2 homeostatic clamp** — the gate-only reference with ‖Δ_gate‖ ≤ τ·‖W‖ (`delta_norm_clamp` on
  ffn_gate). Exit: keep when some τ lowers ΔPPL at ctx 2048 against the gate-only reference with
  its 95 % interval below 0, without raising it at ctx 512/1024 (same bytes: the clamp keeps K).
* **gate units** — each layer's ffn_gate alone at K_gate (ctx 512): metrics and measured ΔNLL; what
  m4 and m5 rank and filter.
* **m4 predictive coding** — two gate selections from the gate units: the original autogate's
  cosine filter (cos_mean_x_w ≥ 0.70, cos_p05_x_w ≥ 0.50) against an error-quantile filter (keep the
  gates whose tail error rel_l2_p95 — the scan's S_p95 — is at most the M4_QUANTILE quantile over all
  gate units).
  Exit: keep when the quantile filter's ΔPPL at ctx 2048 is lower than the cosine filter's without
  a higher one at ctx 512/1024.
* **m5 competitive budget** — the top-N gate units by measured single-unit ΔNLL (autogate's order
  without a byte budget), for N over a range: the curve ΔPPL vs bytes saved; the sweet spot is the
  largest N meeting the v1 PPL criteria (≤ 0 % at 512/1024, ≤ +0.5 % at 2048).
* **m7 core vs leaf** — ffn_down at K_down_ref on top of the gate-only reference in the layers
  llama.cpp's `use_more_bits` rule leaves unprotected (it protects the first and last eighth and every
  third layer in between for ffn_down) against the layers H2 measured harmless; how well the rule's
  protected set matches H2's harmful set. Exit (the down rule): a band is kept when it meets ΔPPL ≤
  +2 % at ctx 2048 against the gate-only reference with a resident-memory drop.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from seeddelta.evaluation.retention import RETENTION_METRIC, retention
from seeddelta.policy.autogate import GATE_COS_P05_THRESHOLD, GATE_COS_THRESHOLD, retention_cap, use_more_bits
from seeddelta.regress.criteria import CRITERIA
from seeddelta.regress.measure import Spec
from seeddelta.v1.experiments import Setting, _spec
from seeddelta.v1.policies import policy_text
from seeddelta.v1.profiles import Profile

M2_TAUS = (0.8, 0.65, 0.5)  # the gate-only gates hold ‖Δ‖/‖W‖ ≈ 0.88 (tiny, K 64 of 192): all bind
M4_QUANTILE = 0.5
M4_METRIC = "rel_l2_p95"  # the scan's S_p95: the tail of the rows' relative error (what autogate can filter on)
GATE_METRICS = ("cos_mean_x_w", "cos_p05_x_w", "rel_l2_p95_x_w", "rel_l2_mean_x_w", "rel_l2_p95")


def m2(p: Profile, encoding: Mapping[str, Any], evals: tuple[tuple[int, int], ...], greedy: int | None
       ) -> list[Setting]:
    return [Setting("m2", f"gate clamp τ {tau:g}", {"tau_gate": tau},
                    _spec(f"v1-m2-{tau:g}", policy_text(p, p.gate_layers, gate_extra={"delta_norm_clamp": tau}),
                          encoding, evals, greedy))
            for tau in M2_TAUS]


def gate_units(p: Profile, encoding: Mapping[str, Any], chunks: int,
               layers: Sequence[int] | None = None) -> list[Setting]:
    """Each layer's ffn_gate alone (default: H2's layers, the sample m4 and m5 choose from)."""
    return [Setting("gate-units", f"gate L{layer} alone K {p.K_gate}", {"layer": layer},
                    Spec(f"v1-gate-{layer}", dict(encoding), policy=policy_text(p, (layer,)), evals=((512, chunks),)))
            for layer in (p.h2_layers if layers is None else layers)]


def m4(p: Profile, units: Sequence[Mapping[str, Any]], encoding: Mapping[str, Any],
       evals: tuple[tuple[int, int], ...], greedy: int | None) -> tuple[list[Setting], dict[str, Any]]:
    cos = [u["layer"] for u in units if u["metrics"]["cos_mean_x_w"] >= GATE_COS_THRESHOLD
           and u["metrics"]["cos_p05_x_w"] >= GATE_COS_P05_THRESHOLD]
    tail = np.array([u["metrics"][M4_METRIC] for u in units])
    limit = float(np.quantile(tail, M4_QUANTILE)) if tail.size else 0.0
    quant = [u["layer"] for u in units if u["metrics"][M4_METRIC] <= limit]
    chosen = {"cosine filter": sorted(cos), "error-quantile filter": sorted(quant)}
    out = [Setting("m4", f"{name}: gate in {layers}", {"filter": name, "layers": layers},
                   _spec(f"v1-m4-{i}", policy_text(p, layers), encoding, evals, greedy))
           for i, (name, layers) in enumerate(chosen.items()) if layers]
    return out, {"selected": chosen, "metric": M4_METRIC, "limit": limit, "quantile": M4_QUANTILE,
                 "cos_thresholds": [GATE_COS_THRESHOLD, GATE_COS_P05_THRESHOLD]}


def budgets(n: int) -> list[int]:
    """1, 2, 4, … up to n, and n."""
    out, k = [], 1
    while k < n:
        out.append(k)
        k *= 2
    return out + [n]


def m5(p: Profile, units: Sequence[Mapping[str, Any]], encoding: Mapping[str, Any],
       evals: tuple[tuple[int, int], ...], greedy: int | None) -> list[Setting]:
    order = [u["layer"] for u in sorted(units, key=lambda u: (u["delta_nll"], u["layer"]))]
    return [Setting("m5", f"top {n} gates {sorted(order[:n])}", {"budget": n, "layers": sorted(order[:n])},
                    _spec(f"v1-m5-{n}", policy_text(p, order[:n]), encoding, evals, greedy))
            for n in budgets(len(order))]


def m7(p: Profile, harmless: Sequence[int] | None, encoding: Mapping[str, Any], evals: tuple[tuple[int, int], ...],
       greedy: int | None) -> list[Setting]:
    rule = [i for i in range(p.n_layer) if not use_more_bits(i, p.n_layer)]
    bands = {"use_more_bits (unprotected layers)": rule}
    if harmless is not None:
        bands["measured harmless (H2)"] = sorted(harmless)
    return [Setting("m7", f"down in {name} {layers}", {"band": name, "layers": layers},
                    _spec(f"v1-m7-{i}", policy_text(p, p.gate_layers, {x: {"K": p.K_down_ref} for x in layers}),
                          encoding, evals, greedy))
            for i, (name, layers) in enumerate(bands.items()) if layers]


# ---------------------------------------------------------------------------------- verdicts
def _at(r: Mapping[str, Any], ctx: str, against: str) -> float | None:
    c = r["ctx"].get(ctx, {}).get(against)
    return None if c is None else float(c["pct"])


def m2_verdict(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    good = []
    for r in rows:
        c = r["ctx"].get("2048", {}).get("vs_reference")
        mid = [_at(r, x, "vs_reference") for x in ("512", "1024")]
        if c is not None and c["ci95"][1] < 0 and all(m is None or m <= 0 for m in mid):
            good.append(r["label"])
    return {"keep": bool(good), "passing": good,
            "rule": "ΔPPL@2048 vs gate-only below 0 with its 95 % interval, not above 0 at 512/1024"}


def m4_verdict(rows: Sequence[Mapping[str, Any]], selection: Mapping[str, Any]) -> dict[str, Any]:
    by = {r["filter"]: r for r in rows}
    if set(by) != {"cosine filter", "error-quantile filter"}:
        return {"keep": False, "rule": "both filters must select something", "why": f"selected: {selection['selected']}"}
    q, c = by["error-quantile filter"], by["cosine filter"]
    d2048 = [_at(x, "2048", "vs_original") for x in (q, c)]
    mid_ok = True
    for ctx in ("512", "1024"):
        a, b = q["ctx"].get(ctx, {}).get("vs_original"), c["ctx"].get(ctx, {}).get("vs_original")
        if a is not None and b is not None:  # not higher beyond twice the larger bootstrap sd (in % PPL)
            mid_ok = mid_ok and a["pct"] <= b["pct"] + 100 * 2 * max(a["sd"], b["sd"])
    ok = None not in d2048 and d2048[0] < d2048[1] and mid_ok  # type: ignore[operator]
    return {"keep": bool(ok), "rule": "error-quantile ΔPPL@2048 below the cosine filter's, not above it at 512/1024 "
                                      "beyond twice the larger bootstrap sd",
            "delta_ppl_2048": {"error-quantile": d2048[0], "cosine": d2048[1]},
            "bytes_saved": {"error-quantile": q["bytes_saved"], "cosine": c["bytes_saved"]}}


def meets_v1_ppl(r: Mapping[str, Any]) -> bool:
    for name in ("ppl_ctx512", "ppl_ctx1024", "ppl_ctx2048"):
        crit = CRITERIA[name]
        v = _at(r, str(crit.ctx), "vs_original")
        if v is None or v > float(crit.max_delta_ppl_pct or 0.0):
            return False
    return True


def m5_verdict(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    ok = [r for r in rows if meets_v1_ppl(r) and r["bytes_saved"] > 0]
    best = max(ok, key=lambda r: r["budget"], default=None)
    return {"keep": best is not None, "sweet_spot": None if best is None else best["budget"],
            "rule": "largest budget meeting the v1 PPL criteria (≤ 0 % at 512/1024, ≤ +0.5 % at 2048) with bytes saved",
            "curve": [{"budget": r["budget"], "bytes_saved": r["bytes_saved"],
                       "delta_ppl_2048": _at(r, "2048", "vs_original")} for r in rows]}


def band_agreement(n_layer: int, harmful: Sequence[int], measured: Sequence[int]) -> dict[str, Any]:
    """use_more_bits' protected layers against H2's harmful ones (among the layers H2 measured)."""
    protected = {i for i in range(n_layer) if use_more_bits(i, n_layer)}
    m, h = set(measured), set(harmful)
    caught = sorted(h & protected)
    return {"protected": sorted(protected), "harmful_measured": sorted(h), "harmful_protected": caught,
            "harmful_unprotected": sorted(h - protected), "protected_but_harmless": sorted((protected & m) - h),
            "recall": len(caught) / len(h) if h else None}


# ---------------------------------------------------------------------------------- m1
M1_ALPHAS = (0.25, 0.5)


def retention_scores(units: Sequence[Mapping[str, Any]], layers: Sequence[int]) -> dict[int, float]:
    """Per gate tensor, a retention score in [0, 1] from the proxy metric cos_mean_x_w of the gate units:
    (value − lowest) / (highest − lowest) over the layers given (all 1 when they are equal). Salient =
    SeedΔ reproduces the tensor's output well; the least faithful tensor decays most. The definition is
    evaluation.retention's (also the scan's `retention` field)."""
    return retention({u["layer"]: float(u["metrics"][RETENTION_METRIC]) for u in units if u["layer"] in set(layers)})


def delta_norm_ratios(model: str, imatrix: str | None, encoding: Mapping[str, Any], p: Profile,
                      layers: Sequence[int]) -> dict[int, float]:
    """‖Δ‖_F/‖W‖_F of each gate tensor as the builder encodes it in the gate-only reference (same flags,
    seed and imatrix), so that a clamp τ = factor·ratio scales Δ by exactly `factor` (the decay)."""
    from seeddelta.builder.encode import run_trial
    from seeddelta.builder.options import BuildOptions
    from seeddelta.gguf_format.imatrix_file import read_imatrix
    from seeddelta.gguf_format.reader import GGUFModel
    from seeddelta.gguf_format.schema import weight_name
    from seeddelta.policy.builder import policy_resolver
    from seeddelta.policy.load import parse_policy
    from seeddelta.regress.measure import EVAL_COLS, EVAL_X

    enc = dict(encoding)
    use_imatrix = bool(enc.pop("imatrix", False))
    opts = BuildOptions(input=model, output="", strip_dense=True, eval_cols=EVAL_COLS, eval_x=EVAL_X,
                        imatrix=imatrix if use_imatrix else None, progress=False, threads=1, **enc)
    gm = GGUFModel(model, what="model")
    resolver = policy_resolver(parse_policy(policy_text(p, layers)), opts, gm.n_layer)
    im = read_imatrix(imatrix) if use_imatrix and imatrix else None
    out = {}
    for layer in layers:
        trial = run_trial(gm, opts, layer, "ffn_gate", resolver(layer, "ffn_gate"), p.K_gate, im)
        w = gm.dense(weight_name(layer, "ffn_gate")).astype(np.float64)
        assert trial.sdw is not None  # run_trial's own trial keeps its arrays
        out[layer] = float(np.linalg.norm(trial.sdw.val.astype(np.float64)) / np.linalg.norm(w))
    return out


def m1(p: Profile, units: Sequence[Mapping[str, Any]], ratios: Mapping[int, float], encoding: Mapping[str, Any],
       evals: tuple[tuple[int, int], ...], greedy: int | None, *, ret: Mapping[int, float] | None = None,
       experiment: str = "m1", alphas: Sequence[float] = M1_ALPHAS) -> tuple[list[Setting], dict[str, Any]]:
    """Decay Δ ← Δ·(1 − α(1 − ret)) per gate tensor (as the clamp τ = factor·‖Δ‖/‖W‖), for each α; and the
    hard cap: each gate tensor's K cut to ⌈K·(1 + ret)/2⌉ entries per row (the least retained keeps half).
    `ret`: another retention per gate layer (mechanism 6's replay-weighted one; default: mechanism 1's)."""
    ret = dict(ret) if ret is not None else retention_scores(units, p.gate_layers)
    tag = "" if experiment == "m1" else f"{experiment} "
    out = []
    for a in alphas:
        taus = {layer: ratios[layer] * (1 - a * (1 - ret[layer])) for layer in p.gate_layers}
        doc = json.loads(policy_text(p, p.gate_layers))
        for layer, tau in taus.items():
            doc["layers"][str(layer)]["tensors"]["ffn_gate"]["delta_norm_clamp"] = round(tau, 6)
        out.append(Setting(experiment, f"{tag}decay α {a:g}", {"alpha": a,
                                                                "tau": {str(k): round(v, 6) for k, v in taus.items()}},
                           _spec(f"v1-{experiment}-decay-{a:g}", json.dumps(doc, indent=2) + "\n", encoding, evals, greedy)))
    caps = {layer: retention_cap(p.K_gate, ret[layer]) for layer in p.gate_layers}
    doc = json.loads(policy_text(p, p.gate_layers))
    for layer, k in caps.items():
        doc["layers"][str(layer)]["tensors"]["ffn_gate"]["K"] = k
    out.append(Setting(experiment, f"{tag}retention cap", {"K_gate": {str(k): v for k, v in caps.items()}},
                       _spec(f"v1-{experiment}-cap", json.dumps(doc, indent=2) + "\n", encoding, evals, greedy)))
    return out, {"retention": {str(k): round(v, 6) for k, v in ret.items()},
                 "delta_norm_ratio": {str(k): round(v, 6) for k, v in ratios.items()}, "alphas": list(alphas)}


def m1_verdict(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The note's exit: keep when PPL improves or stays flat and GGUF/RSS drop (against the gate-only
    reference: ΔPPL at every context with its 95 % interval reaching 0 or below, file and resident
    bytes smaller)."""
    good = []
    for r in rows:
        flat = all(c["vs_reference"]["ci95"][0] <= 0 for c in r["ctx"].values() if "vs_reference" in c)
        drop = (r.get("file_drop_vs_reference") or 0) > 0 and (r.get("rss_drop_vs_reference") or 0) > 0
        if flat and drop:
            good.append(r["label"])
    return {"keep": bool(good), "passing": good,
            "rule": "ΔPPL vs gate-only flat or better at every context (95 % interval reaches ≤ 0) and file and "
                    "resident bytes below the gate-only reference"}
