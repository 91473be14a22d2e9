"""`seeddelta scan`: every layer × FFN tensor (× K) encoded alone — its weight-space and functional
metrics (the original scan's names) and its measured effect on the model (paired ΔNLL ± se, KLD,
same top-1, bytes saved): the input of `seeddelta autogate`.

Every unit is a file with only that tensor as SeedΔ (dense stripped), measured against the dense
base on the same llama-perplexity windows, so a unit's figures equal `build` + `kld` of that unit.
Units are independent: -j N measures N at a time in local processes, --scheduler on a Dask
cluster, with the same figures. Units are cached (--cache, default ~/.cache/seeddelta/units): an
interrupted scan resumes."""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from seeddelta.commands.common import (
    Subparsers,
    add_encoding_args,
    add_input,
    add_jobs_args,
    add_model_arg,
    add_output,
    add_output_dir,
    add_text_args,
    apply_threads,
    describe,
    encoding_options,
    model_path,
    pool_from_args,
    windows_from_args,
)


def register(sub: Subparsers) -> None:
    p = sub.add_parser("scan", help="every FFN tensor alone: metrics and measured effect (input of autogate)",
                       description=describe(__doc__))
    add_model_arg(p)
    add_text_args(p)
    p.add_argument("--layers", default=None, metavar="A-B|LIST", help="layers to scan (default: all)")
    p.add_argument("--kinds", default="gate,up,down", metavar="LIST", help="FFN tensors to scan (gate,up,down)")
    p.add_argument("--eval-cols", type=int, default=64, metavar="N",
                   help="output rows sampled for the weight metrics (64, the original scan's default)")
    p.add_argument("--eval-x", type=int, default=32, metavar="N", help="random inputs for functional metrics (32)")
    add_output(p, "--json", default=None, metavar="PATH", help="write the scan (autogate's --scan input)")
    add_output_dir(p, "--cache", default=None, metavar="DIR",
                   help="unit cache directory (default: $SEEDDELTA_CACHE or ~/.cache/seeddelta/units)")
    p.add_argument("--no-cache", action="store_true", help="measure every unit, cache nothing")
    add_input(p, "--replay", default=None, metavar="PACK.json",
              help="also measure every unit on this replay pack (`seeddelta replay-pack`): replay_impact and "
                   "retention_replay per unit")
    add_encoding_args(p, several_K=True)
    add_jobs_args(p)
    p.set_defaults(handler=run)


def _note(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    from seeddelta.assets import sha256_file
    from seeddelta.builder.options import BuildOptions, validate_options
    from seeddelta.errors import SeedDeltaError
    from seeddelta.evaluation.memory import load
    from seeddelta.evaluation.scan import run_scan, scan_document, scan_units
    from seeddelta.evaluation.sweep import UnitMeasure, parse_kinds
    from seeddelta.evaluation.unit_cache import UnitCache, default_cache_dir
    from seeddelta.layers import parse_layers
    from seeddelta.outputs import write_json_atomic

    apply_threads(args)
    kinds = parse_kinds(args.kinds)
    if args.eval_cols <= 0 or args.eval_x < 0:
        raise SeedDeltaError("--eval-cols must be > 0 and --eval-x >= 0 (the scan reports the weight metrics)")
    if args.json is not None and not Path(args.json).resolve().parent.is_dir():
        raise SeedDeltaError(f"--json: directory does not exist: {Path(args.json).resolve().parent}")
    flags = encoding_options(args)
    k_values: tuple[int, ...] = flags.pop("K")
    ks = {kind: list(flags[f"K_{kind[4:]}"] or k_values) for kind in kinds}
    for short in ("gate", "up", "down"):
        flags[f"K_{short}"] = -1  # the per-kind lists are in `ks`; the template's K is per unit
    path = model_path(args)
    template = BuildOptions(input=str(path), output="", progress=False, eval_cols=args.eval_cols, eval_x=args.eval_x,
                            K=k_values[0], **flags)
    with tempfile.TemporaryDirectory(prefix="seeddelta-scan-") as tmp:  # bad flags: before any work
        validate_options(replace(template, output=str(Path(tmp) / "probe.gguf")))
    cache = UnitCache(None if args.no_cache else (args.cache or default_cache_dir()))
    pool = pool_from_args(args)
    base = load(path, use_seeddelta=False)
    replay_doc = replay_windows = None
    model_sha = sha256_file(path)
    if args.replay is not None:  # before any work: a bad pack is one line
        from seeddelta.evaluation.replay import read_pack

        replay_doc, replay_windows = read_pack(args.replay, model_sha, base.model.config.n_vocab)
    text_path, _, _, windows = windows_from_args(args, base.tokenizer)
    units = scan_units(parse_layers(args.layers, base.model.config.n_layer), kinds, ks)
    print(f"seeddelta scan: {path}, {len(units)} unit(s) (layer x tensor x K), {windows.n_chunk} window(s) of "
          f"{windows.n_ctx}, {windows.n_scored} scored; {pool.describe()}; cache {cache.directory or 'off'}", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="seeddelta-scan-") as tmp:
        measure = UnitMeasure(path, base, windows, template, Path(tmp), note=_note, cache=cache, threads=args.threads)
        replay = None
        if replay_windows is not None:
            from seeddelta.evaluation.replay import ReplayMeasure, pack_sha256

            replay = ReplayMeasure(path, base, replay_windows, template, Path(tmp), note=_note, cache=cache,
                                   threads=args.threads, pack_sha256=pack_sha256(args.replay))
        try:
            rows = run_scan(measure, units, _note, pool, replay)
        except KeyboardInterrupt:
            if cache.directory is not None:
                _note(f"interrupted: the units measured so far are cached in {cache.directory}; "
                      "the same command resumes from there")
            raise
    _print(rows)
    if args.json:
        encoding = {**flags, "K": list(k_values), "K_lists": {kind: ks[kind] for kind in kinds}}
        write_json_atomic(args.json, scan_document(
            rows, model=str(path), model_sha256=model_sha, text=str(text_path), ctx=windows.n_ctx,
            chunks=windows.n_chunk, encoding=encoding, ks=ks, k_fixed=k_values[0], eval_cols=args.eval_cols,
            eval_x=args.eval_x, cache_dir=str(cache.directory) if cache.directory else None,
            replay=None if replay_doc is None else {"path": str(args.replay), "sha256": pack_sha256(args.replay),
                                                    "windows": replay_windows.n_chunk, "ctx": replay_windows.n_ctx,  # type: ignore[union-attr]
                                                    "criterion": replay_doc["criterion"]}), "scan JSON")
    return 0


def _print(rows: list[dict[str, Any]]) -> None:
    width = max(len(f"blk.{r['layer']}.{r['kind']}") for r in rows) + 2
    print(f"{'tensor':<{width}}{'K':>5}{'S_mean':>8}{'cos_x_w':>9}{'ΔNLL':>10}{'± se':>9}{'KLD mean':>10}"
          f"{'bytes saved':>13}{'ΔNLL/MB':>10}{'ret':>6}")
    for r in rows:
        per_mb = f"{r['delta_nll_per_mb']:+10.4f}" if r["delta_nll_per_mb"] is not None else f"{'-':>10}"
        name = f"blk.{r['layer']}.{r['kind']}"
        print(f"{name:<{width}}{r['K']:>5}{r['S_mean']:8.4f}{r['cos_mean_x_w']:9.4f}"
              f"{r['delta_nll']:+10.5f}{r['delta_nll_se']:9.5f}{r['kld_mean']:10.5f}{r['bytes_saved']:13,}{per_mb}"
              f"{r['retention']:6.3f}")
    safest = sorted(rows, key=lambda r: (r["delta_nll"], r["layer"], r["kind"], r["K"]))
    print("safest first: " + ", ".join(f"blk.{r['layer']}.{r['kind']}@{r['K']}" for r in safest[:12])
          + (" ..." if len(safest) > 12 else ""))
