"""seeddelta: compress the FFN weights of GGUF (llama.cpp) models into a structured base plus a sparse
top-K residual (SeedΔ), and measure — before spending hours on a large model — whether the maths is
right, where the error accumulates, and what a setting saves and costs.

Each subcommand lives in its own module under seeddelta.commands and exposes `register(subparsers)`;
its handler receives the parsed namespace and returns an exit status."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from seeddelta.errors import SeedDeltaError

# Module names under seeddelta.commands, in the order they appear in --help.
COMMAND_MODULES = ("demo", "toy", "build", "inspect", "tiny", "ppl", "kld", "greedy", "imatrix", "sweep", "policy",
                   "regress")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # argparse's default prints usage + exits 2; keep it to one line
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="seeddelta", description=__doc__.split("\n\n")[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name in COMMAND_MODULES:
        # a missing command module is a broken installation: let the ImportError say so
        importlib.import_module(f"seeddelta.commands.{name}").register(sub)
    return parser
def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except SeedDeltaError as exc:
        print(f"seeddelta {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("seeddelta: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `seeddelta inspect --json | head`: the reader left, not an error of ours
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # keep the interpreter from failing again at exit flush
        return 0
    except OSError as exc:  # disk full, permission denied, … on a path the user gave: one line
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"seeddelta {args.command}: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
