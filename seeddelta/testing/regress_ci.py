"""The regress run CI affords (the tiny model at reduced settings), shared by the tiny and golden tiers.

`ci_regress(base)` runs `seeddelta regress` once per test session into `base/regress-ci` (a file
lock serialises pytest-xdist workers; a later call re-reads every measurement from the run's cache
in seconds) and returns its exit status and output directory."""

from __future__ import annotations

import contextlib
import io
from functools import cache
from pathlib import Path

from filelock import FileLock

# Two layers apart (B3 has one separated pair), one budget with and without base, 2 windows per
# context, 10 greedy prompts per task (5 at each stack step), equal bytes at one density, no llama.cpp
# points (the interop extra is not part of CI), two variant points (the Q4_0 base alone; with a 1 %
# compact residual refitted on the calibration XᵀX).
CI_ARGS = ("--layers", "1,5", "--densities", "1/3", "--chunks", "2", "--unit-chunks", "2", "--greedy-limit", "10",
           "--stack-greedy-limit", "5", "--eq-densities", "1/4", "--quant-types", "none",
           "--variants", "Q4_0,Q4_0+1%-c8-refit", "-t", "1")


@cache
def ci_lock(base: Path) -> FileLock:
    """The one lock instance of a base directory (one instance is re-entrant, two are not)."""
    return FileLock(str(base / "regress-ci.lock"))


def ci_regress(base: Path, extra: tuple[str, ...] = ()) -> tuple[int, Path, str]:
    """(exit status, output directory, stdout) of the CI regress run (plus `extra` arguments); the run
    holds the lock, so no other test reads or rewrites the directory meanwhile."""
    from seeddelta.cli import main

    out = base / "regress-ci"
    with ci_lock(base):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(io.StringIO()):
            status = main(["regress", "--out", str(out), *CI_ARGS, *extra])
    return status, out, buf.getvalue()


def ci_report(base: Path) -> tuple[int, Path, str, str, str]:
    """The CI run's (status, directory, stdout, report.json text, report.md text), read under the lock."""
    with ci_lock(base):  # re-entrant: ci_regress takes it again inside
        status, out, stdout = ci_regress(base)
        return status, out, stdout, (out / "report.json").read_text(encoding="utf-8"), \
            (out / "report.md").read_text(encoding="utf-8")
