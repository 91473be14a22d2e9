"""The command line as a user meets it: `--help` without torch, a description for every command, a
help line and a readable metavar for every flag, and every path argument declared as an input or an
output (so the one guard in `seeddelta.cli` sees it)."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from seeddelta.cli import COMMAND_MODULES, build_parser, main
from seeddelta.commands.common import INPUTS, OUT_DIRS, OUTPUTS

# metavars that name a path: an argument with one of these must be declared with add_input/add_output
PATH_METAVARS = {"FILE", "PATH", "DIR", "TEXT", "GGUF", "JSON", "OUT.gguf", "FILE.gguf", "REPORT.json",
                 "POLICY.json", "MODEL"}


def _leaves(parser: argparse.ArgumentParser, prefix: str = "seeddelta") -> list[tuple[str, argparse.ArgumentParser]]:
    """(command path, parser) of every parser that runs something (sub-subcommands included)."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        return [(prefix, parser)]
    out = []
    for name, child in subs[0].choices.items():
        out += _leaves(child, f"{prefix} {name}")
    return out


def _all_parsers(parser: argparse.ArgumentParser, prefix: str = "seeddelta") -> list[tuple[str, argparse.ArgumentParser]]:
    out = [(prefix, parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                out += _all_parsers(child, f"{prefix} {name}")
    return out


LEAVES = _leaves(build_parser())


def test_building_the_parser_imports_no_torch():
    code = ("import sys; from seeddelta.cli import build_parser; build_parser(); "
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_every_help_answers_without_torch():
    # one process for all of them: --help of the tool and of every command, then torch must still be absent
    # (a module's name with '_' is the command's with '-': replay_pack → replay-pack)
    code = ("import contextlib, io, sys\nfrom seeddelta.cli import main\n"
            f"for argv in [['--help'], *[[name.replace('_', '-'), '--help'] for name in {COMMAND_MODULES!r}]]:\n"
            "    out = io.StringIO()\n"
            "    with contextlib.redirect_stdout(out):\n"
            "        assert main(argv) == 0, argv\n"
            "    assert out.getvalue().startswith('usage: seeddelta'), argv\n"
            "assert 'torch' not in sys.modules\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr


def test_every_parser_has_a_description():
    for name, parser in _all_parsers(build_parser()):
        assert parser.description and len(parser.description) > 20, name
        assert not parser.description.rstrip().endswith((",", ":", "—", "-")), (name, parser.description)


def test_every_subcommand_has_a_one_line_help():
    for name, parser in _all_parsers(build_parser()):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for choice in action._choices_actions:
                    assert choice.help, f"{name} {choice.dest}"


@pytest.mark.parametrize("name,parser", LEAVES, ids=[n for n, _ in LEAVES])
def test_every_flag_has_help_and_a_readable_metavar(name, parser):
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        label = f"{name} {'/'.join(action.option_strings) or action.dest}"
        assert action.help and action.help != argparse.SUPPRESS, f"{label}: no help"
        takes_value = action.nargs != 0
        if takes_value:
            assert action.metavar is not None or action.choices is not None, f"{label}: metavar {action.dest.upper()}"


@pytest.mark.parametrize("name,parser", LEAVES, ids=[n for n, _ in LEAVES])
def test_every_path_argument_is_declared_as_input_or_output(name, parser):
    declared = {dest for role in (INPUTS, OUTPUTS, OUT_DIRS) for dest, _flag, _implied in parser.get_default(role) or ()}
    for action in parser._actions:
        if action.metavar in PATH_METAVARS:
            assert action.dest in declared, f"{name} {action.dest}: a path that the guard does not see"


def test_a_usage_error_is_one_line_and_a_status(capsys):
    assert main(["ppl", "-t", "-2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["seeddelta ppl: error: argument -t/--threads: must be >= 0, got -2"]
    assert main(["ppl", "--chunks", "0"]) == 2
    assert "0 would score nothing" in capsys.readouterr().err
