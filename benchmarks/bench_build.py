"""Builder benchmark: a synthetic model shaped like SmolLM2-135M (30 layers, n_embd 576, n_ff 1536,
9 heads / 3 KV heads, F16), every `ffn_gate` encoded at K = 128 with the XOR base and an imatrix.
Prints total seconds of `run_build` (read, encode, write) and per-tensor figures.
Target: <= 60 s on 2 cores. Run: `python -m benchmarks.bench_build [--vocab N] [--eval]`."""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time

from seeddelta.builder.options import BuildOptions, TensorConfig
from seeddelta.builder.pipeline import run_build
from seeddelta.testing.synthetic_gguf import make_imatrix, make_llama_gguf

N_LAYER, N_EMBD, N_FF, N_HEAD, N_HEAD_KV = 30, 576, 1536, 9, 3
K = 128


def gate_only(opts: BuildOptions):
    """Resolver: only ffn_gate is encoded (the policy plug-in point of the builder)."""
    def resolve(layer: int, kind: str) -> TensorConfig:
        return TensorConfig(enabled=kind == "ffn_gate", strip_dense=False, K=opts.kind_K(kind), block=opts.block)
    return resolve


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench_build")
    ap.add_argument("--vocab", type=int, default=49152, help="vocabulary (SmolLM2: 49152)")
    ap.add_argument("--eval", action="store_true", help="also measure with --eval-cols 64 --eval-x 32")
    ap.add_argument("-t", "--threads", type=int, default=0)
    args = ap.parse_args(argv or [])
    with tempfile.TemporaryDirectory(prefix="bench_build_") as d:
        t0 = time.perf_counter()
        m = make_llama_gguf(os.path.join(d, "in.gguf"), n_layer=N_LAYER, n_embd=N_EMBD, n_ff=N_FF, n_head=N_HEAD,
                            n_head_kv=N_HEAD_KV, vocab=args.vocab, dtype="F16", seed=0, tokenizer=False)
        make_imatrix(os.path.join(d, "imatrix.gguf"), m, seed=1)
        t_make = time.perf_counter() - t0
        size_mb = os.path.getsize(m.path) / 1e6
        print(f"synthetic model: {N_LAYER} layers, {N_EMBD} -> {N_FF}, vocab {args.vocab}, F16, {size_mb:.1f} MB "
              f"(made in {t_make:.1f} s)")
        runs = [("gate K=128 base imatrix", 0, 0)]
        if args.eval:
            runs.append(("gate K=128 base imatrix eval-cols 64 eval-x 32", 64, 32))
        for label, eval_cols, eval_x in runs:
            opts = BuildOptions(
                input=m.path, output=os.path.join(d, "out.gguf"), K=K, base=True,
                imatrix=os.path.join(d, "imatrix.gguf"), eval_cols=eval_cols, eval_x=eval_x,
                threads=args.threads, progress=False,
            )
            t0 = time.perf_counter()
            result = run_build(opts, gate_only(opts), log=io.StringIO())
            total = time.perf_counter() - t0
            encoded = [r for r in result.results if r.entry is not None and r.entry["emit"]]
            per = [r.seconds for r in encoded]
            print(f"{label}: {len(encoded)} tensors in {total:.2f} s total "
                  f"({sum(per) / max(1, len(per)):.3f} s/tensor of worker time, threads={opts.threads or os.cpu_count()}); "
                  f"+{result.bytes_added / 1e6:.2f} MB SeedΔ; target <= 60 s: {'PASS' if total <= 60 else 'MISS'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
