"""`seeddelta v1 run`: the user's v1 plan on a model — the ffn_down triage (H1 K_down sweep, H2
down-only metric thresholds, H3a delta-norm clamp, H3b partial strip) — each setting measured at
ctx 512/1024/2048 against the original and against the gate-only reference, with the plan's exit
rule as the verdict. Writes v1.json and v1.md to --out; `seeddelta regress --out` on the same
directory shows them as its "v1 mechanisms" section.

Every measurement is cached under --out/cache, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from seeddelta.assets import TINY_MODEL, TINY_VAL_TEXT
from seeddelta.commands.common import (
    Subparsers,
    add_input,
    add_model_arg,
    add_output_dir,
    add_threads_arg,
    chunks_int,
    describe,
    model_path,
    nonnegative_int,
    positive_int,
)
from seeddelta.errors import SeedDeltaError
from seeddelta.outputs import write_json_atomic, write_text_atomic


def register(sub: Subparsers) -> None:
    p = sub.add_parser("v1", help="the v1 plan's experiments (ffn_down triage, mechanisms) with their verdicts",
                       description=describe(__doc__))
    actions = p.add_subparsers(dest="v1_action", metavar="ACTION")
    actions.required = True
    r = actions.add_parser("run", help="measure (cached) and write v1.json, v1.md", description=describe(__doc__))
    add_model_arg(r)
    add_input(r, "-f", "--file", default=None, metavar="TEXT", implied=TINY_VAL_TEXT,
              help="evaluation text (default: the tiny model's validation text; required with another -m)")
    add_input(r, "--calibration", default=None, metavar="TEXT",
              help="imatrix text, never the evaluation text (tiny model default: its training distribution)")
    add_input(r, "--pack", default=None, metavar="FILE", help="greedy pack (default: the tiny model's, none otherwise)")
    add_output_dir(r, "--out", default="runs/regress", metavar="DIR",
                   help="output directory: v1.json, v1.md, cache/ (runs/regress: beside the regress report)")
    r.add_argument("--chunks", type=chunks_int, default=-1, metavar="N", help="windows per context (-1: all)")
    r.add_argument("--unit-chunks", type=chunks_int, default=-1, metavar="N",
                   help="windows at ctx 512 for H2's single units (-1: all)")
    r.add_argument("--ctx", default="512,1024,2048", metavar="LIST", help="contexts of the table (512,1024,2048)")
    r.add_argument("--greedy-limit", type=nonnegative_int, default=10, metavar="N",
                   help="greedy prompts per task (10; 0: all)")
    r.add_argument("--experiments", default=None, metavar="LIST", help="experiments to run (default: all)")
    r.add_argument("--jobs", type=positive_int, default=1, metavar="N", help="worker processes (1)")
    add_threads_arg(r)
    r.add_argument("--no-cache", action="store_true", help="measure everything again (the cache is not read)")
    s = actions.add_parser("show", help="measure nothing: print v1.md again from the v1.json in --out",
                           description="Re-render v1.md from an existing v1.json (exit 0 even without one).")
    add_output_dir(s, "--out", default="runs/regress", metavar="DIR", help="directory holding v1.json")
    p.set_defaults(handler=run)


def _ints(text: str, flag: str) -> tuple[int, ...]:
    try:
        out = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise SeedDeltaError(f"{flag}: expected integers like 512,1024,2048, got {text!r}") from None
    if not out or any(x < 8 for x in out):
        raise SeedDeltaError(f"{flag}: every context must be >= 8, got {text!r}")
    return out


def show(out: Path) -> int:
    import json

    from seeddelta.v1.report import markdown

    path = out / "v1.json"
    if not path.is_file():
        print(f"no v1 results in {out}/ yet: `seeddelta v1 run --out {out}` writes them")
        return 0
    text = markdown(json.loads(path.read_text(encoding="utf-8")))
    write_text_atomic(out / "v1.md", text + "\n")
    print(text)
    return 0


def run(args: argparse.Namespace) -> int:
    from seeddelta.v1 import EXPERIMENTS

    if args.v1_action == "show":
        return show(Path(args.out))
    from seeddelta.v1.report import markdown
    from seeddelta.v1.run import V1Settings, run_v1

    model = model_path(args)
    if not model.is_file():
        raise SeedDeltaError(f"model not found: {model}")
    if args.file is None and model.resolve() != TINY_MODEL.resolve():
        raise SeedDeltaError("-f TEXT (the evaluation text) is required with a model other than the tiny one")
    for flag, path in (("-f", args.file), ("--calibration", args.calibration), ("--pack", args.pack)):
        if path is not None and not Path(path).is_file():
            raise SeedDeltaError(f"{flag}: file not found: {path}")
    names = tuple(x.strip() for x in (args.experiments or ",".join(EXPERIMENTS)).split(",") if x.strip())
    bad = [x for x in names if x not in EXPERIMENTS] or ([] if names else [args.experiments])
    if bad:
        raise SeedDeltaError(f"--experiments: unknown experiment {bad[0]!r} (expected {', '.join(EXPERIMENTS)})")
    settings = V1Settings(
        model=model, text=Path(args.file) if args.file else TINY_VAL_TEXT, out=Path(args.out),
        calibration=Path(args.calibration) if args.calibration else None, pack=Path(args.pack) if args.pack else None,
        chunks=max(args.chunks, -1), unit_chunks=max(args.unit_chunks, -1), ctxs=_ints(args.ctx, "--ctx"),
        greedy_limit=args.greedy_limit, experiments=names, jobs=args.jobs, threads=args.threads,
        use_cache=not args.no_cache)
    doc = run_v1(settings, progress=lambda m: print(m, file=sys.stderr, flush=True))
    write_json_atomic(settings.out / "v1.json", doc)
    text = markdown(doc)
    write_text_atomic(settings.out / "v1.md", text + "\n")
    print(text)
    return 0
