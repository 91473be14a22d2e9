"""Independent tasks run in this process, in local worker processes (`-j N`), or on a Dask cluster
(`--scheduler ADDRESS`): the one place sweep, scan and regress spread their units.

A caller hands `run_tasks` a **worker**: a picklable callable holding everything a task needs
(paths, windows, settings) and loading anything heavy (the model, the base's logits) lazily on its
first task, so each worker process loads it once. Tasks and results are plain picklable values;
results come back in task order, and `on_result` sees each as soon as it is done (in completion
order), which is where callers cache it — so an interrupted run keeps every finished unit.

Dask is an optional extra (`pip install 'seeddelta[cluster]'`). A Dask worker must have seeddelta
installed and read the same files at the same absolute paths (a shared filesystem or identical
copies); the worker and the task are sent as pickled bytes and unpickled only after OpenMP has
been asked to wait passively (`seeddelta.resources`), because unpickling imports torch.

Results do not depend on where a task ran: the same computations in the same order in every
process (torch's kernels give the same bits whatever the thread count: tests hold serial, `-j 2`
and a two-worker cluster to equal output bytes).
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import pickle
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any, TypeVar

from seeddelta.errors import SeedDeltaError

T = TypeVar("T")
R = TypeVar("R")
CLUSTER_INSTALL = "pip install 'seeddelta[cluster]'"
CONNECT_TIMEOUT_S = 10  # how long to wait for a scheduler before saying it cannot be reached
DEFAULT_SCHEDULER_PORT = 8786  # `dask scheduler`'s
WAIT_FOR_WORKER_S = 60  # a scheduler without workers: how long to wait for the first one to join


@dataclass(frozen=True)
class Pool:
    """Where the tasks run: `scheduler` (a Dask scheduler's address) when given, else `jobs` local
    processes (1: this process). `threads`: torch threads per process (0: automatic, see
    `worker_threads`)."""

    jobs: int = 1
    scheduler: str | None = None
    threads: int = 0

    @property
    def in_process(self) -> bool:
        return self.scheduler is None and self.jobs <= 1

    def describe(self) -> str:
        if self.scheduler is not None:
            return f"Dask scheduler {self.scheduler}"
        return "this process" if self.jobs <= 1 else f"{self.jobs} local processes"


def worker_threads(pool: Pool) -> int:
    """torch threads of each process: -t when given; else in this process 0 (torch's default: every
    core), in N local processes cores // N (at least 1) so that N × threads never exceeds the
    cores, and on a cluster 0 here — decided on each worker by `host_threads`."""
    if pool.threads > 0 or pool.in_process or pool.scheduler is not None:
        return pool.threads
    return max(1, (os.cpu_count() or 1) // pool.jobs)


def host_threads(cores: int, slots: int) -> int:
    """A Dask task's torch threads without -t: its machine's cores shared among the task slots that
    machine's workers run at once (`dask worker --nthreads T --nworkers W`: W·T slots)."""
    return max(1, cores // max(1, slots))


class Threaded:
    """A worker that can be told its thread count (on a cluster, known only on the worker's machine)."""

    def with_threads(self, threads: int) -> Any:
        raise NotImplementedError


def run_tasks(worker: Callable[[T], R], tasks: Sequence[T], pool: Pool,
              on_result: Callable[[int, R], None] | None = None, *, local: Callable[[T], R] | None = None) -> list[R]:
    """Every task's result, in task order. `local` (default `worker`) runs them in this process when
    the pool says so (a caller's already-loaded worker); `worker` is what other processes receive."""
    done = on_result or (lambda _i, _r: None)
    results: dict[int, R] = {}

    def finish(i: int, r: R) -> None:
        results[i] = r
        done(i, r)

    if not tasks:
        return []
    if pool.scheduler is not None:
        _run_dask(worker, tasks, pool.scheduler, pool.threads, finish)
    elif pool.jobs <= 1 or len(tasks) == 1:
        run = local or worker
        for i, task in enumerate(tasks):
            finish(i, run(task))
    else:
        _run_processes(worker, tasks, min(pool.jobs, len(tasks)), finish)
    return [results[i] for i in range(len(tasks))]


# ---------------------------------------------------------------------------------- local processes
_WORKER: Any = None


def _install(worker: Any) -> None:
    global _WORKER
    _WORKER = worker


def _call_installed(task: Any) -> Any:
    return _WORKER(task)


def _run_processes(worker: Callable[[T], R], tasks: Sequence[T], jobs: int, finish: Callable[[int, R], None]) -> None:
    # spawn, not fork: a forked copy of a process whose torch/OpenMP threads already ran can hang;
    # the children inherit the environment (OMP_WAIT_POLICY) the CLI set before torch was imported
    pool = ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_install, initargs=(worker,))
    try:
        futures = {pool.submit(_call_installed, task): i for i, task in enumerate(tasks)}
        for fut in as_completed(futures):
            finish(futures[fut], fut.result())
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)  # Ctrl-C or a failed task: queued tasks are dropped
        raise
    pool.shutdown(wait=True)


# ---------------------------------------------------------------------------------- Dask
_DASK_WORKER: tuple[str, Any] | None = None  # (token, worker): the last worker unpickled in this Dask worker process


def _dask_call(token: str, payload: bytes, task: bytes, slots: dict[str, int] | None) -> Any:
    """Runs inside a Dask worker: the worker object is unpickled once per process (and replaced when
    a new run sends another one, so a long-lived worker holds one model at a time). `slots`: task
    slots per host when the threads are automatic (None: -t decided)."""
    global _DASK_WORKER
    from seeddelta.resources import prepare_environment

    prepare_environment()  # before the first unpickling imports torch
    if _DASK_WORKER is None or _DASK_WORKER[0] != token:
        _DASK_WORKER = None  # let the previous run's model go before loading the next
        worker = pickle.loads(payload)
        if slots is not None and isinstance(worker, Threaded):
            from distributed import get_worker
            from distributed.comm import get_address_host

            me = get_worker()
            here = slots.get(get_address_host(me.address), me.state.nthreads)  # a worker that joined later: its own
            worker = worker.with_threads(host_threads(os.cpu_count() or 1, here))
        _DASK_WORKER = (token, worker)
    return _DASK_WORKER[1](pickle.loads(task))


def _slots_per_host(client: Any) -> dict[str, int]:
    """Task slots (worker threads) per host of the workers connected now."""
    out: dict[str, int] = {}
    for info in client.scheduler_info(n_workers=-1)["workers"].values():
        out[info["host"]] = out.get(info["host"], 0) + int(info["nthreads"])
    return out


def dask_client(address: str) -> Any:
    """A client of the scheduler at `address`; one line (exit 2) when Dask is missing or the scheduler
    cannot be reached."""
    try:
        from distributed import Client
    except ImportError:
        raise SeedDeltaError(f"--scheduler needs Dask's distributed scheduler, an optional extra: {CLUSTER_INSTALL}") \
            from None
    try:
        _check_reachable(address)  # fails fast; a Client that cannot connect retries until its timeout
        return Client(address, timeout=CONNECT_TIMEOUT_S, set_as_default=False)
    except (OSError, TimeoutError, ValueError, TypeError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SeedDeltaError(f"--scheduler {address}: cannot reach a Dask scheduler ({reason[:200]})") from None


def _check_reachable(address: str) -> None:
    """The address parses and, for TCP/TLS, something listens there (ValueError / OSError otherwise)."""
    import socket

    from distributed.comm.addressing import parse_address, parse_host_port
    from distributed.comm.registry import backends

    scheme, location = parse_address(address)
    if scheme not in backends:  # a Client would accept it and then fail only at its timeout
        raise ValueError(f"unknown address scheme {scheme!r} (expected one of {', '.join(sorted(backends))})")
    if scheme in ("tcp", "tls", "ws", "wss"):
        host, port = parse_host_port(location, default_port=DEFAULT_SCHEDULER_PORT)
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()


def _run_dask(worker: Callable[[T], R], tasks: Sequence[T], address: str, threads: int,
              finish: Callable[[int, R], None]) -> None:
    from distributed import KilledWorker
    from distributed import as_completed as dask_completed

    payload = pickle.dumps(worker)
    token = hashlib.sha256(payload).hexdigest()
    client = dask_client(address)
    futures: dict[Any, int] = {}
    try:
        if not client.scheduler_info()["workers"]:
            try:
                client.wait_for_workers(1, timeout=WAIT_FOR_WORKER_S)
            except TimeoutError:
                raise SeedDeltaError(f"--scheduler {address}: no worker joined within {WAIT_FOR_WORKER_S} s (start "
                                     f"one: dask worker {address} --nthreads 1)") from None
        slots = None if threads > 0 else _slots_per_host(client)
        [shared] = client.scatter([payload], broadcast=True, hash=False)
        for i, task in enumerate(tasks):
            fut = client.submit(_dask_call, token, shared, pickle.dumps(task), slots, pure=False,
                                key=f"seeddelta-{token[:12]}-{i}")
            futures[fut] = i
        for fut in dask_completed(list(futures), loop=client.loop):
            try:
                result = fut.result()
            except KilledWorker as exc:  # the worker process died (out of memory, killed): not a traceback
                raise SeedDeltaError(f"--scheduler {address}: Dask workers died while measuring task {futures[fut]} "
                                     f"({exc}); see the workers' logs (out of memory?)") from None
            finish(futures[fut], result)
    finally:
        if futures:
            client.cancel(list(futures))  # an interrupted run leaves nothing queued on the cluster
        client.close()
