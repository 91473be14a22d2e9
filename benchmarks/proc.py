"""Whole-process measurements for the benchmarks: wall seconds, CPU seconds and peak resident memory
(the kernel's ru_maxrss read with wait4: the largest of the child and the descendants it reaped, not
their sum), optionally the peak of the whole process tree's proportional set size sampled from /proc
(forked workers share pages with their parent: PSS counts each shared page once across the tree),
and min/median/max over runs."""

from __future__ import annotations

import os
import statistics
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Run:
    wall: float  # seconds
    cpu: float  # user + system seconds
    peak_mib: float  # ru_maxrss: the largest single process of the tree
    returncode: int
    stderr: str
    tree_pss_mib: float | None = None  # peak of the tree's summed PSS, when sampled


def _tree(pid: int) -> list[int]:
    """`pid` and its descendants (Linux /proc/PID/task/TID/children)."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{tid}/children") as fh:
                    todo.extend(int(c) for c in fh.read().split())
        except OSError:
            continue  # exited meanwhile
    return found


def _pss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


class _TreeSampler:
    """Samples the tree's summed PSS every `interval` seconds until stopped; keeps the peak."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        self.pid, self.interval, self.peak_kib = pid, interval, 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.done.wait(self.interval):
            self.peak_kib = max(self.peak_kib, sum(_pss_kib(p) for p in _tree(self.pid)))

    def stop(self) -> float:
        self.done.set()
        self.thread.join()
        return self.peak_kib / 1024.0


def run_process(argv: Sequence[str], *, cwd: str | None = None, env: Mapping[str, str] | None = None,
                tree_memory: bool = False) -> Run:
    """Start `argv` as a fresh process and measure it as a whole (start-up included); `tree_memory`:
    also sample the peak PSS of it and its worker processes (a thread polling /proc: costs some CPU)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(list(argv), cwd=cwd, env=dict(env) if env is not None else None,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    sampler = _TreeSampler(proc.pid) if tree_memory and os.path.isdir("/proc") else None
    err = proc.stderr.read()  # EOF: the process and its workers (which inherit the pipe) are ending
    tree_pss = sampler.stop() if sampler is not None else None
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    return Run(wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024.0, proc.returncode, err, tree_pss)


def spread(values: Sequence[float]) -> str:
    """min / median / max."""
    return f"{min(values):.3g} / {statistics.median(values):.3g} / {max(values):.3g}"


