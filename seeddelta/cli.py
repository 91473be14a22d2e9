"""seeddelta: compress the FFN weights of GGUF (llama.cpp) models into a structured base plus a sparse
top-K residual (SeedΔ), and measure — before spending hours on a large model — whether the maths is
right, where the error accumulates, and what a setting saves and costs.

Each subcommand lives in its own module under seeddelta.commands and exposes `register(subparsers)`;
its handler receives the parsed namespace and returns an exit status. Registration needs only
argparse (commands import torch and the rest inside their handlers), so `--help` answers at once."""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NoReturn

from seeddelta.errors import SeedDeltaError, Terminated

# Module names under seeddelta.commands, in the order they appear in --help.
COMMAND_MODULES = ("demo", "toy", "build", "inspect", "materialize", "tiny", "ppl", "kld", "greedy", "imatrix",
                   "sweep", "replay_pack", "scan", "autogate", "policy", "regress", "v1")
EPILOG = ("Start with `seeddelta demo` (the whole job on the tiny model shipped in the package, about two "
          "minutes); `seeddelta COMMAND --help` lists a command's options. Without -m a command uses the tiny "
          "model, without -f its validation text.")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # argparse's default prints usage + exits 2; keep it to one line
        self.exit(2, f"{self.prog}: error: {message}\n")


def _named_command(argv: Sequence[str]) -> str | None:
    """The command module `argv` names (its first word), or None (no command, an option first, unknown)."""
    if not argv or argv[0].startswith("-"):
        return None
    name = argv[0].replace("-", "_")
    return name if name in COMMAND_MODULES else None


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole command line; with `only` (a command module), that command's parser alone — the same
    parser for its arguments, without importing every other command (~30 ms of a `build`'s start)."""
    parser = _Parser(prog="seeddelta", description=__doc__.split("\n\n")[0] if __doc__ else None, epilog=EPILOG)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name in COMMAND_MODULES if only is None else (only,):
        # a missing command module is a broken installation: let the ImportError say so
        importlib.import_module(f"seeddelta.commands.{name}").register(sub)
    return parser


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated(signum)


@contextmanager
def _termination_raises() -> Iterator[None]:
    """SIGTERM/SIGHUP raise `Terminated` while a command runs, so its temporary files are removed."""
    previous: dict[signal.Signals, Any] = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        try:
            previous[sig] = signal.signal(sig, _raise_terminated)
        except ValueError:  # not the main thread (e.g. called from a worker): leave signals alone
            pass
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: Sequence[str] | None = None) -> int:
    from seeddelta.resources import load_numpy_without_blas_threads, prepare_environment

    prepare_environment()  # before any command imports torch
    argv = list(sys.argv[1:] if argv is None else argv)
    command = _named_command(argv)
    if command == "build":  # its BLAS calls run on one thread: no idle OpenBLAS threads spinning
        load_numpy_without_blas_threads()
    from seeddelta.commands.common import guard_paths

    parser = build_parser(command)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error already printed as one line: a status, not an exit
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    try:
        with _termination_raises():
            guard_paths(args)
            return int(args.handler(args) or 0)
    except SeedDeltaError as exc:
        print(f"seeddelta {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("\nseeddelta: interrupted", file=sys.stderr)
        return 130
    except Terminated as exc:
        print(f"\nseeddelta: terminated by signal {exc.signum}", file=sys.stderr)
        return 128 + exc.signum
    except BrokenPipeError:  # e.g. `seeddelta inspect --json | head`: the reader left, not an error of ours
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # keep the interpreter from failing again at exit flush
        return 0
    except OSError as exc:  # disk full, permission denied, … on a path the user gave: one line
        from seeddelta.outputs import is_full_disk, write_error

        if exc.filename and is_full_disk(exc):
            message = str(write_error(exc, exc.filename, "file"))
        else:
            message = f"{exc.strerror or exc}" + (f" ({exc.filename})" if exc.filename else "")
        print(f"seeddelta {args.command}: error: {message}", file=sys.stderr)
        return 2
    except MemoryError:
        print(f"seeddelta {args.command}: error: out of memory (try a smaller model, -c or --chunks)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
