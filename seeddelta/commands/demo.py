"""`seeddelta demo`: the main job on the built-in default.

With the tiny model shipped in the package: compress its FFN weights with SeedΔ, then compare
the compressed model with the original (perplexity, KL divergence, greedy task pack, file size).
Before the tiny model exists it falls back to harness A (`seeddelta toy`)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the main job on the built-in tiny model (see README)")
    p.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from seeddelta.cli import main

    return main(["toy"])
