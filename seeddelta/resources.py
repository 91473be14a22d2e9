"""Machine resources: threads on a machine that other work shares, and the memory available.

torch runs its intra-op parallel regions on GNU OpenMP (the libgomp it ships). By default an idle
libgomp thread *spins* (busy-waits, GOMP_SPINCOUNT 300000 rounds) at the end of every parallel
region before it sleeps. On a machine whose cores are busy with other processes that is a disaster
for a forward pass made of thousands of small regions: the spinning thread holds a core the
descheduled partner needs, and every region waits for a time slice. Measured on 2 shared cores
with two competing busy processes (benchmarks/bench_threads.py, `ppl` on the tiny model, 6
windows): forward 57 s with libgomp's spinning default, 2.3 s with passive waiting and 2 threads,
9.1 s with one thread (under contention two sleeping-when-idle threads get two shares of the CPU).

So the CLI sets `OMP_WAIT_POLICY=PASSIVE` before torch is imported, unless the user already
decided (`OMP_WAIT_POLICY` or `GOMP_SPINCOUNT` in the environment), and `-t N` sets torch's
intra-op threads (0: torch's default, one per core).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Iterator

WAIT_POLICY_KEYS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def prepare_environment() -> bool:
    """Ask OpenMP threads to sleep instead of spinning when idle; must run before torch is imported.

    Returns True when this call set it (False: the user's environment decides, or torch is already loaded)."""
    import sys

    if any(k in os.environ for k in WAIT_POLICY_KEYS) or "torch" in sys.modules:
        return False
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return True


def configure(threads: int) -> int:
    """torch's intra-op thread count: `threads` when > 0, else torch's default; returns the count in use."""
    import torch

    if threads > 0:
        torch.set_num_threads(int(threads))
    return int(torch.get_num_threads())


def available_memory() -> int | None:
    """Bytes the kernel says can be allocated without swapping (MemAvailable), or None when unknown."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_GLIBC_DEFAULT_THRESHOLD = 128 * 1024


@contextlib.contextmanager
def reuse_freed_memory(mmap_threshold: int = 32 << 20, trim_threshold: int = 64 << 20) -> Iterator[bool]:
    """Inside: glibc serves blocks up to `mmap_threshold` from its heap and keeps up to `trim_threshold`
    of freed heap instead of returning it to the kernel at once. numpy's megabyte-sized temporaries
    otherwise come fresh from mmap every time, and every page of them is faulted in and zeroed by the
    kernel: on a 135M-model build 600 000 page faults, 1.8 s of system time against 3.8 s of user
    time (measured). Yields whether the setting took (False off glibc); restores glibc's defaults."""
    mallopt = None
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
        mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    except (OSError, AttributeError):
        mallopt = None
    took = bool(mallopt and mallopt(_M_MMAP_THRESHOLD, mmap_threshold) and mallopt(_M_TRIM_THRESHOLD, trim_threshold))
    try:
        yield took
    finally:
        if mallopt is not None:
            mallopt(_M_MMAP_THRESHOLD, _GLIBC_DEFAULT_THRESHOLD)
            mallopt(_M_TRIM_THRESHOLD, _GLIBC_DEFAULT_THRESHOLD)


BLAS_THREAD_KEYS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def load_numpy_without_blas_threads() -> bool:
    """Import numpy with its OpenBLAS started on one thread, unless the user set a BLAS thread count or
    numpy is already loaded; returns True when this call did it. For commands whose BLAS calls all run
    on one thread anyway (`build` limits them inside its worker threads): OpenBLAS otherwise starts a
    thread per core that busy-waits for work it never gets (~2 % of a SmolLM2 build's CPU, measured).
    The environment is restored at once, so child processes get the user's."""
    import sys

    if "numpy" in sys.modules or any(k in os.environ for k in BLAS_THREAD_KEYS):
        return False
    os.environ["OPENBLAS_NUM_THREADS"] = "1"
    try:
        import numpy  # noqa: F401 - loaded now, on one BLAS thread
    finally:
        del os.environ["OPENBLAS_NUM_THREADS"]
    return True
