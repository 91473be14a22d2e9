"""Units spread over processes: `seeddelta scan` of the tiny model in one process, with `-j 2`, and on a
local Dask cluster of two single-threaded worker processes (`--scheduler`; skipped without the
`cluster` extra).

Each variant is a fresh `seeddelta scan --no-cache` process (every unit measured), variants alternated
within each round so that drifts in the machine's load hit all of them alike; the cluster is started
before the timings (as a user's would be running already), so its figure includes each worker
loading the model and computing the base's logits once. Reported: wall time per run, the ratio to
the serial run of the same round, and whether every variant wrote the serial run's JSON bytes
(exit status 1 when not: results must not depend on where a unit ran).

Run: `python -m benchmarks.bench_workers [--chunks N] [--layers L] [--rounds R]`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _scan(extra: list[str], chunks: int, layers: str, out: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "seeddelta", "scan", "--no-cache", "--chunks", str(chunks), "--layers", layers,
                    "--json", str(out), *extra], check=True, capture_output=True)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench_workers")
    ap.add_argument("--chunks", type=int, default=8, help="windows of 512 per unit (8)")
    ap.add_argument("--layers", default="0-7", help="layers scanned, 3 units each (0-7: the tiny model's all)")
    ap.add_argument("--rounds", type=int, default=1, help="rounds of all variants (1)")
    args = ap.parse_args(argv if argv is not None else [])
    variants: dict[str, list[str]] = {"serial (-j 1, threads automatic)": [], "-j 2 (1 thread each)": ["-j", "2"]}
    cluster = None
    try:
        from distributed import LocalCluster

        cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0")
        variants["Dask LocalCluster, 2 workers x 1 thread"] = ["--scheduler", cluster.scheduler_address]
    except ImportError as exc:
        print(f"(no Dask variant: {exc}; optional extra: pip install 'seeddelta[cluster]')")
    with open("/proc/loadavg") as fh:
        load = fh.read().split()[0]
    print(f"{os.cpu_count()} core(s); load average before: {load}; tiny model scan, layers {args.layers} x "
          f"gate,up,down, {args.chunks} windows of 512, {args.rounds} round(s), variants alternated")
    times: dict[str, list[float]] = {name: [] for name in variants}
    ratios: dict[str, list[float]] = {name: [] for name in variants}
    identical = True
    try:
        with tempfile.TemporaryDirectory(prefix="bench-workers-") as tmp:
            for r in range(args.rounds):
                names = list(variants) if r % 2 == 0 else list(reversed(variants))
                outputs: dict[str, bytes] = {}
                for name in names:
                    out = Path(tmp) / f"{r}-{len(outputs)}.json"
                    times[name].append(_scan(variants[name], args.chunks, args.layers, out))
                    outputs[name] = out.read_bytes()
                serial = next(iter(variants))
                for name in variants:
                    ratios[name].append(times[serial][-1] / times[name][-1])
                    identical &= outputs[name] == outputs[serial]
    finally:
        if cluster is not None:
            cluster.close()
    print(f"{'variant':<40}{'wall s (each round)':>24}{'speed-up vs serial':>20}")
    for name in variants:
        runs = ", ".join(f"{t:.1f}" for t in times[name])
        print(f"{name:<40}{runs:>24}{statistics.median(ratios[name]):>19.2f}x")
    print(f"JSON bytes identical to the serial run: {'yes' if identical else 'NO'}")
    return 0 if identical else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
