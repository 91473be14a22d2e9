"""`seeddelta toy`: harness A — one synthetic case with the original toy's flags, or the whole grid."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace

from seeddelta.commands.common import Subparsers
from seeddelta.harness_a.grid import BASES, PATTERNS, CaseResult, ToyCase, default_grid, report_dict, run_case
from seeddelta.outputs import write_json_atomic


def register(sub: Subparsers) -> None:
    p = sub.add_parser(
        "toy", help="harness A: synthetic matrices checked against independent oracles",
        description="Without --pattern runs the whole grid (every case must match its oracle); "
        "with --pattern runs one case. Exit status 1 if any case fails.",
    )
    p.add_argument("--pattern", choices=None, help=f"one of {', '.join(PATTERNS)}")
    p.add_argument("--n-in", type=int, default=64)
    p.add_argument("--n-out", type=int, default=64)
    p.add_argument("--K", type=int, default=1, help="residual budget per output row")
    p.add_argument("--rank", type=int, default=4, help="rank of the lowrank pattern")
    p.add_argument("--block", type=int, default=8, help="block size of the block pattern")
    p.add_argument("--base", default="none", help=f"base kind: {', '.join(BASES)}")
    p.add_argument("--base-rank", type=int, default=4, help="rank of the lowrank base")
    p.add_argument("--scheme", default="coo", choices=("coo", "block"))
    p.add_argument("--scheme-block", type=int, default=8, help="block size of the block residual scheme")
    p.add_argument("--val-type", default="f32", choices=("f16", "f32"))
    p.add_argument("--eval-cols", type=int, default=0, help="accepted for compatibility; every row is always compared")
    p.add_argument("--eval-x", type=int, default=8, help="random inputs for the fast-path vs closed-form check")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", metavar="PATH", help="write the JSON report here")
    p.set_defaults(handler=run)


def _print_table(results: list[CaseResult]) -> None:
    width = max(len(r.id) for r in results)
    print(f"{'case':<{width}}  {'rel_l2 meas':>11}  {'rel_l2 exp':>11}  {'cos meas':>9}  {'cos exp':>9}  {'deviation':>10}  verdict")
    for r in results:
        verdict = "PASS" if r.passed else "FAIL"
        print(
            f"{r.id:<{width}}  {r.measured['rel_l2_mean']:>11.6f}  {r.expected['rel_l2_mean']:>11.6f}  "
            f"{r.measured['cos_mean']:>9.6f}  {r.expected['cos_mean']:>9.6f}  {r.deviation:>10.2e}  {verdict}"
        )


def run(args: argparse.Namespace) -> int:
    if args.pattern is None:
        cases = [replace(c, seed=args.seed) for c in default_grid(args.seed)]
    else:
        cases = [ToyCase(
            pattern=args.pattern, n_in=args.n_in, n_out=args.n_out, K=args.K, base=args.base, scheme=args.scheme,
            val_type=args.val_type, rank=args.rank, base_rank=args.base_rank, block=args.block,
            scheme_block=args.scheme_block, seed=args.seed,
        )]
        cases[0].validate()
    if args.eval_x <= 0:
        from seeddelta.errors import SeedDeltaError

        raise SeedDeltaError(f"--eval-x must be a positive integer, got {args.eval_x}")
    results = [run_case(c, eval_x=args.eval_x) for c in cases]
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
