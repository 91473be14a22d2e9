"""`seeddelta tiny {data,train,export,eval}` — harness B's tiny model."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from seeddelta.assets import TINY_MODEL
from seeddelta.commands.common import (
    Subparsers,
    add_input,
    add_output,
    add_output_dir,
    add_threads_arg,
    apply_threads,
    positive_int,
)
from seeddelta.errors import SeedDeltaError


def register(subparsers: Subparsers) -> None:
    p = subparsers.add_parser("tiny", help="tiny model: dataset, training, export, evaluation",
                              description="Harness B's tiny model: its dataset, training (resumable), export to "
                              "GGUF, release into the package, and evaluation.")
    sub = p.add_subparsers(dest="tiny_command", metavar="ACTION")
    sub.required = True

    d = sub.add_parser("data", help="write the validation text and test pack",
                       description="Write the held-out validation text and greedy test pack of the tiny model's tasks.")
    add_output_dir(d, "--outdir", type=Path, default=None, metavar="DIR",
                   help="where to write val.txt and test.jsonl (default: the package's data/tiny)")
    d.add_argument("--seed", type=int, default=None, metavar="N", help="dataset seed (default: the shipped one)")
    d.set_defaults(handler=_data)

    t = sub.add_parser("train", help="train (or resume) the tiny model",
                       description="Train the tiny model from scratch, resume a run, or warm-start from a GGUF.")
    add_output_dir(t, "--run-dir", type=Path, default=Path("runs/tiny"), metavar="DIR",
                   help="checkpoints and the training log (default: runs/tiny)")
    t.add_argument("--resume", action="store_true", help="continue from RUN_DIR/ckpt.pt")
    add_input(t, "--config", type=Path, default=None, metavar="JSON", help="JSON with TrainConfig overrides")
    t.add_argument("--steps", type=positive_int, default=None, metavar="N", help="total steps of the schedule")
    t.add_argument("--max-steps", type=positive_int, default=None, metavar="N",
                   help="stop after this step (schedule unchanged)")
    add_input(t, "--init-from", type=Path, default=None, metavar="GGUF",
              help="warm start a new run from a tiny GGUF's weights (e.g. the shipped model)")
    add_threads_arg(t)
    t.set_defaults(handler=_train)

    e = sub.add_parser("export", help="export a checkpoint to GGUF F16",
                       description="Export a training checkpoint to a GGUF F16 file that llama.cpp loads.")
    add_input(e, "--ckpt", type=Path, default=Path("runs/tiny/ckpt.pt"), metavar="FILE",
              help="training checkpoint (default: runs/tiny/ckpt.pt)")
    add_output(e, "-o", "--output", type=Path, required=True, metavar="FILE", help="GGUF file to write")
    e.add_argument("--name", default="seeddelta-tiny", metavar="NAME", help="general.name of the model")
    e.set_defaults(handler=_export)

    r = sub.add_parser("release", help="export a checkpoint into the package, measure it, write manifest.json",
                       description="Export a checkpoint into the package's data directory, measure it against "
                       "the targets and write manifest.json.")
    add_input(r, "--ckpt", type=Path, default=Path("runs/tiny/ckpt.pt"), metavar="FILE",
              help="training checkpoint (default: runs/tiny/ckpt.pt)")
    add_output_dir(r, "--outdir", type=Path, default=None, metavar="DIR",
                   help="where to write the model and manifest (default: the package's data/tiny)")
    r.add_argument("--notes", default="", metavar="NOTES", help="free text stored in the manifest")
    add_threads_arg(r)
    r.set_defaults(handler=_release)

    v = sub.add_parser("eval", help="greedy accuracy and PPL of a checkpoint or tiny GGUF (training-side model)",
                       description="Greedy accuracy per task and perplexity of a checkpoint or tiny GGUF, computed "
                       "with the training-side model.")
    src = v.add_mutually_exclusive_group()
    add_input(v, "--ckpt", type=Path, default=None, metavar="FILE", help="training checkpoint", group=src)
    add_input(v, "-m", "--model", type=Path, default=None, metavar="FILE", implied=TINY_MODEL,
              help="tiny GGUF (default: the shipped model)", group=src)
    add_input(v, "--pack", type=Path, default=None, metavar="FILE", help="test pack (default: the shipped one)")
    v.add_argument("--per-task", type=positive_int, default=None, metavar="N", help="limit prompts per task")
    v.add_argument("--ctx", type=positive_int, nargs="*", default=[512, 1024, 2048], metavar="N",
                   help="contexts for perplexity (512 1024 2048)")
    v.add_argument("--chunks", type=positive_int, default=None, metavar="N", help="at most N windows per context")
    add_output(v, "--json", type=Path, default=None, metavar="PATH", help="write the result as JSON")
    add_threads_arg(v)
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

    apply_threads(args)
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

    apply_threads(args)
    m = release(args.ckpt, args.outdir if args.outdir is not None else DATA_DIR, notes=args.notes)
    for k, t in m["targets"].items():
        print(f"{k}: measured {t['measured']:.4f}, target {t['target']}, {'met' if t['met'] else 'NOT met'}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from seeddelta.outputs import write_json_atomic
    from seeddelta.tiny.evaluate import evaluate_model, load_eval_model

    apply_threads(args)
    model = load_eval_model(ckpt=args.ckpt, gguf_path=args.model)
    res = evaluate_model(model, pack=args.pack, per_task=args.per_task, ctxs=args.ctx, chunks=args.chunks)
    for task, r in res["greedy"].items():
        print(f"{task:9s} {r['correct']}/{r['n']} = {100 * r['accuracy']:.1f} %")
    for c, r in res["ppl"].items():
        print(f"ppl ctx {c}: {r['ppl']:.4f} ± {r['se']:.4f} ({r['windows']} windows)")
    if args.json is not None:
        write_json_atomic(args.json, res)
    return 0
