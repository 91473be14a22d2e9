"""`seeddelta ppl`: perplexity with llama-perplexity's method, PPL ± standard error.

Windows of n_ctx tokens, BOS first, second half scored; the JSON adds throughput and resident memory.
"""

from __future__ import annotations

import argparse
import sys

from seeddelta.commands.common import (
    Subparsers,
    add_model_arg,
    add_runtime_args,
    add_text_args,
    apply_threads,
    chunk_printer,
    describe,
    load_from_args,
    model_path,
    windows_from_args,
)
from seeddelta.evaluation.memory import model_info
from seeddelta.evaluation.scoring import decode_speed, model_logits, perplexity
from seeddelta.outputs import write_json_atomic


def register(sub: Subparsers) -> None:
    p = sub.add_parser("ppl", help="perplexity of a GGUF model on a text (llama-perplexity's method)",
                       description=describe(__doc__))
    add_model_arg(p)
    add_text_args(p)
    p.add_argument("--json", default=None, metavar="PATH", help="write the result as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="no per-window running estimate")
    add_runtime_args(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    apply_threads(args)
    path = model_path(args)
    loaded = load_from_args(args, path)
    text_path, _, _, windows = windows_from_args(args, loaded.tokenizer)
    m = loaded.model
    print(f"seeddelta ppl: {path}: {m.n_seeddelta} SeedΔ projection(s) of {len(m.projections())}"
          f"{' (' + m.metadata['mode'] + ')' if m.n_seeddelta else ''}; {windows.n_text_tokens} tokens, "
          f"{windows.n_chunk} window(s) of {windows.n_ctx}, {windows.n_scored} scored", file=sys.stderr)
    res = perplexity(model_logits(m), windows, None if args.quiet else chunk_printer())
    if not args.quiet:
        print(file=sys.stderr)
    speed = decode_speed(m, windows.inputs[0][: min(16, windows.n_ctx)].tolist(), 16)
    print(f"Final estimate: PPL = {res.ppl:.4f} +/- {res.se:.5f}")
    if m.nonfinite_outputs():
        print(f"warning: {m.nonfinite_outputs()} non-finite SeedΔ output value(s) were replaced by 0", file=sys.stderr)
    if args.json:
        write_json_atomic(args.json, {
            "ppl": res.ppl, "se": res.se, "mean_nll": float(res.nll.mean()),
            "n_tokens_scored": int(res.nll.size), "chunks": res.n_chunk, "ctx": res.n_ctx,
            "text": str(text_path), "text_tokens": windows.n_text_tokens,
            "model": model_info(loaded),
            "throughput": {"prompt_tok_per_s": res.prompt_tok_per_s, "prompt_tokens": res.tokens_processed,
                           "prompt_seconds": res.seconds, "decode_tok_per_s": speed["decode_tok_per_s"],
                           "decode_tokens": speed["decode_tokens"]},
            "nonfinite_outputs": m.nonfinite_outputs(),
            "method": "llama-perplexity: windows of n_ctx, BOS first (when the vocab adds BOS), second half scored; "
                      "PPL = exp(mean NLL), se = PPL*sqrt((E[NLL^2]-E[NLL]^2)/(N-1))",
        })
    return 0
