"""`seeddelta kld`: KL(base ‖ model) on llama-perplexity's windows, same-top-p, Δp and paired ΔNLL,
and where the difference enters: the hidden state's drift after every block.

KL is exact in float64 over the full vocabulary for every scored token.
"""

from __future__ import annotations

import argparse
import contextlib
import sys

from seeddelta.commands.common import (
    Subparsers,
    add_input,
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
from seeddelta.errors import SeedDeltaError


def register(sub: Subparsers) -> None:
    p = sub.add_parser("kld", help="KL divergence of a model to a base model on a text",
                       description=describe(__doc__))
    add_input(p, "--base", required=True, metavar="FILE", help="base GGUF (the reference distribution p)")
    add_model_arg(p, "candidate GGUF")
    add_text_args(p)
    add_output(p, "--json", default=None, metavar="PATH", help="write the result as JSON")
    add_runtime_args(p)
    p.add_argument("--base-seeddelta", action="store_true",
                   help="let the base use its own SeedΔ tensors too (default: the base runs dense)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from seeddelta.evaluation.drift import LayerDrift
    from seeddelta.evaluation.memory import model_info
    from seeddelta.evaluation.scoring import kl_divergence, model_logits
    from seeddelta.evaluation.windows import tokenize_text
    from seeddelta.outputs import write_json_atomic

    apply_threads(args)
    path = model_path(args)
    cand = load_from_args(args, path)  # the candidate first: a damaged file fails before the base is loaded
    base = load_from_args(args, args.base, use_seeddelta=bool(args.base_seeddelta))
    if base.model.config.n_vocab != cand.model.config.n_vocab:
        raise SeedDeltaError(f"vocabularies differ: base {args.base} has {base.model.config.n_vocab} tokens, "
                             f"model {path} has {cand.model.config.n_vocab}")
    text_path, text, tokens, windows = windows_from_args(args, base.tokenizer,
                                                         min(base.model.config.n_ctx_train, cand.model.config.n_ctx_train))
    if tokenize_text(cand.tokenizer, text) != tokens:
        raise SeedDeltaError(f"base {args.base} and model {path} tokenize {text_path} differently")
    print(f"seeddelta kld: base {args.base} ({base.model.n_seeddelta} SeedΔ), model {path} "
          f"({cand.model.n_seeddelta} SeedΔ of {len(cand.model.projections())}); {windows.n_chunk} window(s) "
          f"of {windows.n_ctx}, {windows.n_scored} scored", file=sys.stderr)
    drift = LayerDrift.of(base.model, cand.model)
    with drift if drift is not None else contextlib.nullcontext():
        with progress(args, windows.n_chunk, "KL divergence", "window") as step:
            res = kl_divergence(model_logits(base.model), model_logits(cand.model), windows, lambda i: step())
    s = res.summary()
    s.update(conditional_delta(cand.model))
    k, st, dp, dn = s["kld"], s["same_top_p"], s["delta_p"], s["delta_nll"]
    print(f"Mean    KLD: {k['mean']:10.6f} ± {k['se']:.6f}")
    print(f"99.0%   KLD: {k['p99']:10.6f}")
    print(f"Maximum KLD: {k['max']:10.6f}")
    print(f"Same top p: {100 * st['mean']:6.3f} ± {100 * st['se']:.3f} %")
    print(f"Mean    Δp: {100 * dp['mean']:6.3f} ± {100 * dp['se']:.3f} %   RMS Δp: {100 * dp['rms']:6.3f} ± {100 * dp['rms_se']:.3f} %")
    print(f"Mean ΔNLL (paired, ln PPL ratio): {dn['mean']:+.6f} ± {dn['se']:.6f}")
    print(f"PPL base: {s['ppl_base']['ppl']:.4f} ± {s['ppl_base']['se']:.4f}   "
          f"PPL model: {s['ppl_model']['ppl']:.4f} ± {s['ppl_model']['se']:.4f}")
    if drift is not None:
        s["layer_drift"] = drift.summary()
        print("Hidden state after each block, model vs base, per token:")
        print(f"  {'block':<8}{'rel L2 mean':>12}{'rel L2 p95':>12}{'cos mean':>10}{'norm ratio':>12}")
        for row in s["layer_drift"]:
            print(f"  blk.{row['layer']:<4}{row['rel_l2_mean']:12.5f}{row['rel_l2_p95']:12.5f}{row['cos_mean']:10.5f}"
                  f"{row['norm_ratio_mean']:12.4f}")
    if args.json:
        s.update({"chunks": res.n_chunk, "ctx": res.n_ctx, "text": str(text_path),
                  "base": model_info(base), "model": model_info(cand),
                  "method": "KL(base||model) = sum_v p_v (log p_v - log q_v), float64 over the full vocabulary, "
                            "llama-perplexity windows (second half scored); layer_drift: residual stream after each "
                            "block, ||h_model - h_base|| / ||h_base|| and cosine per token over every window position"})
        write_json_atomic(args.json, s)
    return 0
