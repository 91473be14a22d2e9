"""`seeddelta imatrix`: FFN input statistics (Σx², counts) in llama-imatrix's GGUF format.

Inputs of every ffn_gate, ffn_up (the ffn_norm output) and ffn_down (silu(gate)·up), over
llama-perplexity's windows; weight names blk.N.ffn_*.weight.
"""

from __future__ import annotations

import argparse
import sys
import time

from seeddelta.commands.common import (
    Subparsers,
    add_model_arg,
    add_output,
    add_runtime_args,
    add_text_args,
    apply_threads,
    describe,
    load_from_args,
    model_path,
    progress,
    windows_from_args,
)


def register(sub: Subparsers) -> None:
    p = sub.add_parser("imatrix", help="FFN input statistics in llama-imatrix's GGUF format",
                       description=describe(__doc__))
    add_model_arg(p)
    add_output(p, "-o", "--output", required=True, metavar="OUT.gguf", help="imatrix GGUF to write")
    add_output(p, "--xtx", default=None, metavar="XTX.gguf",
               help="also write Σ x xᵀ per FFN input (for build --variant sdq --refit full); n_in² floats per input")
    add_text_args(p, "UTF-8 calibration text")
    add_runtime_args(p, engines=False)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from seeddelta.evaluation.activations import collect_statistics
    from seeddelta.gguf_format.imatrix_file import write_imatrix
    from seeddelta.gguf_format.xtx_file import write_xtx

    apply_threads(args)
    path = model_path(args)
    loaded = load_from_args(args, path)
    text_path, _, _, windows = windows_from_args(args, loaded.tokenizer, loaded.model.config.n_ctx_train)
    t0 = time.perf_counter()
    with progress(args, windows.n_chunk, "imatrix", "window") as step:
        sums, counts, xsums, xcounts = collect_statistics(loaded.model, windows, step, xtx=args.xtx is not None)
    seconds = time.perf_counter() - t0
    write_imatrix(args.output, sums, counts, [str(text_path)], windows.n_chunk, windows.n_ctx)
    if args.xtx is not None:
        write_xtx(args.xtx, xsums, xcounts, [str(text_path)], windows.n_chunk, windows.n_ctx)
    print(f"seeddelta imatrix: {len(sums)} weights, {windows.n_chunk} chunk(s) of {windows.n_ctx} tokens "
          f"({windows.n_chunk * windows.n_ctx / max(seconds, 1e-9):.1f} tok/s) -> {args.output}", file=sys.stderr)
    return 0
