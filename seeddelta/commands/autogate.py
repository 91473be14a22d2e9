"""`seeddelta autogate`: from a scan to a policy — the tensors to compress and their K, chosen one at
a time and kept only while the whole selection, re-measured, stays within the limits.

Candidates are the scan's units that pass the original's filters (cos_mean_x_w >= 0.70,
cos_p05_x_w >= 0.50, ffn_up only with --allow-up, ffn_down only with --enable-down, --min-gap
between selected layers) and the layer band; they are taken cheapest first — by measured ΔNLL per
byte saved when a byte budget is given (--target-bytes / --target-saving), else by measured ΔNLL.
Each step re-evaluates the whole selection (paired ΔNLL ± se, KLD, greedy pack with the compressed
weights in use); the policy and a record of every step (POLICY.autogate.json) are written at the end.

--retention-cap (the v1 plan's mechanism 1 cap, off by default) builds, measures and writes each chosen
tensor at ⌈K·(1 + ret)/2⌉ entries per row instead of the scan's K; --retention says which retention of
the scan is ret: proxy (`retention`, from cos_mean_x_w) or replay (`retention_replay`, a scan made with
--replay: mechanism 6). Candidates, filters and their order are unchanged (they read the scan at K)."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from seeddelta.commands.common import (
    Subparsers,
    add_input,
    add_model_arg,
    add_output,
    add_output_dir,
    add_threads_arg,
    apply_threads,
    describe,
    model_path,
)


def register(sub: Subparsers) -> None:
    p = sub.add_parser("autogate", help="choose the tensors to compress from a scan, measuring each step",
                       description=describe(__doc__))
    add_input(p, "--scan", required=True, metavar="SCAN.json", help="a `seeddelta scan --json` file")
    add_model_arg(p, "GGUF model the scan was made on")
    add_output(p, "-o", "--output", required=True, metavar="POLICY.json", help="policy file to write")
    add_output(p, "--report", default=None, metavar="PATH",
                   help="record of every step (default: next to the policy, <name>.autogate.json)")
    g = p.add_argument_group("evaluation (defaults: the scan's text, context and windows)")
    add_input(p, "-f", "--file", group=g, default=None, metavar="TEXT", help="text for ΔNLL and KLD")
    g.add_argument("-c", "--ctx-size", dest="ctx", type=int, default=None, metavar="N", help="window size")
    g.add_argument("--chunks", type=int, default=None, metavar="N", help="at most N windows")
    add_input(p, "--pack", group=g, default=None, metavar="FILE", help="greedy pack (default: the tiny model's test pack)")
    g.add_argument("--greedy-limit", type=int, default=10, metavar="N", help="prompts per task of the pack (10; 0: all)")
    g.add_argument("--greedy-tolerance", type=float, default=0.05, metavar="F",
                   help="allowed accuracy drop against the base (0.05)")
    g.add_argument("--no-greedy", dest="greedy", action="store_false", help="do not require a greedy PASS")
    lim = p.add_argument_group("limits every kept step meets")
    lim.add_argument("--max-delta-nll", type=float, default=0.01, metavar="F",
                     help="paired ΔNLL (ln PPL ratio) of the whole selection at most F (0.01: about +1%% PPL)")
    lim.add_argument("--se-margin", type=float, default=0.0, metavar="Z",
                     help="require ΔNLL + Z·se <= --max-delta-nll (0: the mean)")
    lim.add_argument("--max-kld", type=float, default=None, metavar="F", help="mean KLD at most F (off)")
    b = p.add_argument_group("budget")
    b.add_argument("--max-tensors", type=int, default=None, metavar="N", help="at most N tensors in all")
    target = b.add_mutually_exclusive_group()
    target.add_argument("--target-bytes", type=int, default=None, metavar="B", help="stop once the GGUF is B bytes smaller")
    target.add_argument("--target-saving", default=None, metavar="P%",
                        help="stop once the GGUF is P percent smaller (e.g. 10 or 10%%)")
    f = p.add_argument_group("filters (the original autogate's defaults)")
    f.add_argument("--allow-up", action="store_true", help="consider ffn_up (denied by default)")
    f.add_argument("--enable-down", action="store_true", help="consider ffn_down (off by default)")
    f.add_argument("--min-gap", type=int, default=1, metavar="N",
                   help="selected layers more than N apart (1: never adjacent; 0: any)")
    f.add_argument("--gate-cos-metric", default="cos_mean_x_w", metavar="NAME", help="scan field (cos_mean_x_w)")
    f.add_argument("--gate-cos-p05-metric", default="cos_p05_x_w", metavar="NAME", help="scan field (cos_p05_x_w)")
    f.add_argument("--gate-cos-threshold", type=float, default=0.70, metavar="F", help="minimum (0.70)")
    f.add_argument("--gate-cos-p05-threshold", type=float, default=0.50, metavar="F", help="minimum (0.50)")
    f.add_argument("--band", default="all", metavar="core|leaf|use_more_bits|all|LIST",
                   help="layers admitted freely: core (middle half), leaf (outer quarters), use_more_bits (the layers "
                        "llama.cpp's ffn_down rule leaves unprotected), a list like 2-5, or all")
    f.add_argument("--error-quantile", type=float, default=None, metavar="Q",
                   help="also require the scan's tail error S_p95 at most its Q quantile over the kind's units "
                        "(the v1 plan's error-quantile filter; off)")
    f.add_argument("--band-extreme", type=float, default=0.0, metavar="F",
                   help="outside the band: the scan's ΔNLL + 2·se must be at most F (0.0)")
    r = p.add_argument_group("retention (the v1 plan's mechanisms 1 and 6; off by default)")
    r.add_argument("--retention-cap", action="store_true",
                   help="build and write each chosen tensor at ceil(K·(1 + ret)/2) entries per row, ret its retention "
                        "in [0, 1] (the least faithful unit keeps half its K)")
    r.add_argument("--retention", choices=("proxy", "replay"), default="proxy",
                   help="which retention --retention-cap reads: proxy (the scan's `retention`, from cos_mean_x_w) or "
                        "replay (`retention_replay`: needs a scan made with --replay PACK) (proxy)")
    add_output_dir(p, "--cache", default=None, metavar="DIR",
                   help="step cache directory (default: $SEEDDELTA_CACHE or ~/.cache/seeddelta/units)")
    p.add_argument("--no-cache", action="store_true", help="evaluate every step, cache nothing")
    add_threads_arg(p, "torch threads (0: torch's default)")
    p.set_defaults(handler=run)


def _note(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _target_bytes(args: argparse.Namespace, input_bytes: int) -> int | None:
    from seeddelta.errors import SeedDeltaError

    if args.target_bytes is not None:
        if args.target_bytes <= 0:
            raise SeedDeltaError(f"--target-bytes must be positive, got {args.target_bytes}")
        return int(args.target_bytes)
    if args.target_saving is None:
        return None
    text = str(args.target_saving).strip().removesuffix("%")
    try:
        percent = float(text)
    except ValueError:
        raise SeedDeltaError(f"--target-saving: expected a percentage like 10 or 10%, got {args.target_saving!r}") from None
    if not 0 < percent < 100:
        raise SeedDeltaError(f"--target-saving must be between 0 and 100 percent, got {args.target_saving}")
    return int(round(input_bytes * percent / 100))


def _check_args(args: argparse.Namespace) -> None:
    from seeddelta.errors import SeedDeltaError
    from seeddelta.outputs import same_file

    for flag, value, ok in (("--max-delta-nll", args.max_delta_nll, args.max_delta_nll == args.max_delta_nll),
                            ("--se-margin", args.se_margin, args.se_margin >= 0),
                            ("--max-kld", args.max_kld, args.max_kld is None or args.max_kld >= 0),
                            ("--max-tensors", args.max_tensors, args.max_tensors is None or args.max_tensors > 0),
                            ("--min-gap", args.min_gap, args.min_gap >= 0),
                            ("--error-quantile", args.error_quantile,
                             args.error_quantile is None or 0 <= args.error_quantile <= 1),
                            ("--greedy-tolerance", args.greedy_tolerance, 0 <= args.greedy_tolerance <= 1),
                            ("--chunks", args.chunks, args.chunks is None or args.chunks > 0 or args.chunks == -1)):
        if not ok:
            raise SeedDeltaError(f"{flag}: invalid value {value}")
    if args.retention == "replay" and not args.retention_cap:
        raise SeedDeltaError("--retention replay chooses the retention of --retention-cap, which is off: "
                             "add --retention-cap")
    report = args.report or _default_report(args.output)
    for flag, path in (("-o", args.output), ("--report", report)):
        directory = Path(path).resolve().parent
        if not directory.is_dir():
            raise SeedDeltaError(f"{flag}: directory does not exist: {directory}")
        for other in (args.scan, args.model) if args.model else (args.scan,):
            if os.path.exists(other) and same_file(path, other):
                raise SeedDeltaError(f"{flag} {path} is an input file; choose another path")
    if same_file(args.output, report):
        raise SeedDeltaError(f"--report {report} is the policy file -o; choose another path")


def _default_report(policy: str) -> str:
    p = Path(policy)
    return str(p.with_name(p.name.removesuffix(".json") + ".autogate.json"))


def run(args: argparse.Namespace) -> int:
    from seeddelta.assets import sha256_file, tiny_test_pack
    from seeddelta.builder.options import BuildOptions
    from seeddelta.errors import SeedDeltaError
    from seeddelta.evaluation.autogate import Budget, Limits, run_autogate
    from seeddelta.evaluation.greedy import load_pack
    from seeddelta.evaluation.memory import load
    from seeddelta.evaluation.pack import limit_per_task
    from seeddelta.evaluation.sweep import GreedySettings, UnitMeasure
    from seeddelta.evaluation.unit_cache import UnitCache, default_cache_dir
    from seeddelta.evaluation.windows import text_windows
    from seeddelta.outputs import write_json_atomic, write_text_atomic
    from seeddelta.policy.autogate import (
        ENCODING_KEYS,
        Filters,
        band_layers,
        build_flags,
        policy_document,
        read_scan,
        retention_caps,
        with_error_limits,
    )
    from seeddelta.policy.export import export_text

    apply_threads(args)
    _check_args(args)
    scan = read_scan(args.scan)
    path = model_path(args)
    if sha256_file(path) != scan.model_sha256:
        raise SeedDeltaError(f"{args.scan}: model_sha256: the scan was made on another model "
                             f"({scan.model_sha256[:16]}…), not on {path}")
    caps = retention_caps(scan, args.retention) if args.retention_cap else None
    enc = dict(scan.encoding)
    if enc["imatrix"] is not None and not os.path.isfile(enc["imatrix"]):
        raise SeedDeltaError(f"{args.scan}: encoding.imatrix: {enc['imatrix']} not found")
    text = Path(args.file) if args.file else Path(scan.text)
    k_first = enc["K"][0] if isinstance(enc.get("K"), list) and enc["K"] else 32
    template = BuildOptions(input=str(path), output="", progress=False, eval_cols=scan.eval_cols, eval_x=scan.eval_x,
                            K=k_first, **{k: enc[k] for k in ENCODING_KEYS})
    base = load(path, use_seeddelta=False)
    filters = Filters(allow_up=args.allow_up, enable_down=args.enable_down, min_gap=args.min_gap,
                      cos_metric=args.gate_cos_metric, cos_p05_metric=args.gate_cos_p05_metric,
                      cos_threshold=args.gate_cos_threshold, cos_p05_threshold=args.gate_cos_p05_threshold,
                      band=band_layers(args.band, base.model.config.n_layer), band_extreme=args.band_extreme,
                      error_quantile=args.error_quantile)
    filters = with_error_limits(filters, scan.units)
    windows = text_windows(text, args.ctx or scan.ctx, args.chunks or scan.chunks, base.tokenizer).windows
    greedy = None
    if args.greedy:
        items = tuple(limit_per_task(load_pack(args.pack), args.greedy_limit))
        pack_file = args.pack or tiny_test_pack()
        greedy = GreedySettings(items, sha256_file(pack_file), args.greedy_tolerance)
    limits = Limits(args.max_delta_nll, args.max_kld, args.se_margin, args.greedy)
    budget = Budget(args.max_tensors, _target_bytes(args, os.path.getsize(path)))
    cache = UnitCache(None if args.no_cache else (args.cache or default_cache_dir()))
    print(f"seeddelta autogate: {args.scan} ({len(scan.units)} unit(s)) on {path}; {windows.n_chunk} window(s) of "
          f"{windows.n_ctx}; greedy {len(greedy.items) if greedy else 'off'}; cache {cache.directory or 'off'}",
          file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="seeddelta-autogate-") as tmp:
        measure = UnitMeasure(path, base, windows, template, Path(tmp), note=_note, greedy=greedy, cache=cache)
        record = run_autogate(measure, scan, filters, limits, budget, _note, caps)
        base_greedy = measure.base_greedy() if greedy is not None else None
    selection = {(layer, kind): K for layer, kind, K in record["selection"]}
    policy = policy_document(selection, enc)
    command = ["seeddelta", "build", "-i", str(path), "-o", "OUT.gguf", "--policy", args.output,
               *build_flags(enc, k_first)]
    report = _default_report(args.output) if args.report is None else args.report
    record = {"scan": args.scan, "model": str(path), "model_sha256": scan.model_sha256, "policy": args.output,
              "evaluation": {"text": str(text), "ctx": windows.n_ctx, "chunks": windows.n_chunk,
                             "greedy": greedy.spec() if greedy else None,
                             "base_greedy_accuracy": base_greedy["accuracy"] if base_greedy else None},
              "build_command": command, **record,
              "retention_cap": None if caps is None else {
                  "retention": args.retention, "rule": "K -> ceil(K·(1 + ret)/2), ret the scan's "
                  + ("retention_replay" if args.retention == "replay" else "retention"),
                  "K_built": {f"blk.{layer}.{kind} K={K}": c for (layer, kind, K), c in sorted(caps.items())}},
              "method": "each step: a file with the selection so far plus the step's move (dense stripped, the scan's "
                        "encoding), sparse runtime, against the dense base on the same windows (paired ΔNLL ± se, "
                        "KLD) and the greedy pack with that file in use; kept iff the limits hold"}
    write_text_atomic(args.output, export_text(policy), "policy output")
    write_json_atomic(report, record, "autogate report")
    _print(record, report)
    return 0


def _print(record: dict[str, Any], report: str) -> None:
    final = record["final"]
    kept = [s for s in record["steps"] if s["kept"]]
    print(f"{len(record['steps'])} step(s), {len(kept)} kept; stopped: {record['stopped']}")
    if final is None:
        print("selection: none (no candidate stayed within the limits)")
    else:
        sel = ", ".join(f"blk.{layer}.{kind}@{K}" for layer, kind, K in record["selection"])
        g = final.get("greedy")
        print(f"selection: {sel}")
        print(f"  ΔNLL {final['delta_nll']:+.5f} ± {final['delta_nll_se']:.5f}, KLD {final['kld_mean']:.5f}, "
              f"greedy {g['result'] if g else 'off'}, GGUF {final['input_bytes']:,} -> {final['file_bytes']:,} B "
              f"({-final['saving']:+.1%})")
    if record["budget_met"] is False:
        print("warning: the byte target was not reached within the limits", file=sys.stderr)
    print(f"wrote {record['policy']} and {report}")
    print("build it: " + " ".join(record["build_command"]))
