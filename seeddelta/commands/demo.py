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

from seeddelta.assets import TINY_MODEL
from seeddelta.commands.common import (
    Subparsers,
    add_input,
    add_output_dir,
    add_quiet_arg,
    add_threads_arg,
    chunks_int,
    describe,
    finite_float,
    model_path,
    nonnegative_int,
    positive_int,
)
from seeddelta.errors import SeedDeltaError

CALIBRATION_SAMPLES = 400  # ≈ 25k tokens: enough for stable Σx² per input channel of a 192/768-wide FFN

# every file the demo writes into --out, checked against the inputs before the first step
OUTPUT_FILES = ("toy.json", "calibration.txt", "imatrix.gguf", "model_seeddelta.gguf", "report.json", "kld.json",
                "greedy.json", "sweep.json", "model_seeddelta_chosen.gguf", "kld_chosen.json", "greedy_chosen.json",
                "summary.json")


def register(sub: Subparsers) -> None:
    p = sub.add_parser("demo", help="the main job on the built-in tiny model (see README)",
                       description=describe(__doc__))
    add_output_dir(p, "--out", default="runs/demo", metavar="DIR",
                   help="output directory, created when missing (default: runs/demo)")
    add_input(p, "-m", "--model", default=None, metavar="FILE", implied=TINY_MODEL,
              help="GGUF model (default: the tiny model shipped in the package)")
    p.add_argument("--K-gate", type=positive_int, default=64, metavar="N",
                   help="budget per row of ffn_gate (64; n_in is 192 on the tiny model)")
    p.add_argument("--K-up", type=positive_int, default=64, metavar="N", help="budget per row of ffn_up (64)")
    p.add_argument("--K-down", type=positive_int, default=256, metavar="N",
                   help="budget per row of ffn_down (256; n_in is 768 on the tiny model)")
    p.add_argument("-c", "--ctx-size", type=positive_int, default=512, metavar="N",
                   help="context for the imatrix, perplexity and KLD (512)")
    p.add_argument("--chunks", type=chunks_int, default=-1, metavar="N",
                   help="at most N perplexity windows (default -1: all)")
    p.add_argument("--limit", type=nonnegative_int, default=0, metavar="N",
                   help="greedy prompts per task (0: the whole pack)")
    p.add_argument("--skip-toy", action="store_true", help="do not run harness A first")
    p.add_argument("--max-delta-nll", type=finite_float, default=0.01, metavar="X",
                   help="the chosen subset: the most safest-first layers whose ΔNLL together stays at or below X "
                        "(0.01)")
    p.add_argument("--strict", action="store_true", help="exit status 1 when the greedy pack FAILs")
    add_threads_arg(p, "threads for every step (default 0: automatic; passed on as -t)")
    add_quiet_arg(p)
    p.set_defaults(handler=run)


def _step(title: str, argv: list[str], allowed: tuple[int, ...] = (0,)) -> int:
    from seeddelta.cli import main

    print(f"\n== {title}: seeddelta {' '.join(argv)}", flush=True)
    status = main(argv)
    if status not in allowed:
        raise SeedDeltaError(f"step '{title}' failed with exit status {status}", exit_code=1)
    return status


def _calibration_text(path: Path) -> None:
    from seeddelta.outputs import write_text_atomic
    from seeddelta.tiny.dataset import DEFAULT_SEED, heldout_texts, train_samples

    stream = train_samples(DEFAULT_SEED + 1, 0, heldout_texts())
    write_text_atomic(path, "".join(next(stream).text for _ in range(CALIBRATION_SAMPLES)))


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def _preflight(args: argparse.Namespace, model: Path, out: Path) -> None:
    """Everything that can be known before the first step: the outputs against the model, the model's
    header, the context against the model and the texts (a bad option fails now, not after minutes)."""
    from seeddelta.assets import tiny_val_text
    from seeddelta.gguf_format.reader import GGUFModel
    from seeddelta.outputs import same_file

    for name in OUTPUT_FILES:  # (the guard already checked that --out can be created)
        if same_file(out / name, model):
            raise SeedDeltaError(f"--out {out} would write {out / name}, which is the input -m {model}; inputs "
                                 "are never overwritten, choose another --out")
    gguf = GGUFModel(model, what="model")
    n_ctx_train = gguf.get(f"{gguf.arch}.context_length")
    if isinstance(n_ctx_train, int) and not isinstance(n_ctx_train, bool) and args.ctx_size > n_ctx_train:
        raise SeedDeltaError(f"-c {args.ctx_size} is beyond the model's training context ({n_ctx_train} tokens); "
                             f"the demo measures within it: use -c {n_ctx_train} or less")
    # a token covers at least one byte, so a text of B bytes has at most B + 1 tokens (BOS): too short
    # for 2·n_ctx is certain below that (the exact count needs the tokenizer: each step checks it)
    text = tiny_val_text()
    n_bytes = text.stat().st_size
    if n_bytes + 1 < 2 * args.ctx_size:
        raise SeedDeltaError(f"-c {args.ctx_size}: the evaluation text {text} has {n_bytes} bytes, fewer than "
                             f"the 2·n_ctx = {2 * args.ctx_size} tokens perplexity needs")


def run(args: argparse.Namespace) -> int:
    model = model_path(args)
    if not model.is_file():
        raise SeedDeltaError(f"model not found: {model}")
    out = Path(args.out)
    _preflight(args, model, out)
    out.mkdir(parents=True, exist_ok=True)
    common = ["-t", str(args.threads), *(["-q"] if args.quiet else [])]
    t0 = time.perf_counter()
    if not args.skip_toy:
        _step("harness A", ["toy", "--json", str(out / "toy.json"), *common])
    _calibration_text(out / "calibration.txt")
    _step("imatrix", ["imatrix", "-m", str(model), "-f", str(out / "calibration.txt"), "-o", str(out / "imatrix.gguf"),
                      "-c", str(args.ctx_size), *common])
    sd = out / "model_seeddelta.gguf"
    encoding = ["--base", "--row-scale", "--imatrix", str(out / "imatrix.gguf"),
                "--K-gate", str(args.K_gate), "--K-up", str(args.K_up), "--K-down", str(args.K_down)]
    _step("build", ["build", "-i", str(model), "-o", str(sd), *encoding, *common,
                    "--strip-dense", "--eval-cols", "4096", "--eval-x", "32", "--report-json", str(out / "report.json")])
    _step("perplexity and KL divergence", ["kld", "--base", str(model), "-m", str(sd), "-c", str(args.ctx_size), "--sparse",
                                           "--chunks", str(args.chunks), "--json", str(out / "kld.json"), *common])
    _step("greedy pack", ["greedy", "-m", str(sd), "--base", str(model), "--limit", str(args.limit),
                          "--json", str(out / "greedy.json"), *common],
          allowed=(0, 1))  # 1 = verdict FAIL: reported in the summary, not an error of the demo
    _step("one layer at a time", ["sweep", "-m", str(model), "-c", str(args.ctx_size), "--chunks", str(args.chunks),
                                  "--stack", "--json", str(out / "sweep.json"), *encoding, *common])
    chosen = _chosen_layers(_load(out / "sweep.json")["stack"], args.max_delta_nll)
    if chosen:
        safe = out / "model_seeddelta_chosen.gguf"
        _step("the chosen layers", ["build", "-i", str(model), "-o", str(safe), *encoding, "--layers", chosen,
                                    "--strip-dense", "-t", str(args.threads), "-q"])
        _step("the chosen layers: KL divergence", ["kld", "--base", str(model), "-m", str(safe), "-c", str(args.ctx_size),
                                                   "--sparse", "--chunks", str(args.chunks),
                                                   "--json", str(out / "kld_chosen.json"), *common])
        _step("the chosen layers: greedy pack", ["greedy", "-m", str(safe), "--base", str(model), "--limit",
                                                 str(args.limit), "--json", str(out / "greedy_chosen.json"), *common],
              allowed=(0, 1))
    summary = _summary(out, model, sd, time.perf_counter() - t0)
    summary["chosen"] = _chosen_summary(out, model, chosen, args.max_delta_nll)
    from seeddelta.outputs import write_json_atomic

    write_json_atomic(out / "summary.json", summary)
    _print(summary)
    _print_next(args, chosen)
    return 1 if args.strict and summary["greedy"]["verdict"]["result"] != "PASS" else 0


def _print_next(args: argparse.Namespace, chosen: str) -> None:
    """What to run to do the same on one's own model (the demo's settings, the user's files)."""
    k = f"--K-gate {args.K_gate} --K-up {args.K_up} --K-down {args.K_down}"
    enc = f"--base --row-scale --imatrix imatrix.gguf {k}"
    lines = [
        "",
        "== next: the same on your own model (MODEL.gguf, calibration and evaluation text of your own)",
        "seeddelta imatrix -m MODEL.gguf -f calibration.txt -o imatrix.gguf",
        f"seeddelta build -i MODEL.gguf -o MODEL-sd.gguf {enc} --strip-dense --report-json report.json",
        "seeddelta kld --base MODEL.gguf -m MODEL-sd.gguf -f eval.txt --sparse --json kld.json",
        f"seeddelta sweep -m MODEL.gguf -f eval.txt --stack {enc} --json sweep.json",
        f"seeddelta build -i MODEL.gguf -o MODEL-chosen.gguf {enc} --strip-dense --layers LIST   "
        f"# the layers sweep --stack found safe (here: {chosen or 'none'})",
        "seeddelta greedy -m MODEL-chosen.gguf --base MODEL.gguf --pack prompts.jsonl   "
        "# JSON lines: id, task, prompt, answer",
        "Budgets: K is per output row; a COO entry costs 4 bytes, so K must stay well below n_in / 2 "
        "(less for quantized models) to save space. `seeddelta COMMAND --help` lists every option.",
    ]
    print("\n".join(lines), flush=True)


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
