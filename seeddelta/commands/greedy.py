"""`seeddelta greedy`: greedy pack of held-out prompts with known answers, PASS/FAIL.

The model's SeedΔ tensors are in use; per prompt exact match and collapse flags (repetition loop,
empty, no stop).
"""

from __future__ import annotations

import argparse
import sys

from seeddelta.assets import TINY_TEST_PACK
from seeddelta.commands.common import (
    Subparsers,
    add_input,
    add_model_arg,
    add_output,
    add_runtime_args,
    apply_threads,
    describe,
    finite_float,
    load_from_args,
    model_path,
    nonnegative_int,
    positive_int,
    progress,
)
from seeddelta.evaluation.pack import DEFAULT_MAX_NEW, DEFAULT_TOLERANCE, limit_per_task


def register(sub: Subparsers) -> None:
    p = sub.add_parser("greedy", help="greedy pack: exact match and collapse flags, PASS/FAIL",
                       description=describe(__doc__))
    add_model_arg(p)
    add_input(p, "--pack", default=None, metavar="FILE", implied=TINY_TEST_PACK,
              help="pack in the test-pack JSON-lines format: one object per line with string fields id, task, "
                   "prompt, answer (default: the tiny model's test pack)")
    add_input(p, "--base", default=None, metavar="FILE",
              help="base GGUF run dense on the same pack; PASS also needs accuracy >= base - tolerance")
    p.add_argument("--tolerance", type=finite_float, default=DEFAULT_TOLERANCE, metavar="F",
                   help=f"allowed absolute accuracy drop against --base ({DEFAULT_TOLERANCE})")
    p.add_argument("--max-new", type=positive_int, default=DEFAULT_MAX_NEW, metavar="N",
                   help=f"generated tokens per prompt at most ({DEFAULT_MAX_NEW})")
    p.add_argument("--limit", type=nonnegative_int, default=0, metavar="N",
                   help="use only the first N prompts of each task (0: all)")
    add_output(p, "--json", default=None, metavar="PATH", help="write the result as JSON")
    add_runtime_args(p)
    p.set_defaults(handler=run)


def _print(label: str, res: dict) -> None:
    tasks = "  ".join(f"{t}: {v['correct']}/{v['n']} ({100 * v['accuracy']:.1f}%)" for t, v in sorted(res["tasks"].items()))
    print(f"{label}: exact {res['correct']}/{res['n']} ({100 * res['accuracy']:.1f}%), flagged {res['flagged']}  [{tasks}]")


def run(args: argparse.Namespace) -> int:
    from seeddelta.evaluation import greedy as pack
    from seeddelta.evaluation.memory import model_info
    from seeddelta.outputs import write_json_atomic

    apply_threads(args)
    path = model_path(args)
    items = limit_per_task(pack.load_pack(args.pack), args.limit)
    loaded = load_from_args(args, path)
    base = load_from_args(args, args.base, use_seeddelta=False) if args.base else None  # fails before the long run
    m = loaded.model
    print(f"seeddelta greedy: {path}: {m.n_seeddelta} SeedΔ projection(s) of {len(m.projections())} in use; "
          f"{len(items)} prompt(s)", file=sys.stderr)
    with progress(args, len(items), "greedy pack", "prompt") as step:
        res = pack.run_pack(m, loaded.tokenizer, items, args.max_new, step)
    base_res = None
    base_info = None
    if base is not None:
        with progress(args, len(items), "greedy pack (base)", "prompt") as step:
            base_res = pack.run_pack(base.model, base.tokenizer, items, args.max_new, step)
        base_info = model_info(base)
        _print("base ", base_res)
    _print("model", res)
    for r in res["items"]:
        if r["flags"]:
            print(f"  {r['id']:<16} {' '.join(r['flags'])}  answer={r['answer']!r}")
    v = pack.verdict(res, base_res, args.tolerance)
    print(f"Prompts flagged: {res['flagged']}/{res['n']}")
    print(f"RESULT: {v['result']}" + (f" ({'; '.join(v['reasons'])})" if v["reasons"] else ""))
    if args.json:
        write_json_atomic(args.json, {"verdict": v, "model": model_info(loaded), "result": res,
                                      "base": None if base_res is None else {"model": base_info, "result": base_res},
                                      "pack": str(args.pack) if args.pack else "default test pack",
                                      "max_new": args.max_new,
                                      "flags": {"repetition_loop": f"p-gram (p<={pack.LOOP_MAX_PERIOD}) repeated >= "
                                                f"{pack.LOOP_MIN_REPEATS} times over >= {pack.LOOP_MIN_SPAN} tokens, "
                                                "not flagged when the answer is correct",
                                                "empty": "answer empty or whitespace",
                                                "no_stop": "no newline or EOS within --max-new tokens"}})
    return 0 if v["result"] == "PASS" else 1
