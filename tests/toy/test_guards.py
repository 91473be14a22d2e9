"""No output replaces an input or another output, and nothing is left behind.

The cases are derived from what every command declares (`add_input`/`add_output`/`add_output_dir`),
so a new command is covered as soon as it declares its paths: for every (output, input) pair of
every command, the output pointed at the input — by the same path, a symlink or a hard link — is
refused with one line and exit status 2, the input's bytes unchanged and no file added. Outputs in
a missing directory are refused before any input is read (the inputs here are not even GGUF files).
Interrupted writes (SIGTERM, a full disk) leave no temporary file; a stale one of an earlier killed
run is removed and named."""

from __future__ import annotations

import argparse
import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from seeddelta.cli import build_parser, main
from seeddelta.commands.common import INPUTS, OUT_DIRS, OUTPUTS


def _leaves(parser: argparse.ArgumentParser, words: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        return [(words, parser)]
    return [leaf for name, child in subs[0].choices.items() for leaf in _leaves(child, (*words, name))]


def _roles(parser: argparse.ArgumentParser, role: str) -> list[tuple[str, str]]:
    return [(dest, flag) for dest, flag, _implied in parser.get_default(role) or ()]


def _action(parser: argparse.ArgumentParser, dest: str) -> argparse.Action:
    return next(a for a in parser._actions if a.dest == dest)


def _argv(words: tuple[str, ...], parser: argparse.ArgumentParser, values: dict[str, str]) -> list[str]:
    """A command line giving `values` (dest -> path) plus every other required argument (a path in `tmp`)."""
    argv = list(words)
    exclusive = {a.dest: g for g in parser._mutually_exclusive_groups for a in g._group_actions}
    used: set[int] = set()
    for action in parser._actions:
        if action.dest in values:
            value = values[action.dest]
        elif action.required:
            value = values["__fill__"] + "." + action.dest
        else:
            continue
        group = exclusive.get(action.dest)
        if group is not None:
            if id(group) in used:
                continue  # one flag of a mutually exclusive group is enough
            used.add(id(group))
        argv += [action.option_strings[0], value] if action.option_strings else [value]
    return argv


LEAVES = _leaves(build_parser())
PAIRS = [(words, out_dest, in_dest)
         for words, parser in LEAVES
         for out_dest, _ in _roles(parser, OUTPUTS)
         for in_dest, _ in _roles(parser, INPUTS)]
OUTPUT_PAIRS = [(words, a, b) for words, parser in LEAVES
                for i, (a, _) in enumerate(_roles(parser, OUTPUTS)) for b, _ in _roles(parser, OUTPUTS)[i + 1:]]
OUTPUTS_ALL = [(words, dest) for words, parser in LEAVES for dest, _ in _roles(parser, OUTPUTS)]
OUT_DIRS_ALL = [(words, dest) for words, parser in LEAVES for dest, _ in _roles(parser, OUT_DIRS)]


def _parser(words: tuple[str, ...]) -> argparse.ArgumentParser:
    return dict(LEAVES)[words]


def _snapshot(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() if p.is_file() and not p.is_symlink() else b"" for p in sorted(d.iterdir())}


def _run(capsys, argv: list[str]) -> tuple[int, list[str]]:
    rc = main(argv)
    captured = capsys.readouterr()
    return rc, captured.err.strip().splitlines()


def test_the_commands_that_write_are_all_covered():
    # the other side of the derivation: it really found the commands a user writes with
    names = {" ".join(w) for w, _o, _i in PAIRS}
    assert {"build", "imatrix", "ppl", "kld", "greedy", "sweep", "policy resolve", "policy export",
            "tiny export", "tiny eval"} <= names, names
    assert ("build",) in {w for w, _a, _b in OUTPUT_PAIRS}
    assert {" ".join(w) for w, _d in OUT_DIRS_ALL} >= {"demo", "sweep", "tiny data", "tiny train"}


@pytest.mark.parametrize("link", ["same", "symlink", "hardlink"])
@pytest.mark.parametrize("words,out_dest,in_dest", PAIRS, ids=[f"{' '.join(w)}:{o}={i}" for w, o, i in PAIRS])
def test_an_output_onto_an_input_is_refused(tmp_path, capsys, link, words, out_dest, in_dest):
    original = tmp_path / "input.bin"
    original.write_bytes(b"GGUF precious input bytes\n" * 8)
    target = {"same": original, "symlink": tmp_path / "via_symlink", "hardlink": tmp_path / "via_hardlink"}[link]
    if link == "symlink":
        target.symlink_to(original)
    elif link == "hardlink":
        os.link(original, target)
    before = _snapshot(tmp_path)
    argv = _argv(words, _parser(words), {in_dest: str(original), out_dest: str(target),
                                         "__fill__": str(tmp_path / "other")})
    rc, err = _run(capsys, argv)
    assert rc == 2, (argv, err)
    assert len(err) == 1 and "is the input" in err[0] and "inputs are never overwritten" in err[0], err
    assert _snapshot(tmp_path) == before  # the input unchanged, nothing added (no temp file either)


@pytest.mark.parametrize("words,a,b", OUTPUT_PAIRS, ids=[f"{' '.join(w)}:{a}={b}" for w, a, b in OUTPUT_PAIRS])
def test_two_outputs_onto_one_file_are_refused(tmp_path, capsys, words, a, b):
    path = tmp_path / "out.bin"
    argv = _argv(words, _parser(words), {a: str(path), b: str(path), "__fill__": str(tmp_path / "in")})
    rc, err = _run(capsys, argv)
    assert rc == 2 and len(err) == 1 and "both name" in err[0], err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("words,dest", OUTPUTS_ALL, ids=[f"{' '.join(w)}:{d}" for w, d in OUTPUTS_ALL])
def test_an_output_in_a_missing_directory_is_refused_before_any_input_is_read(tmp_path, capsys, words, dest):
    garbage = tmp_path / "not_a_model.gguf"
    garbage.write_text("not a GGUF file")
    parser = _parser(words)
    values = {d: str(garbage) for d, _ in _roles(parser, INPUTS)}
    values.update({dest: str(tmp_path / "missing" / "out.bin"), "__fill__": str(tmp_path / "fill")})
    rc, err = _run(capsys, _argv(words, parser, values))
    # the guard speaks first: had an input been read, the error would be about the garbage file
    assert rc == 2 and len(err) == 1 and "missing does not exist" in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not_a_model.gguf"]


@pytest.mark.parametrize("words,dest", OUTPUTS_ALL, ids=[f"{' '.join(w)}:{d}" for w, d in OUTPUTS_ALL])
def test_an_output_that_is_a_directory_is_refused(tmp_path, capsys, words, dest):
    rc, err = _run(capsys, _argv(words, _parser(words), {dest: str(tmp_path), "__fill__": str(tmp_path / "f")}))
    assert rc == 2 and len(err) == 1 and "is a directory" in err[0], err


@pytest.mark.parametrize("words,dest", OUT_DIRS_ALL, ids=[f"{' '.join(w)}:{d}" for w, d in OUT_DIRS_ALL])
def test_an_output_directory_that_is_a_file_is_refused(tmp_path, capsys, words, dest):
    f = tmp_path / "a_file"
    f.write_text("x")
    rc, err = _run(capsys, _argv(words, _parser(words), {dest: str(f), "__fill__": str(tmp_path / "f")}))
    assert rc == 2 and len(err) == 1 and "is a file, not a directory" in err[0], err
    assert f.read_text() == "x"


def test_demo_refuses_a_model_inside_its_own_outputs(tmp_path, capsys):
    model = tmp_path / "model_seeddelta.gguf"
    model.write_bytes(b"GGUF model bytes")
    rc, err = _run(capsys, ["demo", "-m", str(model), "--out", str(tmp_path)])
    assert rc == 2 and len(err) == 1 and "is the input -m" in err[0], err
    assert model.read_bytes() == b"GGUF model bytes" and [p.name for p in tmp_path.iterdir()] == [model.name]


# ------------------------------------------------------------------------------------------ temp files
def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_stale_temp_file_of_the_output_is_removed_and_named(tmp_path, capsys):
    report = tmp_path / "report.json"
    report.write_text('{"weights": []}')
    out = tmp_path / "policy.json"
    stale = tmp_path / f".policy.json.{_dead_pid()}-abc123.tmp"
    stale.write_bytes(b"half a file")
    live = tmp_path / f".policy.json.{os.getpid()}-def456.tmp"  # a writer that is alive: not ours to remove
    live.write_bytes(b"being written")
    rc = main(["policy", "export", str(report), "-o", str(out)])
    err = capsys.readouterr().err
    assert rc == 0 and not stale.exists() and live.exists(), err
    assert f"removed {stale}, a temporary file left by an interrupted run" in err
    live.unlink()


def test_a_temp_file_without_a_writer_pid_is_named_not_removed(tmp_path, capsys):
    # older versions named temp files without their pid: nothing tells whether a writer is alive
    report = tmp_path / "report.json"
    report.write_text('{"weights": []}')
    old = tmp_path / ".policy.json.k2j4_x9q.tmp"
    old.write_bytes(b"half")
    assert main(["policy", "export", str(report), "-o", str(tmp_path / "policy.json")]) == 0
    assert old.exists() and f"{old} looks like a temporary file left by an interrupted run" in capsys.readouterr().err


def test_a_full_disk_is_one_sentence_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    import seeddelta.outputs as outputs

    report = tmp_path / "report.json"
    report.write_text('{"weights": []}')

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(outputs.os, "fsync", full)
    rc, err = _run(capsys, ["policy", "export", str(report), "-o", str(tmp_path / "p.json")])
    assert rc == 2 and len(err) == 1, err
    assert "the disk is full" in err[0] and "free some space or write it elsewhere" in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


_SLOW_WRITE = """
import os, signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal (a background job inherits SIG_IGN)
import seeddelta.outputs as outputs
real_fsync = os.fsync
def slow(fd):
    print("writing", flush=True)
    time.sleep(60)
    real_fsync(fd)
outputs.os.fsync = slow
from seeddelta.cli import main
raise SystemExit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_signal_during_a_write_removes_the_temp_file(tmp_path, sig):
    report = tmp_path / "report.json"
    report.write_text('{"weights": []}')
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_WRITE, "policy", "export", str(report), "-o",
                             str(tmp_path / "p.json")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline() == "writing\n"  # inside the write, temp file present
    assert any(p.name.endswith(".tmp") for p in tmp_path.iterdir())
    proc.send_signal(sig)
    t0 = time.monotonic()
    _, err = proc.communicate(timeout=60)
    assert time.monotonic() - t0 < 30  # the sleep was interrupted, not waited out
    assert proc.returncode == 128 + sig, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"], err
    assert "Traceback" not in err and err.startswith("\nseeddelta: "), err  # never glued to a progress line
