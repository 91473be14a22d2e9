"""`seeddelta toy`: harness A — synthetic matrices whose encoding is checked against independent oracles.

Without --pattern the whole grid runs (312 cases; every case must match its oracle); with --pattern one
case with the original toy's flags. Exit status 1 if any case fails."""

from __future__ import annotations

import argparse
import sys

from seeddelta.commands.common import (
    Subparsers,
    add_output,
    add_quiet_arg,
    add_threads_arg,
    apply_threads,
    describe,
    positive_int,
    progress,
)
from seeddelta.errors import SeedDeltaError
from seeddelta.harness_a import BASES, PATTERNS


def register(sub: Subparsers) -> None:
    p = sub.add_parser("toy", help="harness A: synthetic matrices checked against independent oracles",
                       description=describe(__doc__))
    p.add_argument("--pattern", default=None, metavar="NAME",
                   help=f"run one case of this pattern: {', '.join(PATTERNS)} (default: the whole grid)")
    p.add_argument("--n-in", type=positive_int, default=64, metavar="N", help="inputs (columns) of the case (64)")
    p.add_argument("--n-out", type=positive_int, default=64, metavar="N", help="outputs (rows) of the case (64)")
    p.add_argument("--K", type=positive_int, default=1, metavar="N", help="residual budget per output row (1)")
    p.add_argument("--rank", type=positive_int, default=4, metavar="N", help="rank of the lowrank pattern (4)")
    p.add_argument("--block", type=positive_int, default=8, metavar="N", help="block size of the block pattern (8)")
    p.add_argument("--base", default="none", metavar="KIND", help=f"base kind: {', '.join(BASES)} (none)")
    p.add_argument("--base-rank", type=positive_int, default=4, metavar="N", help="rank of the lowrank base (4)")
    p.add_argument("--scheme", default="coo", choices=("coo", "block"), help="residual encoding (coo)")
    p.add_argument("--scheme-block", type=positive_int, default=8, metavar="N",
                   help="block size of the block residual scheme (8)")
    p.add_argument("--val-type", default="f32", choices=("f16", "f32"), help="stored value type (f32)")
    p.add_argument("--eval-cols", type=int, default=0, metavar="N",
                   help="accepted for compatibility with the original toy; every row is always compared")
    p.add_argument("--eval-x", type=positive_int, default=8, metavar="N",
                   help="random inputs for the fast-path vs closed-form check (8)")
    p.add_argument("--seed", type=int, default=1, metavar="N", help="seed of the random parts (1)")
    add_output(p, "--json", metavar="PATH", help="write the JSON report here")
    add_threads_arg(p)
    add_quiet_arg(p)
    p.set_defaults(handler=run)


def _print_table(results: list) -> None:
    width = max(len(r.id) for r in results)
    print(f"{'case':<{width}}  {'rel_l2 meas':>11}  {'rel_l2 exp':>11}  {'cos meas':>9}  {'cos exp':>9}  {'deviation':>10}  verdict")
    for r in results:
        verdict = "PASS" if r.passed else "FAIL"
        print(
            f"{r.id:<{width}}  {r.measured['rel_l2_mean']:>11.6f}  {r.expected['rel_l2_mean']:>11.6f}  "
            f"{r.measured['cos_mean']:>9.6f}  {r.expected['cos_mean']:>9.6f}  {r.deviation:>10.2e}  {verdict}"
        )


def run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from seeddelta.harness_a.grid import ToyCase, case_bytes, default_grid, report_dict, run_case
    from seeddelta.outputs import write_json_atomic
    from seeddelta.resources import available_memory

    if args.pattern is None:
        cases = [replace(c, seed=args.seed) for c in default_grid(args.seed)]
    else:
        cases = [ToyCase(
            pattern=args.pattern, n_in=args.n_in, n_out=args.n_out, K=args.K, base=args.base, scheme=args.scheme,
            val_type=args.val_type, rank=args.rank, base_rank=args.base_rank, block=args.block,
            scheme_block=args.scheme_block, seed=args.seed,
        )]
        cases[0].validate()
        need, free = case_bytes(cases[0]), available_memory()
        if free is not None and need > free:
            raise SeedDeltaError(f"a {args.n_out} x {args.n_in} case needs about {need / 2**30:.1f} GiB of memory and "
                                 f"{free / 2**30:.1f} GiB are available; choose smaller --n-in/--n-out")
    apply_threads(args)
    with progress(args, len(cases), "harness A", "case") as step:
        results = []
        for case in cases:
            results.append(run_case(case, eval_x=args.eval_x))
            step()
    _print_table(results)
    report = report_dict(results)
    n_fail = report["n_cases"] - report["n_passed"]
    print(f"{report['n_passed']} passed, {n_fail} failed")
    if args.json:
        write_json_atomic(args.json, report)
    if n_fail:
        print(f"seeddelta toy: {n_fail} case(s) did not match their oracle", file=sys.stderr)
        return 1
    return 0
