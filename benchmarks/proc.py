"""Whole-process measurements for the benchmarks: wall seconds, CPU seconds and peak resident memory
(the kernel's ru_maxrss of that one child, read with wait4), and min/median/max over runs."""

from __future__ import annotations

import os
import statistics
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Run:
    wall: float  # seconds
    cpu: float  # user + system seconds
    peak_mib: float  # ru_maxrss of the process
    returncode: int
    stderr: str


def run_process(argv: Sequence[str], *, cwd: str | None = None, env: Mapping[str, str] | None = None) -> Run:
    """Start `argv` as a fresh process and measure it as a whole (start-up included)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(list(argv), cwd=cwd, env=dict(env) if env is not None else None,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    return Run(wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024.0, proc.returncode, err)


def spread(values: Sequence[float]) -> str:
    """min / median / max."""
    return f"{min(values):.3g} / {statistics.median(values):.3g} / {max(values):.3g}"


