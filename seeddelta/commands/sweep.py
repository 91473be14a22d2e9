"""`seeddelta sweep`: SeedΔ on one layer (or one FFN tensor) at a time, then — with `--stack` — on the
safest units together, one more at each step: which layers are safe, and where the cliff is.

Every unit is a file with only that unit encoded (dense stripped), measured against the dense base
on the same llama-perplexity windows (paired ΔNLL ± se, KLD, same top-1, bytes saved)."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

from seeddelta.commands.common import (
    Subparsers,
    add_encoding_args,
    add_engine_arg,
    add_model_arg,
    add_text_args,
    apply_threads,
    describe,
    encoding_options,
    encoding_template,
    model_path,
    windows_from_args,
)
from seeddelta.evaluation.memory import load
from seeddelta.evaluation.sweep import (
    UnitMeasure,
    make_units,
    parse_kinds,
    row_label,
    safest_first,
    stack_units,
    sweep_units,
)
from seeddelta.layers import parse_layers
from seeddelta.outputs import write_json_atomic


def register(sub: Subparsers) -> None:
    p = sub.add_parser("sweep", help="SeedΔ on one layer at a time: which layers are safe (B2)",
                       description=describe(__doc__))
    add_model_arg(p)
    add_text_args(p)
    p.add_argument("--layers", default=None, metavar="A-B|LIST", help="layers to sweep (default: all)")
    p.add_argument("--kinds", default="gate,up,down", metavar="LIST",
                   help="FFN tensors encoded in each unit: any of gate,up,down (default: all three)")
    p.add_argument("--per-kind", action="store_true", help="one unit per (layer, tensor) instead of per layer")
    p.add_argument("--stack", action="store_true",
                   help="then encode the safest units together, adding one at a time (where is the cliff?)")
    p.add_argument("--json", default=None, metavar="PATH", help="write the table as JSON")
    p.add_argument("--keep", default=None, metavar="DIR", help="keep the per-unit SeedΔ files in DIR")
    add_encoding_args(p)
    add_engine_arg(p)
    p.set_defaults(handler=run)


def _note(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    apply_threads(args)
    kinds = parse_kinds(args.kinds)
    path = model_path(args)
    base = load(path, use_seeddelta=False, engine=args.engine, n_ctx=args.ctx, threads=args.threads)
    text_path, _, _, windows = windows_from_args(args, base.tokenizer)
    units = make_units(parse_layers(args.layers, base.model.config.n_layer), kinds, args.per_kind)
    print(f"seeddelta sweep: {path}, {len(units)} unit(s), {windows.n_chunk} window(s) of {windows.n_ctx}, "
          f"{windows.n_scored} scored", file=sys.stderr)
    stack: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="seeddelta-sweep-") as tmp:
        out_dir = Path(args.keep) if args.keep else Path(tmp)
        out_dir.mkdir(parents=True, exist_ok=True)
        measure = UnitMeasure(path, base, windows, encoding_template(args), out_dir, keep_files=bool(args.keep),
                              note=_note, engine=args.engine, threads=args.threads)
        rows = sweep_units(measure, units, _note)
        if args.stack:
            stack = stack_units(measure, rows, _note)
    _print(rows)
    if stack:
        _print_stack(stack)
    if args.json:
        write_json_atomic(args.json, {
            "model": str(path), "text": str(text_path), "ctx": windows.n_ctx, "chunks": windows.n_chunk,
            "engine": args.engine, "encoding": encoding_options(args), "kinds": list(kinds), "per_kind": bool(args.per_kind), "layers": rows,
            "stack": stack,
            "method": "per unit: a file with only that unit's FFN weights as SeedΔ (dense stripped), sparse runtime "
                      "(engine llama.cpp: materialized for stock llama.cpp), "
                      "against the dense base on the same llama-perplexity windows; delta_nll = mean paired "
                      "NLL_model - NLL_base = ln(PPL ratio); stack step n: the n units with the smallest "
                      "delta_nll encoded together"})
    return 0


def _print(rows: list[dict[str, Any]]) -> None:
    width = max(len(row_label(r)) for r in rows) + 2
    print(f"{'unit':<{width}}{'ΔNLL':>10}{'± se':>9}{'PPL ratio':>11}{'KLD mean':>10}{'KLD p99':>9}{'same top':>10}{'bytes saved':>13}")
    for r in rows:
        print(f"{row_label(r):<{width}}{r['delta_nll']:+10.5f}{r['delta_nll_se']:9.5f}{r['ppl_ratio']:11.4f}"
              f"{r['kld_mean']:10.5f}{r['kld_p99']:9.4f}{r['same_top_p']:10.2%}{r['bytes_saved']:13,}")
    print("safest first: " + ", ".join(row_label(r) for r in safest_first(rows)))


def _print_stack(stack: list[dict[str, Any]]) -> None:
    print("\nthe safest units encoded together, one more at each step:")
    width = max(len(r["added"]) for r in stack) + 4
    print(f"{'step':<6}{'+ unit':<{width}}{'ΔNLL':>10}{'± se':>9}{'PPL ratio':>11}{'KLD mean':>10}{'same top':>10}"
          f"{'bytes saved':>13}")
    for r in stack:
        print(f"{r['step']:<6}{r['added']:<{width}}{r['delta_nll']:+10.5f}{r['delta_nll_se']:9.5f}{r['ppl_ratio']:11.4f}"
              f"{r['kld_mean']:10.5f}{r['same_top_p']:10.2%}{r['bytes_saved']:13,}")
