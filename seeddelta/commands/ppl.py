"""`seeddelta ppl`: perplexity with llama-perplexity's method, PPL ± standard error.

Windows of n_ctx tokens, BOS first, second half scored; the JSON adds throughput and resident memory.
"""

from __future__ import annotations

import argparse
import sys

from seeddelta.commands.common import (
    Subparsers,
    add_model_arg,
    add_output,
    add_runtime_args,
    add_text_args,
    apply_threads,
    conditional_delta,
    describe,
    load_from_args,
    model_path,
    progress,
    windows_from_args,
)


def register(sub: Subparsers) -> None:
    p = sub.add_parser("ppl", help="perplexity of a GGUF model on a text (llama-perplexity's method)",
                       description=describe(__doc__))
    add_model_arg(p)
    add_text_args(p)
    add_output(p, "--json", default=None, metavar="PATH", help="write the result as JSON")
    add_runtime_args(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import math

    from seeddelta.evaluation.memory import model_info
    from seeddelta.evaluation.scoring import decode_speed, model_logits, perplexity
    from seeddelta.outputs import write_json_atomic

    apply_threads(args)
    path = model_path(args)
    loaded = load_from_args(args, path)
    m = loaded.model
    text_path, _, _, windows = windows_from_args(args, loaded.tokenizer, m.config.n_ctx_train)
    print(f"seeddelta ppl: {path}: {m.n_seeddelta} SeedΔ projection(s) of {len(m.projections())}"
          f"{' (' + m.metadata['mode'] + ')' if m.n_seeddelta else ''}; {windows.n_text_tokens} tokens, "
          f"{windows.n_chunk} window(s) of {windows.n_ctx}, {windows.n_scored} scored", file=sys.stderr)
    with progress(args, windows.n_chunk, "perplexity", "window") as step:
        res = perplexity(model_logits(m), windows, lambda i, ppl: step(1, f"PPL {ppl:.4f}"))
    saved = conditional_delta(m)  # over the scored windows, before the decode-speed probe runs
    speed = decode_speed(m, windows.inputs[0][: min(16, windows.n_ctx)].tolist(), 16)
    print(f"Final estimate: PPL = {res.ppl:.4f} +/- {res.se:.5f}")
    if m.nonfinite_outputs():
        print(f"warning: {m.nonfinite_outputs()} non-finite SeedΔ output value(s) were replaced by 0", file=sys.stderr)
    if not math.isfinite(res.ppl):
        print("warning: the perplexity is not finite: the model's outputs overflow on this text", file=sys.stderr)
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
            **saved,
            "method": "llama-perplexity: windows of n_ctx, BOS first (when the vocab adds BOS), second half scored; "
                      "PPL = exp(mean NLL), se = PPL*sqrt((E[NLL^2]-E[NLL]^2)/(N-1))",
        })
    return 0
