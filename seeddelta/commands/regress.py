"""`seeddelta regress`: the user's plan B1–B5, the v1 success criteria per preset, and the equal-bytes
comparison on a model, written as report.json, report.md and PNG plots; exit status 1 when a preset
misses a criterion it declares or a figure worsens beyond the measured spread.

Every measurement is cached under --out (keyed by the model's and texts' sha256, the settings and
the code), so an interrupted run resumes where it stopped and a finished one is re-read in seconds.
"""

from __future__ import annotations

import argparse
import sys
from fractions import Fraction
from pathlib import Path

from seeddelta.assets import TINY_MODEL, TINY_VAL_TEXT
from seeddelta.commands.common import (
    Subparsers,
    add_input,
    add_jobs_args,
    add_model_arg,
    add_output_dir,
    add_threads_arg,
    chunks_int,
    describe,
    layers_arg,
    model_path,
    nonnegative_int,
    pool_from_args,
)
from seeddelta.errors import SeedDeltaError
from seeddelta.outputs import write_json_atomic, write_text_atomic


def register(sub: Subparsers) -> None:
    from seeddelta.regress import STEPS

    p = sub.add_parser("regress", help="B1-B5, the v1 criteria per preset and the equal-bytes comparison: a report",
                       description=describe(__doc__))
    add_model_arg(p)
    add_input(p, "-f", "--file", default=None, metavar="TEXT", implied=TINY_VAL_TEXT,
              help="evaluation text (default: the tiny model's validation text; required with another -m)")
    add_input(p, "--calibration", default=None, metavar="TEXT",
              help="imatrix text, never the evaluation text (default for the tiny model: its training "
                   "distribution; otherwise none: no imatrix)")
    add_input(p, "--pack", default=None, metavar="FILE",
              help="greedy pack (default: the tiny model's held-out pack for the tiny model, none otherwise)")
    add_output_dir(p, "--out", default="runs/regress", metavar="DIR",
                   help="output directory: report.json, report.md, plots, cache/ (runs/regress)")
    p.add_argument("--chunks", type=chunks_int, default=-1, metavar="N",
                   help="windows per context for B1 and the presets (default -1: all)")
    p.add_argument("--unit-chunks", type=chunks_int, default=8, metavar="N",
                   help="windows at ctx 512 for B2-B4 and the equal-bytes comparison (8)")
    p.add_argument("--layers", type=layers_arg, default=None, metavar="A-B|LIST",
                   help="layers for B2-B4, e.g. 0-3 or 1,5,9 (default: all)")
    p.add_argument("--densities", default="1/6,1/3", metavar="LIST",
                   help="B2 budgets as fractions of n_in per kind (1/6,1/3; the largest is the default for B3/B4)")
    p.add_argument("--greedy-limit", type=nonnegative_int, default=0, metavar="N",
                   help="greedy prompts per task for B1 and the presets (0: all)")
    p.add_argument("--stack-greedy-limit", type=nonnegative_int, default=20, metavar="N",
                   help="greedy prompts per task at every B4 step (20; 0: all)")
    p.add_argument("--eq-densities", default="1/16,1/8,1/4,1/2", metavar="LIST",
                   help="equal bytes: densities of the SeedΔ and pruning points (1/16,1/8,1/4,1/2)")
    p.add_argument("--quant-types", default=None, metavar="LIST",
                   help="equal bytes: llama.cpp file types, NAME or NAME+imatrix (default: Q8_0,Q6_K,Q5_K_M,Q4_K_M,"
                        "Q4_0,Q4_K_M+imatrix,IQ4_XS+imatrix; 'none' for no llama.cpp points)")
    p.add_argument("--variants", default=None, metavar="LIST",
                   help="equal bytes: SeedΔ variant points (default: all of evaluation.equal_bytes.VARIANT_POINTS; "
                        "'none' for none)")
    p.add_argument("--steps", default=",".join(STEPS), metavar="LIST", help=f"steps to run ({','.join(STEPS)})")
    p.add_argument("--preset", action="append", default=None, metavar="PRESET",
                   help="a preset file to judge (repeatable; default: the shipped presets made for this model)")
    add_jobs_args(p)
    add_threads_arg(p)
    p.add_argument("--no-cache", action="store_true", help="measure everything again (the cache is not read)")
    p.add_argument("--show", action="store_true",
                   help="measure nothing: print the headline of the report in --out (exit 0 even without one)")
    p.set_defaults(handler=run)


def _densities(text: str, flag: str) -> tuple[Fraction, ...]:
    try:
        out = tuple(Fraction(x.strip()) for x in text.split(",") if x.strip())
    except (ValueError, ZeroDivisionError):
        raise SeedDeltaError(f"{flag}: expected fractions like 1/6,1/3, got {text!r}") from None
    if not out or any(not 0 < d <= 1 for d in out):
        raise SeedDeltaError(f"{flag}: every density must be in (0, 1], got {text!r}")
    return tuple(sorted(set(out)))


def _quant_types(text: str) -> tuple[str, ...]:
    from seeddelta.evaluation.llamacpp_quant import FTYPES

    if text.strip() == "none":
        return ()
    names = tuple(x.strip() for x in text.split(",") if x.strip())
    bad = [n for n in names if n.removesuffix("+imatrix") not in FTYPES]
    if bad or not names:
        raise SeedDeltaError(f"--quant-types: unknown type {bad[0] if bad else text!r} (expected {', '.join(FTYPES)}, "
                             "each optionally +imatrix, or none)")
    return names


def _variants(text: str) -> tuple[str, ...]:
    from seeddelta.evaluation.equal_bytes import VARIANT_POINTS

    if text.strip() == "none":
        return ()
    names = tuple(x.strip() for x in text.split(",") if x.strip())
    bad = [n for n in names if n not in VARIANT_POINTS]
    if bad or not names:
        raise SeedDeltaError(f"--variants: unknown variant point {bad[0] if bad else text!r} (expected "
                             f"{', '.join(VARIANT_POINTS)}, or none)")
    return names


def show(out: Path) -> int:
    """The headline of an existing report (what `make run` prints after the demo)."""
    import json

    from seeddelta.regress.report import headline

    path = out / "report.json"
    if not path.is_file():
        print(f"no regress report in {out}/ yet: `make regress` (or `seeddelta regress --out {out}`) writes it")
        return 0
    report = json.loads(path.read_text(encoding="utf-8"))
    print(f"== the last regress report ({out / 'report.md'}):")
    print("\n".join(headline(report)))
    return 0


def run(args: argparse.Namespace) -> int:
    from seeddelta.regress import STEPS
    from seeddelta.regress.report import headline, markdown, write_plots
    from seeddelta.regress.suite import RegressSettings, run_regress

    if args.show:
        return show(Path(args.out))
    model = model_path(args)
    if not model.is_file():
        raise SeedDeltaError(f"model not found: {model}")
    if args.file is None and model.resolve() != TINY_MODEL.resolve():
        raise SeedDeltaError("-f TEXT (the evaluation text) is required with a model other than the tiny one")
    for flag, path in [("-f", args.file), ("--calibration", args.calibration), ("--pack", args.pack),
                       *(("--preset", x) for x in args.preset or ())]:
        if path is not None and not Path(path).is_file():
            raise SeedDeltaError(f"{flag}: file not found: {path}")
    steps = tuple(s.strip() for s in args.steps.split(",") if s.strip())
    bad = [x for x in steps if x not in STEPS] or ([] if steps else [args.steps])
    if bad:
        raise SeedDeltaError(f"--steps: unknown step {bad[0]!r} (expected {', '.join(STEPS)})")
    quant = None if args.quant_types is None else _quant_types(args.quant_types)
    pool = pool_from_args(args)
    variants = None if args.variants is None else _variants(args.variants)
    settings = RegressSettings(
        model=model, text=Path(args.file) if args.file else TINY_VAL_TEXT, out=Path(args.out),
        calibration=Path(args.calibration) if args.calibration else None, pack=Path(args.pack) if args.pack else None,
        chunks=max(args.chunks, -1), unit_chunks=max(args.unit_chunks, -1), layers=args.layers, densities=_densities(args.densities, "--densities"),
        greedy_limit=args.greedy_limit, stack_greedy_limit=args.stack_greedy_limit,
        eq_densities=_densities(args.eq_densities, "--eq-densities"), quant_types=quant, variants=variants,
        steps=steps,
        presets=tuple(Path(p) for p in args.preset) if args.preset else None, jobs=pool.jobs,
        scheduler=pool.scheduler, threads=args.threads, use_cache=not args.no_cache)
    report = run_regress(settings, progress=lambda m: print(m, file=sys.stderr, flush=True))
    out = settings.out
    status = write_plots(report, out)
    report["plots"] = {name: (why or "written") for name, why in status.items()}
    write_json_atomic(out / "report.json", report)
    write_text_atomic(out / "report.md", markdown(report, status) + "\n")
    print("\n".join(headline(report)))
    print(f"report: {out / 'report.md'} (and report.json, {len(status)} plot(s))")
    return 1 if report["verdict"]["result"] == "FAIL" else 0
