"""`seeddelta imatrix`: FFN input statistics (Σx², counts) in llama-imatrix's GGUF format.

Inputs of every ffn_gate, ffn_up (the ffn_norm output) and ffn_down (silu(gate)·up), over
llama-perplexity's windows; weight names blk.N.ffn_*.weight.
"""

from __future__ import annotations

import argparse
import sys
import time

from seeddelta.evaluation import scoring as ev


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("imatrix", help="FFN input statistics in llama-imatrix's GGUF format",
                       description=__doc__.split("\n")[0] if __doc__ else None)
    ev.add_model_arg(p)
    p.add_argument("-o", "--output", required=True, metavar="OUT.gguf", help="imatrix GGUF to write")
    ev.add_text_args(p, "UTF-8 calibration text")
    ev.add_runtime_args(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from seeddelta.gguf_format.imatrix_file import write_imatrix

    ev.apply_threads(args)
    model_path = args.model or ev.default_model()
    loaded = ev.load_from_args(args, model_path)
    text_path, _, _, windows = ev.text_windows(args, loaded.tokenizer)
    t0 = time.perf_counter()
    sums, counts = ev.collect_imatrix(loaded.model, windows)
    seconds = time.perf_counter() - t0
    write_imatrix(args.output, sums, counts, [str(text_path)], windows.n_chunk, windows.n_ctx)
    print(f"seeddelta imatrix: {len(sums)} weights, {windows.n_chunk} chunk(s) of {windows.n_ctx} tokens "
          f"({windows.n_chunk * windows.n_ctx / max(seconds, 1e-9):.1f} tok/s) -> {args.output}", file=sys.stderr)
    return 0
