"""The v1 results as markdown: `v1.md`, and the "v1 mechanisms" section of the regress report."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

TITLES = {
    "h1": "H1 — K_down sweep, gate fixed, down in one layer",
    "h3a": "H3a — delta-norm clamp on ffn_down (‖Δ‖ ≤ τ·‖W‖), gate unchanged",
    "h3b": "H3b — partial strip of ffn_down (the rows SeedΔ fits worst kept dense)",
    "h2": "H2 — down-only thresholds on cos_p05 / l2_p95 from the harmless layers",
    "m2": "Mechanism 2 — homeostatic clamp on ffn_gate (‖Δ‖ ≤ τ·‖W‖)",
    "gate_units": "Gate units — each layer's ffn_gate alone (ctx 512), what m4 and m5 rank",
    "m4": "Mechanism 4 — error-quantile filter vs the cosine thresholds (gate selection)",
    "m5": "Mechanism 5 — global budget: top-N gate tensors, ΔPPL vs bytes saved",
    "m1": "Mechanism 1 — retention score, decay Δ ← Δ·(1 − α(1 − ret)) and a retention-weighted hard cap (gate)",
    "m6": "Mechanism 6 — replay-directed retention: m1's decay and cap with plain vs replay-weighted retention (gate)",
    "m3": "Mechanism 3 — conditional (dendritic) Δ: gate Δ only for tokens above / below an input-rms quantile",
    "m7": "Mechanism 7 — core vs leaf: llama.cpp's use_more_bits band vs the measured band (ffn_down)",
}


def _pct(c: Mapping[str, Any] | None) -> str:
    if c is None:
        return "–"
    return f"{c['pct']:+.2f} [{c['ci95'][0]:+.2f}, {c['ci95'][1]:+.2f}]"


def _kb(b: int | None) -> str:
    return "–" if b is None else f"{b / 1024:+,.0f}"


def table(rows: list[Mapping[str, Any]], ctxs: list[str]) -> list[str]:
    head = ["setting"] + [f"ΔPPL % @{c} vs orig [95 %]" for c in ctxs] + [
        f"vs gate-only @{ctxs[-1]}", f"KLD @{ctxs[-1]}", "file KiB drop", "resident KiB drop",
        "resident KiB drop vs gate-only", "greedy"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["label"]] + [_pct(r["ctx"].get(c, {}).get("vs_original")) for c in ctxs]
        last = r["ctx"].get(ctxs[-1], {})
        cells += [_pct(last.get("vs_reference")), f"{last['kld_mean']:.4f}" if last else "–",
                  _kb(r.get("file_drop_vs_original")), _kb(r.get("rss_drop_vs_original")),
                  _kb(r.get("rss_drop_vs_reference"))]
        g = r.get("greedy")
        cells.append("–" if not g else f"{g['verdict']} ({g['flagged']} flagged, acc {g['accuracy']:.3f})")
        out.append("| " + " | ".join(cells) + " |")
    return out


def markdown(doc: Mapping[str, Any], level: int = 1) -> str:
    h = "#" * level
    ctxs = [str(c) for c in doc["settings"]["ctxs"]]
    p = doc["profile"]
    mem = doc["base_memory"]
    lines = [f"{h} v1 mechanisms ({p['name']}: {doc['model']['path']})", "",
             f"Gate-only reference: ffn_gate at K {p['K_gate']} in layers {p['gate_layers']} (XOR base, row scale, "
             f"imatrix {'on' if doc['encoding']['imatrix'] else 'off'}, dense stripped). Original: "
             f"{mem['file_bytes']:,} B file, {mem['rss_anon_load_delta_bytes']:,} B resident (spread "
             f"{mem['rss_spread_bytes']:,} B over {mem['rss_repeats']} fresh processes; a drop counts above "
             f"{doc['rss_drop_needed']:,.0f} B). ΔPPL is paired on the same tokens; intervals are window bootstraps; "
             f"windows per context: {doc['settings']['chunks']} (-1: all).", ""]
    lines += table([doc["reference"]], ctxs) + [""]
    for name, exp in doc["experiments"].items():
        lines += [f"{h}# {TITLES.get(name, name)}", ""]
        if name == "gate_units":
            lines += ["| layer | ΔNLL [95 %] | cos_mean_x_w | cos_p05_x_w | rel_l2_p95 | bytes saved |",
                      "|---|---|---|---|---|---|"]
            for u in exp["units"]:
                m = u["metrics"]
                lines.append(f"| {u['layer']} | {u['delta_nll']:+.4f} [{u['ci95'][0]:+.4f}, {u['ci95'][1]:+.4f}] | "
                             f"{m['cos_mean_x_w']:.4f} | {m['cos_p05_x_w']:.4f} | {m['rel_l2_p95']:.4f} | "
                             f"{u['bytes_saved']:,} |")
            lines.append("")
        if name == "m1":
            lines += [f"Retention per gate layer (cos_mean_x_w scaled to [0, 1]): {exp['retention']}; ‖Δ‖/‖W‖: "
                      f"{exp['delta_norm_ratio']}.", ""]
        if name == "m6":
            lines += [f"Replay pack: {exp['pack']['n']} of {exp['pack']['candidates']} windows of {exp['pack']['ctx']} "
                      f"tokens of {exp['pack']['text']} (smallest mean top-1/top-2 margin, ≤ "
                      f"{exp['pack']['cut_margin']:.3f}). Replay impact (KLD on the pack, gate alone): "
                      + ", ".join(f"L{k} {v['kld_mean']:.5f}" for k, v in exp["impact"].items())
                      + f". Retention plain {exp['retention_plain']}, replay-weighted (β {exp['beta']}) "
                      f"{exp['retention_replay']}. Regression rate vs gate-only (windows worse + greedy prompts lost): "
                      + ", ".join(f"{r['label']} {r['regression']['rate']:.3f}" for r in exp["rows"]
                                  if r["regression"]["rate"] is not None) + ".", ""]
        if name == "m4":
            sel = exp["selection"]
            lines += [f"Selected: {sel['selected']} (error quantile {sel['quantile']}: {sel['metric']} ≤ "
                      f"{sel['limit']:.4f}; cosine: ≥ {sel['cos_thresholds']}).", ""]
        if "rows" in exp:
            lines += table(exp["rows"], ctxs) + [""]
            v = exp["verdict"]
            extra = "".join(f"; {k}: {v[k]}" for k in ("passing", "best", "sweet_spot", "delta_ppl_2048", "why")
                            if k in v)
            lines += [f"**Verdict: {'KEEP' if v['keep'] else 'BACK OFF'}** — rule: {v['rule']}{extra}.", ""]
            eff = exp.get("effect")
            if eff and eff["against_h1"]:
                parts = "; ".join(f"{x['label']}: ΔPPL@2048 {x['dppl_2048_change']:+.2f} points, resident drop "
                                  f"{x['rss_drop_change'] / 1024:+,.0f} KiB against {x['h1']}" for x in eff["against_h1"])
                lines += [f"**The mechanism itself {'helps' if eff['helps'] else 'does not help'}** (against H1 at the "
                          f"same layer and K): {parts}.", ""]
        if name == "m3":  # compute saved beside the table (seeddelta.v1.conditional)
            from seeddelta.v1.conditional import markdown_lines

            lines += markdown_lines(exp, ctxs)
        if name == "m7" and "agreement" in exp:
            a = exp["agreement"]
            lines += [f"use_more_bits protects {a['protected']}; H2 measured harmful {a['harmful_measured']}: "
                      f"protected {a['harmful_protected']}, unprotected {a['harmful_unprotected']}; protected but "
                      f"measured harmless {a['protected_but_harmless']}.", ""]
        if name == "h2":
            a = exp["analysis"]
            lines += ["| layer | ΔNLL [95 %] | cos_p05_x_w | rel_l2_p95_x_w | cos_p05 | rel_l2_p95 | harmful |",
                      "|---|---|---|---|---|---|---|"]
            for u in exp["units"]:
                m = u["metrics"]
                lines.append(f"| {u['layer']} | {u['delta_nll']:+.4f} [{u['ci95'][0]:+.4f}, {u['ci95'][1]:+.4f}] | "
                             + " | ".join(f"{m[k]:.4f}" if m.get(k) is not None else "–"
                                          for k in ("cos_p05_x_w", "rel_l2_p95_x_w", "cos_p05", "rel_l2_p95"))
                             + f" | {'yes' if u.get('harmful') else 'no'} |")
            c = a["confusion"]
            rho = "; ".join(f"{r['metric']} ρ {r['rho']:+.2f} (p {r['p']:.3f})" for r in a["spearman"])
            lines += ["", f"Thresholds (harmless layers' {a['quantiles']}): {a['thresholds']}. Leave-one-out: "
                      f"{c['harmful_caught']} harmful caught, {c['harmful_missed']} missed, {c['false_alarms']} false "
                      f"alarms, {c['harmless_passed']} harmless passed. Spearman vs ΔNLL: {rho}.", "",
                      f"**Verdict: {'the thresholds predict down damage' if a['predicts_damage'] else 'BACK OFF'}"
                      f"** — {'a' if a['predicts_damage'] else 'no'} functional metric correlates with the measured "
                      "ΔNLL in the safe direction at p < 0.05.", ""]
    return "\n".join(lines).rstrip()
