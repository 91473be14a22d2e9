"""`seeddelta replay-pack`: the v1 plan's replay pack (mechanism 6) — the N text windows the original
model is most fragile on (smallest mean margin between its top-1 and top-2 logits over the scored
positions), stored with their tokens. `seeddelta scan --replay PACK` measures every unit on them too
(`replay_impact`, `retention_replay`).

With --pack FILE the greedy pack's prompts the original answers with the smallest mean top-1/top-2
margin (over the decisions of its own greedy answer) are added too: --pack-n of them, among the first
--pack-limit per task, each as a window of the same size ending with the prompt and that answer, cut
from the pack's prompts and answers in pack order (docs/evaluation.md)."""

from __future__ import annotations

import argparse
from typing import Any

from seeddelta.commands.common import (
    Subparsers,
    add_input,
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
    g = p.add_argument_group("greedy-pack prompts (optional)")
    add_input(p, "--pack", group=g, default=None, metavar="FILE",
              help="also add the prompts of this greedy pack (JSONL) the original answers with the smallest margin")
    g.add_argument("--pack-n", type=positive_int, default=4, metavar="N", help="prompts added (4)")
    g.add_argument("--pack-limit", type=int, default=10, metavar="N", help="prompts per task considered (10; 0: all)")
    add_output(p, "-o", "--output", required=True, metavar="PACK.json", help="the replay pack (JSON)")
    add_threads_arg(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from seeddelta.assets import sha256_file
    from seeddelta.errors import SeedDeltaError
    from seeddelta.evaluation.greedy import load_pack
    from seeddelta.evaluation.memory import load
    from seeddelta.evaluation.pack import DEFAULT_MAX_NEW, limit_per_task
    from seeddelta.evaluation.replay import make_pack, prompt_margins, prompt_windows
    from seeddelta.evaluation.scoring import model_logits
    from seeddelta.evaluation.windows import window_bos
    from seeddelta.outputs import write_json_atomic

    apply_threads(args)
    out = Path(args.output)
    if not out.resolve().parent.is_dir():
        raise SeedDeltaError(f"-o: directory does not exist: {out.resolve().parent}")
    items = limit_per_task(load_pack(args.pack), args.pack_limit) if args.pack is not None else None
    path = model_path(args)
    base = load(path, use_seeddelta=False)
    tw = windows_from_args(args, base.tokenizer)
    prompts: dict[str, Any] | None = None
    if items is not None:
        margins = prompt_margins(base.model, base.tokenizer, items, DEFAULT_MAX_NEW)
        prompts = {"pack": str(args.pack), "pack_sha256": sha256_file(args.pack), "considered": len(items),
                   "margins": {m["id"]: m["mean_margin"] for m in margins},
                   "windows": prompt_windows(margins, args.pack_n, tw.windows.n_ctx, window_bos(base.tokenizer))}
    doc = make_pack(model_logits(base.model), tw.windows, args.n, model=str(path), model_sha256=sha256_file(path),
                    text=str(tw.path), text_sha256=sha256_file(tw.path), prompts=prompts)
    write_json_atomic(out, doc, "replay pack")
    print(f"replay pack: {args.n} of {tw.windows.n_chunk} window(s) of {tw.windows.n_ctx} tokens, mean top-1/top-2 "
          f"margin ≤ {doc['cut_margin']:.4f} → {out}")
    if prompts is not None:
        worst = prompts["windows"][-1]["mean_margin"]
        print(f"  + {len(prompts['windows'])} of {len(items or [])} greedy prompt(s) of {args.pack}, mean answer margin "
              f"≤ {worst:.4f}: {', '.join(w['id'] for w in prompts['windows'])}")
    return 0
