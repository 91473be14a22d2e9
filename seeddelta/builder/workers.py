"""Who computes the trials of a build (one weight encoded at one K and measured): worker processes
where the platform can fork, else worker threads; with one worker, the caller itself.

Threads share one interpreter lock, and a trial is many small numpy calls: two threads on two cores
measured 1.2x one thread, each waiting on the lock ~17 % of its time. Forked processes inherit the
opened model (its memory map), the options and the imatrix, so a task is four small values; a worker
parks the trial's tensors in the build's spill file itself (builder.spill) and sends back only the
trial's metrics, sizes and `Parked` references — the arrays never cross a pipe (pickling them, ~1.4 MB a
SmolLM2 trial, ate the processes' gain in an earlier attempt).

The decisions stay in the parent, in build order, and every trial is a deterministic function of its
inputs: the output does not depend on which worker computed what, nor on threads vs processes.
"""

from __future__ import annotations

import multiprocessing
import signal
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from seeddelta.builder.encode import Trial, detach_trial, run_trial
from seeddelta.builder.options import BuildOptions, TensorConfig
from seeddelta.builder.spill import SpillFile
from seeddelta.errors import SeedDeltaError
from seeddelta.gguf_format.imatrix_file import Imatrix
from seeddelta.gguf_format.reader import GGUFModel

# "auto": processes where fork is available and no other Python thread runs (a fork copies the locks
# other threads hold); "always": wherever fork is available; "never": threads. Tests set it to compare
# the two, which give the same bytes.
PROCESS_WORKERS = "auto"

# What a forked worker reads: set in the parent just before the workers are forked, inherited by them.
_INHERITED: tuple[GGUFModel, BuildOptions, Imatrix | None, SpillFile] | None = None


_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", signal.SIGTERM)}


def _start_worker() -> None:
    """A worker leaves Ctrl-C to the parent, which stops the pool (the trial under way finishes, then
    the worker exits), and dies quietly on SIGTERM/SIGHUP instead of running the parent's handler.
    The parent forks with these signals blocked: one arriving before this ran waits, then obeys it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for sig in _STOP_SIGNALS - {signal.SIGINT}:
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)


def _trial_in_worker(layer: int, kind: str, cfg: TensorConfig, K: int) -> Trial:
    assert _INHERITED is not None, "a trial worker runs in a process forked by TrialPool"
    model, opts, imatrix, spill = _INHERITED
    return detach_trial(model, opts, run_trial(model, opts, layer, kind, cfg, K, imatrix), spill.store)


def _fork_context() -> Any:
    """multiprocessing's fork context, or None for threads (see PROCESS_WORKERS; no fork on Windows)."""
    if PROCESS_WORKERS == "never" or "fork" not in multiprocessing.get_all_start_methods():
        return None
    if PROCESS_WORKERS == "auto" and threading.active_count() > 1:
        return None
    return multiprocessing.get_context("fork")


class TrialPool:
    """Trials computed by workers, requested (and prefetched) by (layer, kind, K)."""

    def __init__(self, model: GGUFModel, opts: BuildOptions, imatrix: Imatrix | None, workers: int,
                 spill: SpillFile | None) -> None:
        self.compute: Callable[[int, str, TensorConfig, int], Trial] = (
            lambda layer, kind, cfg, K: run_trial(model, opts, layer, kind, cfg, K, imatrix))
        self.executor: Executor | None = None
        self.processes = False
        self.started = False  # the worker processes forked
        self.futures: dict[tuple[int, str, int], Future[Trial]] = {}
        if workers <= 1:
            return
        context = _fork_context() if spill is not None else None
        if context is not None and spill is not None:
            global _INHERITED
            spill.share(context)
            _INHERITED = (model, opts, imatrix, spill)
            for stream in (sys.stdout, sys.stderr):  # a child flushes its copy of unwritten output at exit
                stream.flush()
            self.executor = ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker)
            self.processes = True
        else:
            self.executor = ThreadPoolExecutor(max_workers=workers)

    def _submit(self, layer: int, kind: str, cfg: TensorConfig, K: int) -> Future[Trial]:
        assert self.executor is not None
        if not self.processes:
            return self.executor.submit(self.compute, layer, kind, cfg, K)
        if self.started:
            return self.executor.submit(_trial_in_worker, layer, kind, cfg, K)
        # the first submission forks the workers: with the stop signals blocked (see _start_worker);
        # one that arrives meanwhile is delivered to this process when they are unblocked here
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            future = self.executor.submit(_trial_in_worker, layer, kind, cfg, K)
            self.started = True
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        return future

    def prefetch(self, layer: int, kind: str, cfg: TensorConfig, K: int) -> None:
        key = (layer, kind, K)
        if self.executor is not None and key not in self.futures:
            self.futures[key] = self._submit(layer, kind, cfg, K)

    def get(self, layer: int, kind: str, cfg: TensorConfig, K: int) -> Trial:
        future = self.futures.pop((layer, kind, K), None)
        if future is None and self.processes:  # e.g. an autotune step: a worker has the cores
            future = self._submit(layer, kind, cfg, K)
        if future is None:
            return self.compute(layer, kind, cfg, K)
        try:
            return future.result()
        except BrokenProcessPool:  # a worker killed (e.g. by the out-of-memory killer): say so in one line
            raise SeedDeltaError(f"blk.{layer}.{kind}: a build worker process ended abruptly (killed, or out of "
                                 "memory?); -t 1 builds without worker processes") from None

    def close(self) -> None:
        global _INHERITED
        if self.executor is not None:
            self.executor.shutdown(wait=True, cancel_futures=True)
        _INHERITED = None
