"""Threads on a busy machine: `seeddelta ppl` with a competing CPU load, default threading vs every `-t`.

The competing load is one busy-looping process per core, so every core is contended whatever else the
machine runs. Each variant is a fresh `seeddelta ppl --json` process on the tiny model; the figure is
the forward time over the windows (`throughput.prompt_seconds`, the median of the repeats, variants
interleaved so drifts in the background load hit all of them alike), plus the wall time of the
process. Variants: our default (`-t 0`), each `-t N` up to the core count, and libgomp's own default
(`GOMP_SPINCOUNT=300000`, threads spinning before they sleep: what the CLI did before it asked for
passive waiting). Then the same without the competing load.

Target: under load, default <= 1.3 x the best `-t` (exit status 1 when missed).
Run: `python -m benchmarks.bench_threads [--chunks N] [--repeats R] [--no-idle]`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

TARGET = 1.3
BURN = "import time\nend = time.time() + float(__import__('sys').argv[1])\nwhile time.time() < end:\n    pass\n"


def _run(extra: list[str], env_extra: dict[str, str], chunks: int) -> tuple[float, float]:
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")}
    env.update(env_extra)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "seeddelta", "ppl", "-q", "--chunks", str(chunks), "--json", path, *extra],
                   env=env, check=True, capture_output=True)
    wall = time.perf_counter() - t0
    with open(path, encoding="utf-8") as fh:
        forward = float(json.load(fh)["throughput"]["prompt_seconds"])
    os.unlink(path)
    return forward, wall


def _measure(variants: dict[str, tuple[list[str], dict[str, str]]], chunks: int, repeats: int) -> dict[str, tuple[float, float]]:
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, (extra, env) in variants.items():
            runs[name].append(_run(extra, env, chunks))
    return {name: (statistics.median(f for f, _ in r), statistics.median(w for _, w in r)) for name, r in runs.items()}


def _table(title: str, res: dict[str, tuple[float, float]]) -> float:
    best_t = min(v[0] for k, v in res.items() if k.startswith("-t "))
    print(f"{title}\n{'variant':<34}{'forward s':>11}{'wall s':>9}{'vs best -t':>12}")
    for name, (fwd, wall) in res.items():
        print(f"{name:<34}{fwd:>11.2f}{wall:>9.1f}{fwd / best_t:>11.2f}x")
    return res["default (-t 0)"][0] / best_t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench_threads")
    ap.add_argument("--chunks", type=int, default=6, help="perplexity windows per run (6)")
    ap.add_argument("--repeats", type=int, default=3, help="runs per variant, median taken (3)")
    ap.add_argument("--no-idle", action="store_true", help="skip the runs without the competing load")
    args = ap.parse_args(argv if argv is not None else [])
    cores = os.cpu_count() or 1
    variants: dict[str, tuple[list[str], dict[str, str]]] = {"default (-t 0)": ([], {})}
    for n in range(1, cores + 1):
        variants[f"-t {n}"] = (["-t", str(n)], {})
    variants["libgomp default (spinning), -t 0"] = ([], {"GOMP_SPINCOUNT": "300000"})
    with open("/proc/loadavg") as fh:
        print(f"{cores} core(s); load average before: {fh.read().split()[0]}; tiny model, {args.chunks} windows of 512, "
              f"median of {args.repeats}")
    burners = [subprocess.Popen([sys.executable, "-c", BURN, "86400"]) for _ in range(cores)]
    try:
        loaded = _measure(variants, args.chunks, args.repeats)
    finally:
        for p in burners:
            p.kill()
            p.wait()
    ratio = _table(f"with {cores} competing busy process(es):", loaded)
    if not args.no_idle:
        _table("\nwithout the competing load (other work on the machine as it is):",
               _measure(variants, args.chunks, args.repeats))
    verdict = "met" if ratio <= TARGET else "MISSED"
    print(f"\nunder load: default / best -t = {ratio:.2f} (target <= {TARGET}: {verdict})")
    return 0 if ratio <= TARGET else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
