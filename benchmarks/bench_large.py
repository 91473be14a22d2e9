"""Builder at 7B scale: a synthetic slice shaped like a 7B llama (n_embd 4096, n_ff 14336, 32 heads /
8 KV heads, 4 layers), every weight stored Q4_0 or Q8_0, all 12 FFN weights encoded (K 128, base,
--eval-cols 64 --eval-x 16) by `seeddelta build` in a fresh process. Printed per type: wall and CPU
seconds, seconds per layer, peak resident memory (ru_maxrss: the largest single process, the build
or one of its forked workers; and the peak PSS summed over all of them, sampled), and the
extrapolation to 32 layers.

Per layer: the slope between a 2-layer and a 4-layer build of the same file (start-up, reading
and writing the rest of the file cancel out); 32 layers: the 4-layer time plus 28 slopes. Peak
memory is set by the weights in flight (two per worker at most), not by the number of
layers: both builds' peaks and their difference are printed.

Run: `python -m benchmarks.bench_large [--types Q4_0,Q8_0] [--threads N] [--keep DIR]`
(the synthetic files take a few minutes to write and ~0.4 / 0.8 GB of disk each).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

from benchmarks.proc import run_process
from seeddelta.testing.synthetic_gguf import make_llama_gguf

N_EMBD, N_FF, N_HEAD, N_HEAD_KV, N_LAYER, VOCAB = 4096, 14336, 32, 8, 4, 256
FULL_LAYERS = 32
BUILD = ["--K", "128", "--base", "--eval-cols", "64", "--eval-x", "16", "-q", "--deterministic-report"]


def _model(directory: str, qtype: str) -> str:
    path = os.path.join(directory, f"slice-7b-{qtype}.gguf")
    if not os.path.isfile(path):
        t0 = time.perf_counter()
        make_llama_gguf(path, n_layer=N_LAYER, n_embd=N_EMBD, n_ff=N_FF, n_head=N_HEAD, n_head_kv=N_HEAD_KV,
                        vocab=VOCAB, dtype=qtype, seed=7, tokenizer=False)
        print(f"  wrote {path} ({os.path.getsize(path) / 1e9:.2f} GB) in {time.perf_counter() - t0:.0f} s", flush=True)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench_large")
    ap.add_argument("--types", default="Q4_0,Q8_0", help="weight types, comma-separated (Q4_0,Q8_0)")
    ap.add_argument("-t", "--threads", type=int, default=0, help="build threads (0: one per core)")
    ap.add_argument("--keep", default=None, metavar="DIR", help="keep (and reuse) the synthetic files in DIR")
    args = ap.parse_args(argv or [])
    print(f"7B-shaped slice: {N_LAYER} layers, n_embd {N_EMBD}, n_ff {N_FF}; build {' '.join(BUILD)} "
          f"-t {args.threads}; {os.cpu_count()} cores", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_large_") as tmp:
        directory = args.keep or tmp
        os.makedirs(directory, exist_ok=True)
        for qtype in args.types.split(","):
            model = _model(directory, qtype)
            runs = {}
            for layers in ("0-1", f"0-{N_LAYER - 1}"):
                out = os.path.join(tmp, f"out-{qtype}.gguf")
                run = run_process([sys.executable, "-m", "seeddelta", "build", "-i", model, "-o", out,
                                   "--layers", layers, "-t", str(args.threads), *BUILD], tree_memory=True)
                if run.returncode != 0:
                    print(f"  {qtype} --layers {layers}: build failed ({run.returncode}): {run.stderr.strip()[-400:]}")
                    return 1
                os.remove(out)
                runs[layers] = run
            two, four = runs["0-1"], runs[f"0-{N_LAYER - 1}"]
            per_layer = (four.wall - two.wall) / (N_LAYER - 2)
            per_layer_cpu = (four.cpu - two.cpu) / (N_LAYER - 2)
            full = four.wall + (FULL_LAYERS - N_LAYER) * per_layer
            print(f"  {qtype}: 2 layers {two.wall:.1f} s wall / {two.cpu:.1f} s CPU, peak {two.peak_mib:.0f} MiB "
                  f"(all processes: {two.tree_pss_mib:.0f} MiB PSS); 4 layers {four.wall:.1f} s wall / {four.cpu:.1f} s "
                  f"CPU, peak {four.peak_mib:.0f} MiB (all processes: {four.tree_pss_mib:.0f} MiB PSS)", flush=True)
            print(f"  {qtype}: {per_layer:.1f} s per layer (wall; {per_layer_cpu:.1f} s CPU); 32 layers ≈ {full:.0f} s "
                  f"= {full / 60:.1f} min; peak {four.peak_mib - two.peak_mib:+.0f} MiB from 2 to 4 layers", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
