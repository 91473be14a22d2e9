"""`seeddelta demo`: the main job on the built-in default (the tiny model shipped in the package).

1. harness A (the codec against its oracles) — the maths must be right before anything else;
2. an imatrix of the tiny model on calibration text drawn from the *training* distribution
   (never the evaluation text: calibrating on it would leak into the scores);
3. `seeddelta build`: SeedΔ on every FFN weight (XOR base, row scale, imatrix, strip);
4. the SeedΔ model against the original on the same tokens (`seeddelta kld`: both
   perplexities, paired ΔNLL, KL divergence, same top-1, the hidden state's drift after every
   block), the greedy task pack (exact match and collapse flags, compressed model actually in
   use), file size and weight memory;
5. `seeddelta sweep --stack`: the same encoding on one layer at a time (which layers are safe), then
   on the safest layers together, one more at each step (where the cliff is, what it saves);
6. the chosen layers (the longest stack step within --max-delta-nll) built, measured with `kld`
   and run through the greedy pack.

Every step goes through the public commands, writing JSON into --out; the summary is printed
and written to <out>/summary.json. Exit status 1 if harness A fails; a greedy verdict FAIL is a
measured result (the budget costs too much quality), reported in the summary, and only an exit
status 1 with --strict.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from seeddelta.commands.common import describe, model_path
from seeddelta.errors import SeedDeltaError
from seeddelta.outputs import write_json_atomic, write_text_atomic

CALIBRATION_SAMPLES = 400  # ≈ 25k tokens: enough for stable Σx² per input channel of a 192/768-wide FFN


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the main job on the built-in tiny model (see README)",
                       description=describe(__doc__))
    p.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")
    p.add_argument("-m", "--model", help="GGUF model (default: the tiny model shipped in the package)")
    p.add_argument("--K-gate", type=int, default=64, help="budget per row of ffn_gate (n_in 192 on the tiny model)")
    p.add_argument("--K-up", type=int, default=64, help="budget per row of ffn_up")
    p.add_argument("--K-down", type=int, default=256, help="budget per row of ffn_down (n_in 768)")
    p.add_argument("-c", "--ctx-size", type=int, default=512, help="context for perplexity and KLD")
    p.add_argument("--chunks", type=int, default=-1, help="at most N perplexity windows (-1: all)")
    p.add_argument("--limit", type=int, default=0, help="greedy prompts per task (0: the whole pack)")
    p.add_argument("--skip-toy", action="store_true", help="do not run harness A first")
    p.add_argument("--max-delta-nll", type=float, default=0.01,
                   help="the chosen subset: the most safest-first layers whose ΔNLL together stays at or below this (0.01)")
    p.add_argument("--strict", action="store_true", help="exit status 1 when the greedy pack FAILs")
    p.set_defaults(handler=run)


def _step(title: str, argv: list[str], allowed: tuple[int, ...] = (0,)) -> int:
    from seeddelta.cli import main

    print(f"\n== {title}: seeddelta {' '.join(argv)}", flush=True)
    status = main(argv)
    if status not in allowed:
        raise SeedDeltaError(f"step '{title}' failed with exit status {status}", exit_code=1)
    return status


def _calibration_text(path: Path) -> None:
    from seeddelta.tiny.dataset import DEFAULT_SEED, heldout_texts, train_samples

    stream = train_samples(DEFAULT_SEED + 1, 0, heldout_texts())
    write_text_atomic(path, "".join(next(stream).text for _ in range(CALIBRATION_SAMPLES)))


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def run(args: argparse.Namespace) -> int:
    model = model_path(args)
    if not model.is_file():
        raise SeedDeltaError(f"model not found: {model}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if not args.skip_toy:
        _step("harness A", ["toy", "--json", str(out / "toy.json")])
    _calibration_text(out / "calibration.txt")
    _step("imatrix", ["imatrix", "-m", str(model), "-f", str(out / "calibration.txt"), "-o", str(out / "imatrix.gguf"),
                      "-c", str(args.ctx_size)])
    sd = out / "model_seeddelta.gguf"
    encoding = ["--base", "--row-scale", "--imatrix", str(out / "imatrix.gguf"),
                "--K-gate", str(args.K_gate), "--K-up", str(args.K_up), "--K-down", str(args.K_down)]
    _step("build", ["build", "-i", str(model), "-o", str(sd), *encoding,
                    "--strip-dense", "--eval-cols", "4096", "--eval-x", "32", "--report-json", str(out / "report.json")])
    _step("perplexity and KL divergence", ["kld", "--base", str(model), "-m", str(sd), "-c", str(args.ctx_size), "--sparse",
                                           "--chunks", str(args.chunks), "--json", str(out / "kld.json")])
    _step("greedy pack", ["greedy", "-m", str(sd), "--base", str(model), "--limit", str(args.limit),
                          "--json", str(out / "greedy.json")],
          allowed=(0, 1))  # 1 = verdict FAIL: reported in the summary, not an error of the demo
    _step("one layer at a time", ["sweep", "-m", str(model), "-c", str(args.ctx_size), "--chunks", str(args.chunks),
                                  "--stack", "--json", str(out / "sweep.json"), *encoding])
    chosen = _chosen_layers(_load(out / "sweep.json")["stack"], args.max_delta_nll)
    if chosen:
        safe = out / "model_seeddelta_chosen.gguf"
        _step("the chosen layers", ["build", "-i", str(model), "-o", str(safe), *encoding, "--layers", chosen,
                                    "--strip-dense", "-q"])
        _step("the chosen layers: KL divergence", ["kld", "--base", str(model), "-m", str(safe), "-c", str(args.ctx_size),
                                                   "--sparse", "--chunks", str(args.chunks),
                                                   "--json", str(out / "kld_chosen.json")])
        _step("the chosen layers: greedy pack", ["greedy", "-m", str(safe), "--base", str(model), "--limit",
                                                 str(args.limit), "--json", str(out / "greedy_chosen.json")],
              allowed=(0, 1))
    summary = _summary(out, model, sd, time.perf_counter() - t0)
    summary["chosen"] = _chosen_summary(out, model, chosen, args.max_delta_nll)
    write_json_atomic(out / "summary.json", summary)
    _print(summary)
    return 1 if args.strict and summary["greedy"]["verdict"]["result"] != "PASS" else 0


def _chosen_layers(stack: list[dict[str, Any]], max_delta_nll: float) -> str:
    """The layers of the longest stack step (safest-first prefix) whose own measured ΔNLL is within
    the bound; "" when no step is."""
    within = [i for i, step in enumerate(stack) if step["delta_nll"] <= max_delta_nll]
    if not within:
        return ""
    return ",".join(sorted((s["added"].removeprefix("blk.") for s in stack[: within[-1] + 1]), key=int))


def _chosen_summary(out: Path, model: Path, layers: str, max_delta_nll: float) -> dict[str, Any]:
    if not layers:
        return {"layers": [], "max_delta_nll": max_delta_nll}
    kld, greedy = _load(out / "kld_chosen.json"), _load(out / "greedy_chosen.json")
    path = out / "model_seeddelta_chosen.gguf"
    return {"layers": [int(x) for x in layers.split(",")], "max_delta_nll": max_delta_nll, "model": str(path),
            "file_bytes": os.path.getsize(path), "ppl": kld["ppl_model"], "delta_nll": kld["delta_nll"],
            "kld": kld["kld"], "greedy": {"verdict": greedy["verdict"], "seeddelta": greedy["result"]["tasks"]},
            "original_file_bytes": os.path.getsize(model)}


def _summary(out: Path, model: Path, sd: Path, seconds: float) -> dict[str, Any]:
    report = _load(out / "report.json")
    kld, greedy, sweep = _load(out / "kld.json"), _load(out / "greedy.json"), _load(out / "sweep.json")
    weights = report["weights"]
    by_kind: dict[str, list[float]] = {}
    for w in weights:
        by_kind.setdefault(w["kind"], []).append(w["cos_mean_x_w"])
    return {
        "model": str(model),
        "seeddelta_model": str(sd),
        "weights_encoded": sum(1 for w in weights if w["emit"]),
        "weights_stripped": sum(1 for w in weights if w["strip_dense"]),
        "file_bytes": {"original": os.path.getsize(model), "seeddelta": os.path.getsize(sd)},
        "weight_memory_bytes": {"original": kld["base"]["memory"]["weights_bytes"],
                                "seeddelta": kld["model"]["memory"]["weights_bytes"]},
        "resident_memory_load_delta_bytes": {"original": kld["base"]["memory"]["rss_anon_load_delta_bytes"],
                                             "seeddelta": kld["model"]["memory"]["rss_anon_load_delta_bytes"]},
        "cos_mean_x_w_by_kind": by_kind,
        "ppl": {"ctx": kld["ctx"], "original": kld["ppl_base"], "seeddelta": kld["ppl_model"]},
        "paired_delta_nll": kld["delta_nll"],
        "kld": kld["kld"],
        "same_top_p": kld["same_top_p"],
        "layer_drift": kld.get("layer_drift", []),
        "one_layer_at_a_time": sweep["layers"],
        "safest_layers_together": sweep["stack"],
        "greedy": {"verdict": greedy["verdict"], "original": greedy["base"]["result"]["tasks"],
                   "seeddelta": greedy["result"]["tasks"]},
        "seconds": round(seconds, 1),
        "out": str(out),
    }


def _chosen_lines(c: dict[str, Any], change: Any, acc: Any) -> list[str]:
    if not c["layers"]:
        return [f"chosen layers              : none (no stack step stays within ΔNLL {c['max_delta_nll']})"]
    v = c["greedy"]["verdict"]
    return [
        f"chosen layers              : {', '.join(map(str, c['layers']))} (safest first, together within ΔNLL "
        f"{c['max_delta_nll']})",
        f"  file size                : {change(c['original_file_bytes'], c['file_bytes'])}",
        f"  paired ΔNLL, mean KLD    : {c['delta_nll']['mean']:+.5f} ± {c['delta_nll']['se']:.5f}, {c['kld']['mean']:.5f}",
        f"  greedy accuracy (SeedΔ)  : {acc(c['greedy']['seeddelta'])}: {' '.join([v['result'], *v.get('reasons', [])])}",
    ]


def _print(s: dict[str, Any]) -> None:
    fb, mem, ppl = s["file_bytes"], s["weight_memory_bytes"], s["ppl"]
    rss = s["resident_memory_load_delta_bytes"]
    drift = " ".join(f"{r['layer']}:{r['rel_l2_mean']:.2f}" for r in s["layer_drift"])
    one_layer = " ".join(f"{r['layer']}:{r['delta_nll']:+.3f}" for r in s["one_layer_at_a_time"])
    together = " ".join(f"+{r['added'].removeprefix('blk.')}:{r['delta_nll']:+.3f}/{r['bytes_saved'] / 1e6:.1f}"
                        for r in s["safest_layers_together"])
    g = s["greedy"]

    def change(a: int, b: int) -> str:
        return f"{a:,} B -> {b:,} B ({b / a - 1:+.1%})"

    def acc(tasks: dict[str, Any]) -> str:
        return ", ".join(f"{t} {v['accuracy']:.0%}" for t, v in sorted(tasks.items()))

    lines = [
        "",
        "== SeedΔ on the tiny model: summary",
        f"weights encoded / stripped : {s['weights_encoded']} / {s['weights_stripped']}",
        f"file size                  : {change(fb['original'], fb['seeddelta'])}",
        f"weight memory (loaded)     : {change(mem['original'], mem['seeddelta'])}",
        *([f"resident memory (measured) : {change(rss['original'], rss['seeddelta'])}"]
          if rss["original"] and rss["seeddelta"] else []),
        f"perplexity at ctx {ppl['ctx']:<8} : {ppl['original']['ppl']:.4f} ± {ppl['original']['se']:.4f} -> "
        f"{ppl['seeddelta']['ppl']:.4f} ± {ppl['seeddelta']['se']:.4f}",
        f"paired ΔNLL (ln PPL ratio) : {s['paired_delta_nll']['mean']:+.5f} ± {s['paired_delta_nll']['se']:.5f}",
        f"mean KLD, p99              : {s['kld']['mean']:.5f} ± {s['kld']['se']:.5f}, {s['kld']['p99']:.4f}",
        f"same top-1                 : {s['same_top_p']['mean']:.2%} ± {s['same_top_p']['se']:.2%}",
        *([f"hidden state after block   : {drift} (blk:relative L2 distance, mean per token)"] if drift else []),
        f"one layer at a time (ΔNLL) : {one_layer}",
        f"safest layers together     : {together} (+blk:ΔNLL/MB saved)",
        f"greedy accuracy (original) : {acc(g['original'])}",
        f"greedy accuracy (SeedΔ)    : {acc(g['seeddelta'])}",
        f"greedy pack                : {g['verdict']['result']} {'; '.join(g['verdict'].get('reasons', []))}",
        *([] if g["verdict"]["result"] == "PASS" else [
            "                             (a measured result: this budget costs too much quality; "
            "--strict turns it into exit status 1)"]),
        *_chosen_lines(s["chosen"], change, acc),
        f"files                      : {s['out']}/ (summary.json, report.json, kld.json, greedy.json, …)",
        f"total time                 : {s['seconds']:.1f} s",
    ]
    print("\n".join(lines), file=sys.stdout, flush=True)
