"""Compress the FFN weights of a llama GGUF into SeedΔ tensors (a GGUF and optionally report.json).

The counterpart of the original's `llama-seeddelta-build`, with its flags and defaults
(spec-builder-runtime §11.1)."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from typing import Any

from seeddelta.commands.common import (
    Subparsers,
    add_encoding_args,
    add_input,
    add_output,
    describe,
    encoding_options,
    finite_float,
    layers_arg,
)


def register(sub: Subparsers) -> None:
    p = sub.add_parser(
        "build", help="encode FFN weights of a GGUF into SeedΔ tensors",
        description=describe(__doc__),
    )
    add_input(p, "-i", "--input", required=True, metavar="FILE", help="input GGUF")
    add_output(p, "-o", "--output", required=True, metavar="FILE", help="output GGUF (never the input)")
    p.add_argument("--layers", type=layers_arg, default=None, metavar="A-B|LIST",
                   help="layers to encode: A-B (inclusive) or a list like 3,5,8-10 (default: all)")
    add_encoding_args(p)
    p.add_argument("--strip-dense", action="store_true", help="drop the dense weight of every encoded tensor")
    add_input(p, "--policy", default=None, metavar="FILE",
              help="policy JSON: per layer and tensor enabled, strip, K, gating, autotune (see `seeddelta policy`)")
    p.add_argument("--policy-strict", action="store_true", help="unknown policy keys are errors")
    add_output(p, "--policy-export", default=None, metavar="PATH",
               help="write the canonical policy of this build's decisions (rebuilds the same file)")
    p.add_argument("--stack-cost-cap", type=float, default=float("inf"), metavar="F",
                   help="reject an encoded tensor whose stack cost would take the build's total above F (inf)")
    p.add_argument("--eval-cols", type=int, default=0, metavar="N",
                   help="output rows sampled for the metrics; >= n_out: every row (0: no metrics)")
    p.add_argument("--eval-x", type=int, default=0, metavar="N", help="random inputs for functional metrics (0)")
    add_output(p, "--report-json", default=None, metavar="PATH", help="write report.json")
    p.add_argument("--deterministic-report", action="store_true",
                   help="leave the wall-clock `timing` object out of the report (byte-identical reports)")
    p.add_argument("--overwrite-existing", action="store_true",
                   help="re-encode weights that already have SeedΔ tensors (they are replaced)")
    p.add_argument("--delta-norm-clamp-gate", type=finite_float, default=0.0, metavar="F",
                   help="clamp ||Δ|| of ffn_gate to F·||W||_F (0: off; the v1 plan's homeostatic clamp)")
    p.add_argument("--dense-rows-down", type=finite_float, default=0.0, metavar="F",
                   help="partial strip: keep the share F of ffn_down's rows (those SeedΔ fits worst) dense; "
                        "writes the dense_rows/1 file extension, which the original runtime refuses (0: off)")
    p.add_argument("--delta-regime-gate", default=None, metavar="STAT:MIN:MAX",
                   help="conditional Δ for ffn_gate: Δ only for tokens whose input statistic (rms or max_abs) is in "
                        "[MIN, MAX] (inclusive; an empty bound is open, e.g. rms:0.9:); a bound qP (e.g. rms:q0.1:) "
                        "is each layer's P-quantile of the statistic on --calibration; writes the delta_regime/1 "
                        "file extension, which the original runtime refuses (default: Δ always)")
    add_input(p, "--calibration", default=None, metavar="TEXT",
              help="UTF-8 text whose ffn_gate inputs (on the input model, windows of 512) calibrate the quantile "
                   "bounds of --delta-regime-gate (needed by, and only used with, qP bounds)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from seeddelta.builder.options import BuildOptions, validate_options
    from seeddelta.builder.pipeline import size_warnings, summary_line
    from seeddelta.policy.build import build

    fixed, quantile = _gate_regime(args)
    opts = BuildOptions(
        input=args.input, output=args.output, layers=args.layers, strip_dense=args.strip_dense, policy=args.policy,
        policy_strict=args.policy_strict, policy_export=args.policy_export, stack_cost_cap=args.stack_cost_cap,
        eval_cols=args.eval_cols, eval_x=args.eval_x,
        report_json=args.report_json, overwrite_existing=args.overwrite_existing,
        deterministic_report=args.deterministic_report, progress=not args.quiet,
        delta_norm_clamp_gate=args.delta_norm_clamp_gate, dense_rows_down=args.dense_rows_down,
        delta_regime_gate=fixed,
        **encoding_options(args),
    )
    if quantile is not None:  # the options checked before the calibration pass, which takes a while
        validate_options(opts)
        opts = replace(opts, delta_regime_gate_layers=_calibrate(args, quantile))
    result = build(opts)
    for message in size_warnings(result):
        print(f"warning: {message}", file=sys.stderr)
    print(summary_line(result, opts), file=sys.stdout)
    return 0


def _gate_regime(args: argparse.Namespace) -> tuple[Any, Any]:
    """--delta-regime-gate as (a fixed regime, None) or (None, its quantile bounds); --calibration checked."""
    from seeddelta.errors import SeedDeltaError
    from seeddelta.evaluation.regime_calibration import QuantileRegime, parse_gate_regime

    regime = None if args.delta_regime_gate is None else parse_gate_regime(args.delta_regime_gate, "--delta-regime-gate")
    if isinstance(regime, QuantileRegime):
        if args.calibration is None:
            raise SeedDeltaError(f"--delta-regime-gate {args.delta_regime_gate}: quantile bounds need a calibration "
                                 "text (--calibration TEXT)")
        return None, regime
    if args.calibration is not None:
        raise SeedDeltaError("--calibration is only used by quantile bounds of --delta-regime-gate (e.g. rms:q0.1:); "
                             "drop it or give qP bounds")
    return regime, None


def _calibrate(args: argparse.Namespace, regime: Any) -> Any:
    """Each layer's ffn_gate regime, its quantile bounds calibrated on --calibration (torch threads: -t)."""
    from seeddelta.commands.common import apply_threads
    from seeddelta.evaluation.regime_calibration import calibrated_gate_regimes

    apply_threads(args)
    if not args.quiet:
        print(f"calibrating the ffn_gate regime quantiles {list(regime.quantiles())} on {args.calibration}",
              file=sys.stderr, flush=True)
    return calibrated_gate_regimes(args.input, args.calibration, regime)
