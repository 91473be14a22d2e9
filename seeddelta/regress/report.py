"""The regress report a person reads: report.md (headline first, then every step's table) and the
PNG plots it links; `headline` is the short text `seeddelta regress` and `make run` print."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from seeddelta.evaluation import plots
from seeddelta.evaluation.equal_bytes import markdown_table
from seeddelta.regress import criteria as C
from seeddelta.regress.stats import pct_from_nll

SHORT = {"ffn_gate": "gate", "ffn_up": "up", "ffn_down": "down"}


def write_plots(report: Mapping[str, Any], out: Path) -> dict[str, str]:
    """Every plot the report has data for: {file name: "" if written, else why not}."""
    done: dict[str, str] = {}
    name = Path(report["model"]["path"]).stem
    if "b2" in report:
        units = report["b2"]["units"]
        cfg = report["default_config"]
        layers = sorted({u["layer"] for u in units})
        grid = [[next((u["delta_nll"] for u in units if u["layer"] == layer and u["kind"] == k and u["config"] == cfg),
                      float("nan")) for k in SHORT] for layer in layers]
        done["b2_heatmap.png"] = plots.heatmap(grid, [f"blk.{x}" for x in layers], list(SHORT.values()),
                                               out / "b2_heatmap.png", f"{name}: ΔNLL of one tensor alone ({cfg})",
                                               "ΔNLL (nats)") or ""
        series = {}
        for k in SHORT:
            for base in (True, False):
                pts: dict[int, list[float]] = {}
                for u in units:
                    if u["kind"] == k and u["base"] == base:
                        pts.setdefault(u["K"], []).append(u["delta_nll"])
                xs = sorted(pts)
                series[f"{SHORT[k]} {'base' if base else 'no base'}"] = (xs, [sorted(pts[x])[len(pts[x]) // 2] for x in xs])
        done["b2_error_vs_k.png"] = plots.lines_plot(series, out / "b2_error_vs_k.png",
                                                     f"{name}: median ΔNLL over layers of one tensor alone", "K",
                                                     "ΔNLL (nats)", logy=True) or ""
    if "b4" in report:
        series, marks = {}, {}
        for order, steps in report["b4"]["steps"].items():
            series[order] = ([s["step"] for s in steps], [s["delta_nll"] for s in steps])
            cl = report["b4"]["cliffs"].get(order)
            if cl is not None:
                marks[f"{order} cliff"] = (cl["step"], steps[cl["step"] - 1]["delta_nll"])
        done["b4_stacks.png"] = plots.lines_plot(series, out / "b4_stacks.png", f"{name}: stacks growing one layer at a time",
                                                 "layers encoded", "ΔNLL (nats)", marks=marks,
                                                 hline=C.CLIFF_DELTA_NLL, logy=True) or ""
    if report.get("equal_bytes", {}).get("rows"):
        done["equal_bytes.png"] = plots.pareto_plot(report["equal_bytes"]["rows"], out / "equal_bytes.png",
                                                    f"{name}: FFN bits per weight against KLD (ctx 512, "
                                                    f"{report['equal_bytes']['windows']} windows)") or ""
    return done


def _pct(d: float) -> str:
    return f"{pct_from_nll(d):+.2f} %"


def headline(report: Mapping[str, Any]) -> list[str]:
    v = report["verdict"]
    lines = [f"regress {v['result']}: {v['presets_judged']} preset(s) judged"
             + (f", {len(v['failures'])} failure(s)" if v["failures"] else "")]
    lines += [f"  FAIL {f}" for f in v["failures"]]
    for j in report.get("b5", []) + report.get("presets", []):
        marks = " ".join(f"{r['criterion']}:{'ok' if r['pass'] else 'NO'}{'*' if r['declared'] else ''}"
                         for r in j["criteria"])
        lines.append(f"  {j['preset']:<20} declared {'ok  ' if j['result'] == 'PASS' else 'FAIL'}  saves "
                     f"{j['bytes_saved']:>9,} B  {marks}")
    if v.get("no_saving_preset_meets_ppl"):
        lines.append("  no preset that saves bytes meets the PPL criteria (numbers in report.md)")
    elif v["presets_judged"]:
        meet = [j["preset"] for j in report.get("b5", []) + report.get("presets", []) if j["saves_bytes"] and j["meets_ppl"]]
        lines.append(f"  saving bytes and meeting every PPL criterion: {', '.join(meet)}")
    if v["presets_judged"]:
        lines.append("  (* = declared: only declared criteria and figures gate)")
    eq = report.get("equal_bytes")
    if eq and eq.get("rows"):
        front = [r for r in sorted(eq["rows"], key=lambda r: r["bits_per_weight"]) if r["pareto"]]
        lines.append("  equal-bytes Pareto front: " + ", ".join(f"{r['label']} ({r['bits_per_weight']:.2f} bpw, "
                                                                 f"KLD {r['kld_mean']:.4f})" for r in front))
    if report.get("b4"):
        cl = report["b4"]["cliffs"]
        lines.append("  first cliff: " + ", ".join(f"{k} {'none' if x is None else 'at step ' + str(x['step'])}"
                                                   for k, x in cl.items()))
    return lines


def markdown(report: Mapping[str, Any], plot_status: Mapping[str, str]) -> str:
    r = report
    out = [f"# seeddelta regress: {Path(r['model']['path']).name}", "", "```", *headline(r), "```", ""]
    out += [f"Model sha256 `{r['model']['sha256'][:16]}…`, evaluation text `{Path(r['text']).name}`, calibration "
            f"(imatrix) `{Path(r['calibration']).name if r['calibration'] else 'none'}`. Settings: "
            + ", ".join(f"{k} {v}" for k, v in r["settings"].items()) + ".", ""]
    out += _definitions()
    out += _presets(r)
    if "b1" in r:
        out += _b1(r["b1"])
    if "b2" in r:
        out += _b2(r, plot_status)
    if "b3" in r:
        out += _b3(r["b3"])
    if "b4" in r:
        out += _b4(r["b4"], plot_status)
    if "fragile_layers" in r:
        out += _fragile(r)
    if "equal_bytes" in r:
        out += _equal_bytes(r["equal_bytes"], plot_status)
    if r.get("v1"):  # `seeddelta v1 run --out` on the same directory (seeddelta.v1.report)
        from seeddelta.v1.report import markdown as v1_markdown

        out += [v1_markdown(r["v1"], level=2), ""]
    t = r["timing"]
    out += ["## Timing", "", ", ".join(f"{k} {v:.0f} s" for k, v in t["seconds"].items())
            + f"; cache hits {t['cache']['hits']}, misses {t['cache']['misses']}.", ""]
    return "\n".join(out)


def _definitions() -> list[str]:
    return ["## Definitions", "",
            "* **ΔNLL** — paired: mean over the same scored tokens of NLL(candidate) − NLL(original) = ln PPL ratio; "
            "**ΔPPL %** = 100·(exp ΔNLL − 1). **KLD** = mean KL(original ‖ candidate) per scored token.",
            "* **Spread** — the runtime is deterministic (B1 checks bit-identical logits), so run-to-run spread is 0. "
            "Intervals are 95 % window-bootstrap intervals (whole windows resampled, "
            "because tokens of one window are correlated).",
            f"* **First cliff** — the first stack step with ΔNLL > {C.CLIFF_DELTA_NLL} (ctx 512), mean KLD > "
            f"{C.CLIFF_KLD}, or a greedy pack FAIL.",
            f"* **Fragile layer** — one layer alone (all three tensors) costs ΔNLL > {C.FRAGILE_DELTA_NLL} with its "
            "interval above 0.",
            f"* **Figures** — a declared figure fails when the new value is worse by more than {C.FIGURE_SPREAD_Z:g} "
            "bootstrap sd (ΔNLL), at all (file bytes), or "
            f"{C.FIGURE_SPREAD_Z:g} binomial sd (greedy accuracy).", ""]


def _presets(r: Mapping[str, Any]) -> list[str]:
    judged = list(r.get("b5", [])) + list(r.get("presets", []))
    out = ["## The v1 success criteria, per preset", ""]
    if not judged:
        return out + ["No preset was run for this model." + (" " + "; ".join(r.get("presets_skipped", [])) if
                                                           r.get("presets_skipped") else ""), ""]
    out += ["Every criterion is measured for every preset; a criterion the preset declares is **bold**, and only "
            "declared criteria and figures gate (the last column).", "",
            "| preset | bytes saved | greedy | ΔPPL ctx 512 [95 %] | ΔPPL ctx 1024 [95 %] | ΔPPL ctx 2048 [95 %] "
            "| memory drop (file, RSS) | figures | declared |", "|---|---:|---|---|---|---|---|---|---|"]
    for j in judged:
        cells = []
        for c in C.V1_CRITERIA:
            row = next(x for x in j["criteria"] if x["criterion"] == c.name)
            cells.append(_criterion_cell(row))
        figs = j["figures"]
        fig = "—" if not figs else ("not comparable" if figs[0]["status"] == "not comparable" else
                                    ", ".join(f"{f['figure']} {f['status']}" for f in figs if f["status"] != "ok") or "ok")
        declared = "met" if j["result"] == "PASS" else "**FAIL**"
        out.append(f"| {j['preset']} | {j['bytes_saved']:,} ({j['bytes_saved'] / j['input_bytes']:.1%}) | "
                   f"{' | '.join(cells)} | {fig} | {declared} |")
    out.append("")
    for j in judged:
        out.append(f"* **{j['preset']}** — {j['description']}")
    out.append("")
    for j in r.get("b5", []):
        out.append(f"**B5, strict gating ({j['preset']}):** {j['weights_encoded']} tensor(s) passed the gate and were "
                   "encoded; " + ", ".join(f"{x['criterion']} {'ok' if x['pass'] else 'NO'}" for x in j["criteria"]) + ".")
        out.append("")
    v = r["verdict"]
    meet = [j for j in judged if j["saves_bytes"] and j["meets_ppl"]]
    if meet:
        out.append("Presets that save bytes and meet every PPL criterion: " + ", ".join(
            f"{j['preset']} ({j['bytes_saved']:,} B, {j['bytes_saved'] / j['input_bytes']:.1%})" for j in meet) + ".")
        out.append("")
    if v.get("no_saving_preset_meets_ppl"):
        best = sorted((j for j in judged if j["saves_bytes"]),
                      key=lambda j: max((x["value"] or 0) for x in j["criteria"] if x["criterion"].startswith("ppl_")))
        out.append("**No preset that saves bytes meets the PPL criteria.** " + (
            f"Closest: {best[0]['preset']} (" + ", ".join(_criterion_cell(x) for x in best[0]['criteria']
                                                          if x['criterion'].startswith('ppl_')) + ")." if best else ""))
        out.append("")
    return out


def _criterion_cell(row: Mapping[str, Any]) -> str:
    if row.get("value") is None:
        text = f"n/a ({row.get('why', '')})"
    elif row["criterion"].startswith("ppl_"):
        lo, hi = row["ci95"]
        text = f"{row['value']:+.2f} % [{lo:+.2f}, {hi:+.2f}] {'ok' if row['pass'] else 'NO'}"
    elif row["criterion"] == "memory_drop":
        v = row["value"]
        text = f"{v['file_bytes'] / 2**20:+.2f} MiB, {v['rss_bytes'] / 2**20:+.2f} MiB {'ok' if row['pass'] else 'NO'}"
    else:
        text = f"{row['value']} {'ok' if row['pass'] else 'NO'}"
    return f"**{text}**" if row["declared"] else text


def _b1(b: Mapping[str, Any]) -> list[str]:
    out = ["## B1 — the original", "", "| ctx | windows | PPL ± se | ln PPL bootstrap sd | even − odd windows | "
           "deterministic | prompt tok/s |", "|---:|---:|---|---:|---:|---|---:|"]
    for ctx, p in b["ppl"].items():
        halves = "—" if p["ln_ppl_even_minus_odd_windows"] is None else f"{p['ln_ppl_even_minus_odd_windows']:+.4f}"
        out.append(f"| {ctx} | {p['windows']} | {p['ppl']:.4f} ± {p['se']:.4f} | {p['ln_ppl_bootstrap_sd']:.4f} | "
                   f"{halves} | {p['deterministic']} | {p['prompt_tok_per_s']:.0f} |")
    out += [""] + [f"* skipped: {s}" for s in b["skipped"]]
    d = b["decode"]
    out.append(f"* decode: {d['decode_tok_per_s']:.1f} tok/s after a {d['prompt_tokens']}-token prompt")
    if "greedy" in b:
        g = b["greedy"]
        out.append(f"* greedy pack: {g['verdict']}, accuracy {g['accuracy']:.2%} of {g['n']} "
                   f"({', '.join(f'{t} {a:.0%}' for t, a in g['tasks'].items())}), {g['flagged']} flagged")
    m = b["memory"]
    out += [f"* file {m['file_bytes']:,} B; resident memory of the loaded weights (fresh process) "
            f"{m['rss_anon_load_delta_bytes'] / 2**20:.2f} MiB", ""]
    return out


def _b2(r: Mapping[str, Any], plot_status: Mapping[str, str]) -> list[str]:
    units = r["b2"]["units"]
    configs = r["configs"]
    layers = sorted({u["layer"] for u in units})
    whole = {x["layer"]: x for x in r["b2"]["layers"]}
    out = ["## B2 — one unit at a time", "", "ΔNLL of each tensor encoded alone (imatrix, row scale, dense stripped; "
           f"K = density·n_in), and of the whole layer at the default configuration ({r['default_config']}).", "",
           "| layer | whole layer | " + " | ".join(f"{SHORT[k]} {c}" for c in configs for k in SHORT) + " |",
           "|---:|---:|" + "---:|" * (3 * len(configs))]
    for layer in layers:
        cells = [f"{whole[layer]['delta_nll']:+.4f}" if layer in whole else "—"]
        for c in configs:
            for k in SHORT:
                u = next((u for u in units if u["layer"] == layer and u["kind"] == k and u["config"] == c), None)
                cells.append("—" if u is None else f"{u['delta_nll']:+.4f}")
        out.append(f"| {layer} | " + " | ".join(cells) + " |")
    out += ["", _img("b2_heatmap.png", plot_status), _img("b2_error_vs_k.png", plot_status), ""]
    return out


def _b3(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    out = ["## B3 — separated layers against the sum of their single effects", "",
           "| layers | together ΔNLL | sum of singles | ratio | excess [95 %] | KLD |", "|---|---:|---:|---:|---|---:|"]
    for x in rows:
        ratio = "—" if x["ratio"] is None else f"{x['ratio']:.2f}"
        out.append(f"| {','.join(map(str, x['layers']))} | {x['joint_delta_nll']:+.4f} | {x['sum_of_singles']:+.4f} | "
                   f"{ratio} | {x['excess']:+.4f} [{x['excess_ci95'][0]:+.4f}, {x['excess_ci95'][1]:+.4f}] | "
                   f"{x['kld_mean']:.4f} |")
    return out + [""]


def _b4(b: Mapping[str, Any], plot_status: Mapping[str, str]) -> list[str]:
    out = ["## B4 — stacks until the first cliff", ""]
    for order, steps in b["steps"].items():
        cl = b["cliffs"][order]
        where = "no cliff" if cl is None else f"first cliff at step {cl['step']} (+blk.{cl['added']}: {'; '.join(cl['why'])})"
        out.append(f"* **{order}** ({','.join(map(str, b['orders'][order]))}): {where}; ΔNLL by step: "
                   + " ".join(f"+{s['added']}:{s['delta_nll']:+.4f}" for s in steps))
    out += ["", _img("b4_stacks.png", plot_status), "", "Spearman ρ between weight-space metrics of the build "
            "report and the measured ΔNLL of the B2 single-tensor units (permutation p):", "",
            "| metric | kind | ρ | p | n |", "|---|---|---:|---:|---:|"]
    for s in b["spearman"][:24]:
        out.append(f"| {s['metric']} | {s['kind']} | {s['rho']:+.3f} | {s['p']:.4f} | {s['n']} |")
    return out + [""]


def _fragile(r: Mapping[str, Any]) -> list[str]:
    out = ["## Fragile layers and recommended thresholds", "", "| layer | ΔNLL alone [95 %] | KLD | fragile | "
           "worst tensor alone |", "|---:|---|---:|---|---|"]
    for f in r["fragile_layers"]:
        worst = "—" if f["worst_tensor"] is None else f"{f['worst_tensor']} {f['worst_tensor_delta_nll']:+.4f}"
        out.append(f"| {f['layer']} | {f['delta_nll']:+.4f} [{f['ci95'][0]:+.4f}, {f['ci95'][1]:+.4f}] | "
                   f"{f['kld_mean']:.4f} | {'**yes**' if f['fragile'] else 'no'} | {worst} |")
    t = r.get("recommended_thresholds")
    if t:
        out.append("")
        g = t.get("gate_metric")
        if not g:
            out.append(f"* gate metric: {t.get('gate_metric_why', 'none')}")
        else:
            per = ", ".join(f"{k} ≥ {v['min']:.4f} ({v['units_passing']}/{v['units']} units)" if v else f"{k}: none"
                            for k, v in g["per_kind"].items())
            out.append(f"* gate on **{g['metric']}** (ρ {g['spearman_rho']:+.2f} with ΔNLL): {per} — every measured "
                       f"unit at or above the value stayed within ΔNLL {t['unit_delta_nll_limit']}")
        if t["max_layers_before_cliff"] is None:
            out.append("* stack budget: no order reached a cliff within the layers measured")
        else:
            out.append(f"* stack budget: at most {t['max_layers_before_cliff']} layer(s) at the default configuration "
                       "before the earliest first cliff" + (f" (no cliff: {', '.join(t['orders_without_cliff'])})"
                                                            if t["orders_without_cliff"] else ""))
    return out + [""]


def _equal_bytes(e: Mapping[str, Any], plot_status: Mapping[str, str]) -> list[str]:
    out = ["## Equal bytes: what a user would pick instead", "",
           f"Same FFN weights, same evaluator (ctx 512, {e['windows']} windows); bits per weight counted from the "
           "stored tensors; ★ = Pareto front (no other point has fewer bits and lower KLD).", ""]
    out += [f"* skipped: {s}" for s in e["skipped"]]
    out += ["", markdown_table(e["rows"]), "", _img("equal_bytes.png", plot_status), ""]
    return out


def _img(name: str, status: Mapping[str, str]) -> str:
    if name not in status:
        return ""
    return f"![{name}]({name})" if not status[name] else f"({name}: {status[name]})"
