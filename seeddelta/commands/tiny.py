"""`seeddelta tiny {data,train,export,eval}` — harness B's tiny model."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from seeddelta.commands.common import Subparsers
from seeddelta.errors import SeedDeltaError


def register(subparsers: Subparsers) -> None:
    p = subparsers.add_parser("tiny", help="tiny model: dataset, training, export, evaluation")
    sub = p.add_subparsers(dest="tiny_command", metavar="ACTION")
    sub.required = True

    d = sub.add_parser("data", help="write the validation text and test pack")
    d.add_argument("--outdir", type=Path, default=None, help="default: the package's data/tiny")
    d.add_argument("--seed", type=int, default=None)
    d.set_defaults(handler=_data)

    t = sub.add_parser("train", help="train (or resume) the tiny model")
    t.add_argument("--run-dir", type=Path, default=Path("runs/tiny"))
    t.add_argument("--resume", action="store_true", help="continue from RUN_DIR/ckpt.pt")
    t.add_argument("--config", type=Path, default=None, help="JSON with TrainConfig overrides")
    t.add_argument("--steps", type=int, default=None, help="total steps of the schedule")
    t.add_argument("--max-steps", type=int, default=None, help="stop after this step (schedule unchanged)")
    t.add_argument("--init-from", type=Path, default=None, metavar="GGUF",
                   help="warm start a new run from a tiny GGUF's weights (e.g. the shipped model)")
    t.set_defaults(handler=_train)

    e = sub.add_parser("export", help="export a checkpoint to GGUF F16")
    e.add_argument("--ckpt", type=Path, default=Path("runs/tiny/ckpt.pt"))
    e.add_argument("-o", "--output", type=Path, required=True)
    e.add_argument("--name", default="seeddelta-tiny")
    e.set_defaults(handler=_export)

    r = sub.add_parser("release", help="export a checkpoint into the package, measure it, write manifest.json")
    r.add_argument("--ckpt", type=Path, default=Path("runs/tiny/ckpt.pt"))
    r.add_argument("--outdir", type=Path, default=None, help="default: the package's data/tiny")
    r.add_argument("--notes", default="")
    r.set_defaults(handler=_release)

    v = sub.add_parser("eval", help="greedy accuracy and PPL of a checkpoint or tiny GGUF (training-side model)")
    src = v.add_mutually_exclusive_group()
    src.add_argument("--ckpt", type=Path, default=None)
    src.add_argument("-m", "--model", type=Path, default=None, help="tiny GGUF (default: the shipped model)")
    v.add_argument("--pack", type=Path, default=None)
    v.add_argument("--per-task", type=int, default=None, help="limit prompts per task")
    v.add_argument("--ctx", type=int, nargs="*", default=[512, 1024, 2048])
    v.add_argument("--chunks", type=int, default=None)
    v.add_argument("--json", type=Path, default=None)
    v.set_defaults(handler=_eval)


def _data(args: argparse.Namespace) -> int:
    from seeddelta.assets import DATA_DIR
    from seeddelta.tiny import dataset as ds

    outdir = args.outdir if args.outdir is not None else DATA_DIR
    seed = args.seed if args.seed is not None else ds.DEFAULT_SEED
    val_path, test_path = ds.write_heldout(outdir, seed)
    print(f"wrote {val_path} and {test_path} (seed {seed})")
    return 0


def _train(args: argparse.Namespace) -> int:
    from seeddelta.tiny.train import TrainConfig, _print_flush, train

    cfg = TrainConfig()
    over: dict = {}
    if args.config is not None:
        try:
            over = json.loads(args.config.read_text())
        except (OSError, ValueError) as exc:
            raise SeedDeltaError(f"cannot read --config {args.config}: {exc}") from None
        d = cfg.to_dict()
        unknown = set(over) - set(d)
        if unknown:
            raise SeedDeltaError(f"unknown training options in {args.config}: {sorted(unknown)}")
        d.update(over)
        cfg = TrainConfig.from_dict(d)
    if args.steps is not None:
        cfg.steps = args.steps
    # on --resume the checkpoint's configuration wins, except for what is given explicitly here
    train(cfg, args.run_dir, resume=args.resume, max_steps=args.max_steps, log=_print_flush,
          steps_override=args.steps if args.resume else None, overrides=over if args.resume else None,
          init_from=args.init_from)
    return 0


def _export(args: argparse.Namespace) -> int:
    from seeddelta.tiny.export import export_checkpoint

    path = export_checkpoint(args.ckpt, args.output, name=args.name)
    print(f"wrote {path}")
    return 0


def _release(args: argparse.Namespace) -> int:
    from seeddelta.assets import DATA_DIR
    from seeddelta.tiny.release import release

    m = release(args.ckpt, args.outdir if args.outdir is not None else DATA_DIR, notes=args.notes)
    for k, t in m["targets"].items():
        print(f"{k}: measured {t['measured']:.4f}, target {t['target']}, {'met' if t['met'] else 'NOT met'}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from seeddelta.tiny.evaluate import evaluate_model, load_eval_model

    model = load_eval_model(ckpt=args.ckpt, gguf_path=args.model)
    res = evaluate_model(model, pack=args.pack, per_task=args.per_task, ctxs=args.ctx, chunks=args.chunks)
    for task, r in res["greedy"].items():
        print(f"{task:9s} {r['correct']}/{r['n']} = {100 * r['accuracy']:.1f} %")
    for c, r in res["ppl"].items():
        print(f"ppl ctx {c}: {r['ppl']:.4f} ± {r['se']:.4f} ({r['windows']} windows)")
    if args.json is not None:
        args.json.write_text(json.dumps(res, indent=1))
    return 0
