"""`seeddelta replay-pack`: the v1 plan's replay pack (mechanism 6) — the N text windows the original
model is most fragile on (smallest mean margin between its top-1 and top-2 logits over the scored
positions), stored with their tokens. `seeddelta scan --replay PACK` measures every unit on them too
(`replay_impact`, `retention_replay`)."""

from __future__ import annotations

import argparse

from seeddelta.commands.common import (
    Subparsers,
    add_model_arg,
    add_output,
    add_text_args,
    add_threads_arg,
    apply_threads,
    describe,
    model_path,
    positive_int,
    windows_from_args,
)


def register(sub: Subparsers) -> None:
    p = sub.add_parser("replay-pack", help="the windows the original model is most fragile on (scan --replay)",
                       description=describe(__doc__))
    add_model_arg(p)
    add_text_args(p, "UTF-8 text the windows are chosen from (not the evaluation text)")
    ctx = p._option_string_actions["-c"]  # short windows: many candidates from a small text
    ctx.default, ctx.help = 128, "window size n_ctx in tokens of the candidates (128)"
    p.add_argument("--n", type=positive_int, default=8, metavar="N", help="windows in the pack (8)")
    add_output(p, "-o", "--output", required=True, metavar="PACK.json", help="the replay pack (JSON)")
    add_threads_arg(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from seeddelta.assets import sha256_file
    from seeddelta.errors import SeedDeltaError
    from seeddelta.evaluation.memory import load
    from seeddelta.evaluation.replay import make_pack
    from seeddelta.evaluation.scoring import model_logits
    from seeddelta.outputs import write_json_atomic

    apply_threads(args)
    out = Path(args.output)
    if not out.resolve().parent.is_dir():
        raise SeedDeltaError(f"-o: directory does not exist: {out.resolve().parent}")
    path = model_path(args)
    base = load(path, use_seeddelta=False)
    tw = windows_from_args(args, base.tokenizer)
    doc = make_pack(model_logits(base.model), tw.windows, args.n, model=str(path), model_sha256=sha256_file(path),
                    text=str(tw.path), text_sha256=sha256_file(tw.path))
    write_json_atomic(out, doc, "replay pack")
    print(f"replay pack: {args.n} of {tw.windows.n_chunk} window(s) of {tw.windows.n_ctx} tokens, mean top-1/top-2 "
          f"margin ≤ {doc['cut_margin']:.4f} → {out}")
    return 0
