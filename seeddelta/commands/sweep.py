"""`seeddelta sweep`: SeedΔ on one layer (or one FFN tensor) at a time, then — with `--stack` — on the
safest units together, one more at each step: which layers are safe, and where the cliff is.

Every unit is a file with only that unit encoded (dense stripped), measured against the dense base
on the same llama-perplexity windows (paired ΔNLL ± se, KLD, same top-1, bytes saved)."""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from seeddelta.commands.common import (
    Subparsers,
    add_encoding_args,
    add_engine_arg,
    add_model_arg,
    add_output,
    add_output_dir,
    add_quiet_arg,
    add_text_args,
    apply_threads,
    describe,
    encoding_options,
    encoding_template,
    layers_arg,
    model_path,
    progress,
    progress_note,
    warn,
    windows_from_args,
)


def register(sub: Subparsers) -> None:
    p = sub.add_parser("sweep", help="SeedΔ on one layer at a time: which layers are safe (B2)",
                       description=describe(__doc__))
    add_model_arg(p)
    add_text_args(p)
    p.add_argument("--layers", type=layers_arg, default=None, metavar="A-B|LIST",
                   help="layers to sweep: A-B (inclusive) or a list like 3,5,8-10 (default: all)")
    p.add_argument("--kinds", default="gate,up,down", metavar="LIST",
                   help="FFN tensors encoded in each unit: any of gate,up,down (default: all three)")
    p.add_argument("--per-kind", action="store_true", help="one unit per (layer, tensor) instead of per layer")
    p.add_argument("--stack", action="store_true",
                   help="then encode the safest units together, adding one at a time (where is the cliff?)")
    add_output(p, "--json", default=None, metavar="PATH", help="write the table as JSON")
    add_output_dir(p, "--keep", default=None, metavar="DIR",
                   help="keep the per-unit SeedΔ files in DIR (blk.N.gguf, stackN.gguf; created when missing)")
    add_encoding_args(p)
    add_quiet_arg(p)
    add_engine_arg(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from seeddelta.builder.options import validate_encoding
    from seeddelta.evaluation.memory import load
    from seeddelta.evaluation.sweep import UnitMeasure, make_units, parse_kinds, stack_units, sweep_units
    from seeddelta.gguf_format.imatrix_file import read_imatrix
    from seeddelta.layers import parse_layers
    from seeddelta.outputs import check_paths, write_json_atomic

    apply_threads(args)
    kinds = parse_kinds(args.kinds)
    template = encoding_template(args)
    validate_encoding(template)  # every encoding flag and the imatrix checked before the base is loaded
    if args.imatrix:
        read_imatrix(args.imatrix)
    path = model_path(args)
    _dense_model_only(path)
    base = load(path, use_seeddelta=False, engine=args.engine, n_ctx=args.ctx, threads=args.threads)
    text_path, _, _, windows = windows_from_args(args, base.tokenizer, base.model.config.n_ctx_train)
    units = make_units(parse_layers(args.layers, base.model.config.n_layer, note=warn), kinds, args.per_kind)
    if args.keep:  # the per-unit files must not replace an input either
        names = [f"{u.label}.gguf" for u in units] + [f"stack{n}.gguf" for n in range(1, len(units) + 1)]
        check_paths([("-m", str(path)), ("-f", str(text_path)), ("--imatrix", args.imatrix)],
                    [("--keep", str(Path(args.keep) / name)) for name in names])
    print(f"seeddelta sweep: {path}, {len(units)} unit(s), {windows.n_chunk} window(s) of {windows.n_ctx}, "
          f"{windows.n_scored} scored", file=sys.stderr)
    note = progress_note(args)
    stack: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="seeddelta-sweep-") as tmp:
        out_dir = Path(args.keep) if args.keep else Path(tmp)
        out_dir.mkdir(parents=True, exist_ok=True)
        measure = UnitMeasure(path, base, windows, template, out_dir, keep_files=bool(args.keep), note=note,
                              engine=args.engine, threads=args.threads)
        with progress(args, len(units) * (2 if args.stack else 1), "sweep", "unit") as step:
            rows = sweep_units(measure, units, _each(note, step))
            if args.stack:
                stack = stack_units(measure, rows, _each(note, step))
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


def _dense_model_only(path: Path) -> None:
    """sweep encodes a dense model itself: a file that already holds SeedΔ is refused now, not at the first unit
    (and damaged SeedΔ tensors are named, as every command that runs a model does)."""
    from seeddelta.errors import SeedDeltaError
    from seeddelta.gguf_format.reader import GGUFModel
    from seeddelta.gguf_format.seeddelta_tensors import check_seeddelta_file, seeddelta_entries

    model = GGUFModel(path, what="model")
    check_seeddelta_file(model)
    entries = seeddelta_entries(model)
    if entries:
        raise SeedDeltaError(f"-m {path} already holds SeedΔ tensors ({len(entries)} weight(s)); sweep encodes a "
                             "dense model itself: give it the original model")


def _each(note: Callable[[str], None], step: Callable[..., None]) -> Callable[[str], None]:
    """A finished unit: its line above the progress bar, and one step of the bar."""

    def done(message: str) -> None:
        note(message)
        step()

    return done


def _print(rows: list[dict[str, Any]]) -> None:
    from seeddelta.evaluation.sweep import row_label, safest_first

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
