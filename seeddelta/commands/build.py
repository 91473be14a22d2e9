"""Compress the FFN weights of a llama GGUF into SeedΔ tensors (a GGUF and optionally report.json).

The counterpart of the original's `llama-seeddelta-build`, with its flags and defaults
(spec-builder-runtime §11.1)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from seeddelta.builder.pipeline import BuildOptions, run_build, size_warnings, summary_line


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "build", help="encode FFN weights of a GGUF into SeedΔ tensors",
        description=__doc__.split("\n")[0] if __doc__ else None,
    )
    p.add_argument("-i", "--input", required=True, metavar="FILE", help="input GGUF")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="output GGUF (never the input)")
    p.add_argument("--layers", default=None, metavar="A-B|LIST",
                   help="layers to encode: A-B (inclusive) or a list like 3,5,8-10 (default: all)")
    add_encoding_args(p)
    p.add_argument("--strip-dense", action="store_true", help="drop the dense weight of every encoded tensor")
    p.add_argument("--policy", default=None, metavar="FILE", help="policy JSON (not implemented yet)")
    p.add_argument("--policy-strict", action="store_true", help="unknown policy keys are errors")
    p.add_argument("--eval-cols", type=int, default=0, metavar="N",
                   help="output rows sampled for the metrics; >= n_out: every row (0: no metrics)")
    p.add_argument("--eval-x", type=int, default=0, metavar="N", help="random inputs for functional metrics (0)")
    p.add_argument("--report-json", default=None, metavar="PATH", help="write report.json")
    p.add_argument("--deterministic-report", action="store_true",
                   help="leave the wall-clock `timing` object out of the report (byte-identical reports)")
    p.add_argument("--overwrite-existing", action="store_true",
                   help="re-encode weights that already have SeedΔ tensors (they are replaced)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    p.set_defaults(handler=run)


def add_encoding_args(p: argparse.ArgumentParser) -> None:
    """How each weight is encoded: the flags `build` and `sweep` share."""
    p.add_argument("--scheme", choices=("coo", "block"), default="coo", help="residual encoding (default coo)")
    p.add_argument("--block", type=int, default=32, metavar="N", help="block size for scheme block, 1..4096 (32)")
    p.add_argument("--K", type=int, default=32, metavar="N", help="residual budget per output row (32)")
    p.add_argument("--K-gate", dest="K_gate", type=int, default=-1, metavar="N", help="budget for ffn_gate (-1: --K)")
    p.add_argument("--K-up", dest="K_up", type=int, default=-1, metavar="N", help="budget for ffn_up (-1: --K)")
    p.add_argument("--K-down", dest="K_down", type=int, default=-1, metavar="N", help="budget for ffn_down (-1: --K)")
    p.add_argument("--idx-type", choices=("i16", "i32"), default="i16", help="index dtype (i16; i32 automatically "
                   "with a warning when n_in > 32768)")
    p.add_argument("--val-type", choices=("f16", "f32"), default="f16", help="residual value dtype (f16)")
    p.add_argument("--row-scale", action=argparse.BooleanOptionalAction, default=False,
                   help="write the least-squares per-row scale d_row_scale (off)")
    p.add_argument("--imatrix", default=None, metavar="FILE", help="importance matrix (llama-imatrix GGUF or legacy)")
    p.add_argument("--imatrix-eps", type=float, default=1e-8, metavar="F", help="floor before the power (1e-8)")
    p.add_argument("--imatrix-power", type=float, default=1.0, metavar="F", help="scale = imat^(power/2) (1.0)")
    p.add_argument("--base", action="store_true", help="fit and write the XOR-circulant base W0")
    p.add_argument("--base-max-samples", type=int, default=2048, metavar="N",
                   help="rows sampled per block for the base fit, <= 0: all (2048)")
    p.add_argument("--base-perm-trials", type=int, default=1, metavar="N",
                   help="permutation trials per block: identity + N-1 random (1)")
    p.add_argument("--seed", type=int, default=1234, metavar="N", help="seed (1234)")
    p.add_argument("--delta-norm-clamp-down", type=float, default=0.0, metavar="F",
                   help="clamp ||Δ|| of ffn_down to F·||W||_F (0: off)")
    p.add_argument("-t", "--threads", type=int, default=0, metavar="N", help="worker threads (0: one per CPU)")


ENCODING_FIELDS = ("scheme", "block", "K", "K_gate", "K_up", "K_down", "idx_type", "val_type", "row_scale", "imatrix",
                   "imatrix_eps", "imatrix_power", "base", "base_max_samples", "base_perm_trials", "seed",
                   "delta_norm_clamp_down", "threads")


def encoding_options(args: argparse.Namespace) -> dict[str, Any]:
    """BuildOptions fields set by `add_encoding_args`."""
    return {name: getattr(args, name) for name in ENCODING_FIELDS}


def run(args: argparse.Namespace) -> int:
    opts = BuildOptions(
        input=args.input, output=args.output, layers=args.layers, strip_dense=args.strip_dense, policy=args.policy,
        policy_strict=args.policy_strict, eval_cols=args.eval_cols, eval_x=args.eval_x,
        report_json=args.report_json, overwrite_existing=args.overwrite_existing,
        deterministic_report=args.deterministic_report, progress=not args.quiet, **encoding_options(args),
    )
    result = run_build(opts)
    for message in size_warnings(result):
        print(f"warning: {message}", file=sys.stderr)
    print(summary_line(result, opts), file=sys.stdout)
    return 0
