"""`seeddelta greedy`: greedy pack of held-out prompts with known answers, PASS/FAIL.

The model's SeedΔ tensors are in use; per prompt exact match and collapse flags (repetition loop,
empty, no stop).
"""

from __future__ import annotations

import argparse
import sys

from seeddelta.evaluation import greedy as eg
from seeddelta.evaluation import scoring as ev
from seeddelta.outputs import write_json_atomic


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("greedy", help="greedy pack: exact match and collapse flags, PASS/FAIL",
                       description=__doc__.split("\n")[0] if __doc__ else None)
    ev.add_model_arg(p)
    p.add_argument("--pack", default=None, metavar="FILE",
                   help="pack in the test-pack JSON-lines format (default: the tiny model's test pack)")
    p.add_argument("--base", default=None, metavar="FILE",
                   help="base GGUF run dense on the same pack; PASS also needs accuracy >= base - tolerance")
    p.add_argument("--tolerance", type=float, default=eg.DEFAULT_TOLERANCE, metavar="F",
                   help=f"allowed absolute accuracy drop against --base ({eg.DEFAULT_TOLERANCE})")
    p.add_argument("--max-new", type=int, default=eg.DEFAULT_MAX_NEW, metavar="N",
                   help=f"generated tokens per prompt at most ({eg.DEFAULT_MAX_NEW})")
    p.add_argument("--limit", type=int, default=0, metavar="N", help="use only the first N prompts of each task (0: all)")
    p.add_argument("--json", default=None, metavar="PATH", help="write the result as JSON")
    ev.add_runtime_args(p)
    p.set_defaults(handler=run)


def _limit(items: list[eg.PackItem], n: int) -> list[eg.PackItem]:
    if n <= 0:
        return items
    seen: dict[str, int] = {}
    out = []
    for it in items:
        if seen.get(it.task, 0) < n:
            out.append(it)
            seen[it.task] = seen.get(it.task, 0) + 1
    return out


def _print(label: str, res: dict) -> None:
    tasks = "  ".join(f"{t}: {v['correct']}/{v['n']} ({100 * v['accuracy']:.1f}%)" for t, v in sorted(res["tasks"].items()))
    print(f"{label}: exact {res['correct']}/{res['n']} ({100 * res['accuracy']:.1f}%), flagged {res['flagged']}  [{tasks}]")


def run(args: argparse.Namespace) -> int:
    ev.apply_threads(args)
    if args.max_new < 1:
        from seeddelta.errors import SeedDeltaError

        raise SeedDeltaError(f"--max-new must be >= 1, got {args.max_new}")
    model_path = args.model or ev.default_model()
    items = _limit(eg.load_pack(args.pack), args.limit)
    loaded = ev.load_from_args(args, model_path)
    m = loaded.model
    print(f"seeddelta greedy: {model_path}: {m.n_seeddelta} SeedΔ projection(s) of {len(m.projections())} in use; "
          f"{len(items)} prompt(s)", file=sys.stderr)
    res = eg.run_pack(m, loaded.tokenizer, items, args.max_new)
    base_res = None
    base_info = None
    if args.base:
        base = ev.load(args.base, use_seeddelta=False)
        base_res = eg.run_pack(base.model, base.tokenizer, items, args.max_new)
        base_info = ev.model_info(base)
        _print("base ", base_res)
    _print("model", res)
    for r in res["items"]:
        if r["flags"]:
            print(f"  {r['id']:<16} {' '.join(r['flags'])}  answer={r['answer']!r}")
    v = eg.verdict(res, base_res, args.tolerance)
    print(f"Prompts flagged: {res['flagged']}/{res['n']}")
    print(f"RESULT: {v['result']}" + (f" ({'; '.join(v['reasons'])})" if v["reasons"] else ""))
    if args.json:
        write_json_atomic(args.json, {"verdict": v, "model": ev.model_info(loaded), "result": res,
                                  "base": None if base_res is None else {"model": base_info, "result": base_res},
                                  "pack": str(args.pack) if args.pack else "default test pack",
                                  "max_new": args.max_new,
                                  "flags": {"repetition_loop": f"p-gram (p<={eg.LOOP_MAX_PERIOD}) repeated >= "
                                            f"{eg.LOOP_MIN_REPEATS} times over >= {eg.LOOP_MIN_SPAN} tokens, "
                                            "not flagged when the answer is correct",
                                            "empty": "answer empty or whitespace",
                                            "no_stop": "no newline or EOS within --max-new tokens"}})
    return 0 if v["result"] == "PASS" else 1
