"""Runtime benchmark: prompt (512 tokens) and decode tok/s of the tiny model in our torch runtime —
dense, and SeedΔ (materialized / sparse) on a stripped file built with `seeddelta build` — the
weights' resident memory of each (fresh process: RSS and its anonymous part after − before load,
and the sum of tensor bytes held; RSS also counts torch library pages the load touches first), seconds of `seeddelta ppl -c 512` over the validation text, and the same prompt/decode
figures with stock llama.cpp (llama-cpp-python) when installed, as a ratio.

Run: `python -m benchmarks.bench_runtime [--threads N] [--model GGUF]`. Without the committed tiny
model a random model of the same shape (8 layers, n_embd 192, n_ff 768, 6 heads) is used.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

TINY = "the committed tiny model"
SYNTHETIC = "random model of the tiny model's shape (tiny.gguf not built yet)"
PROMPT = 512
DECODE = 64
REPEATS = 3


def _tiny_or_synthetic(tmp: Path) -> tuple[Path, str]:
    try:
        from seeddelta.assets import TINY_MODEL

        p = TINY_MODEL
        if p.is_file():
            return p, TINY
    except ImportError:
        pass
    from seeddelta.testing.synthetic_gguf import make_llama_gguf

    p = tmp / "tiny_shaped.gguf"
    make_llama_gguf(p, n_layer=8, n_embd=192, n_ff=768, n_head=6, n_head_kv=6, vocab=320, dtype="F16", seed=0)
    return p, SYNTHETIC


def _speed(model, n_vocab: int) -> dict[str, float]:
    rng = np.random.default_rng(0)
    toks = rng.integers(3, n_vocab, PROMPT).tolist()
    best = float("inf")
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        model.forward(toks)
        best = min(best, time.perf_counter() - t0)
    cache = model.new_cache(16 + DECODE)
    lg = model.forward(toks[:16], cache)[-1]
    t0 = time.perf_counter()
    for _ in range(DECODE):
        lg = model.forward([int(torch.argmax(lg))], cache)[-1]
    dec = time.perf_counter() - t0
    return {"prompt_tok_per_s": PROMPT / best, "decode_tok_per_s": DECODE / dec}


_MEM_SNIPPET = """
import json, sys
from seeddelta.evaluation.memory import rss_anon_bytes, rss_bytes, trim_heap
from seeddelta.runtime.model import load_model
trim_heap(); before, anon_before = rss_bytes(), rss_anon_bytes()
m = load_model(sys.argv[1], mode=sys.argv[2])
trim_heap(); after, anon_after = rss_bytes(), rss_anon_bytes()
print(json.dumps({"rss_delta": after - before, "anon_delta": anon_after - anon_before,
                  "weights_bytes": m.weight_nbytes(), "ffn_bytes": m.ffn_nbytes()}))
"""


def _fresh_memory(path: Path, mode: str) -> dict[str, int]:
    out = subprocess.run([sys.executable, "-c", _MEM_SNIPPET, str(path), mode], capture_output=True, text=True,
                         check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def _llama_cpp(path: Path, n_vocab: int, threads: int) -> dict[str, float] | None:
    try:
        import llama_cpp
    except ImportError:
        return None
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=PROMPT + DECODE + 16, n_batch=PROMPT, verbose=False,
                          n_threads=threads)
    toks = np.random.default_rng(0).integers(3, n_vocab, PROMPT).tolist()
    best = float("inf")
    for _ in range(REPEATS):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(toks)
        best = min(best, time.perf_counter() - t0)
    llm.reset()
    llm.eval(toks[:16])
    t0 = time.perf_counter()
    for _ in range(DECODE):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        llm.eval([nxt])
    return {"prompt_tok_per_s": PROMPT / best, "decode_tok_per_s": DECODE / (time.perf_counter() - t0)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench_runtime")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    ap.add_argument("--model", default=None, help="GGUF to benchmark (default: tiny model)")
    args = ap.parse_args(argv if argv is not None else [])
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    from seeddelta.cli import main as cli
    from seeddelta.runtime.model import load_model

    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        if args.model:
            path, what = Path(args.model), "given model"
        else:
            path, what = _tiny_or_synthetic(tmp)
        print(f"model: {path} ({what}); torch threads {threads}")
        dense = load_model(path)
        n_vocab = dense.config.n_vocab
        rows = {"dense": (_speed(dense, n_vocab), _fresh_memory(path, "materialized"))}
        del dense
        built = tmp / "sd_stripped.gguf"
        rc = cli(["build", "-i", str(path), "-o", str(built), "--K", "64", "--base", "--row-scale",
                  "--strip-dense", "-q"])
        if rc == 0:
            for mode in ("materialized", "sparse"):
                m = load_model(built, mode=mode)
                rows[f"seeddelta {mode}"] = (_speed(m, n_vocab), _fresh_memory(built, mode))
                del m
        else:
            print("builder unavailable: SeedΔ rows skipped")
        print(f"{'runtime':<24}{'prompt tok/s':>14}{'decode tok/s':>14}{'weights MiB':>13}{'FFN MiB':>10}{'RSS Δ MiB':>11}{'anon Δ MiB':>12}")
        for name, (sp, mem) in rows.items():
            print(f"{name:<24}{sp['prompt_tok_per_s']:>14.1f}{sp['decode_tok_per_s']:>14.1f}"
                  f"{mem['weights_bytes'] / 2**20:>13.2f}{mem['ffn_bytes'] / 2**20:>10.2f}{mem['rss_delta'] / 2**20:>11.2f}"
                  f"{mem['anon_delta'] / 2**20:>12.2f}")
        print(f"  (SeedΔ file: gate/up/down K=64, XOR base, row scale, dense stripped; file {built.stat().st_size / 2**20:.2f} MiB"
              f" vs {path.stat().st_size / 2**20:.2f} MiB)" if built.is_file() else "")

        try:
            from seeddelta.assets import TINY_VAL_TEXT

            text = TINY_VAL_TEXT
        except ImportError:
            text = None
        if text is not None and text.is_file() and what != SYNTHETIC:
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "seeddelta", "ppl", "-m", str(path), "-f", str(text),
                                   "-c", "512", "-q", "-t", str(threads)], capture_output=True, text=True)
            secs = time.perf_counter() - t0
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("Final estimate")), proc.stderr.strip())
            print(f"seeddelta ppl -c 512 over {text.name}: {secs:.1f} s wall ({line})")
        else:
            print("seeddelta ppl timing skipped: needs a tiny-vocabulary model and the tiny validation text")

        ref = _llama_cpp(path, n_vocab, threads)
        if ref is None:
            print("llama-cpp-python not installed: no llama.cpp comparison")
        else:
            ours = rows["dense"][0]
            print(f"llama.cpp: prompt {ref['prompt_tok_per_s']:.1f} tok/s, decode {ref['decode_tok_per_s']:.1f} tok/s; "
                  f"ours/llama.cpp: prompt {ours['prompt_tok_per_s'] / ref['prompt_tok_per_s']:.3f}, "
                  f"decode {ours['decode_tok_per_s'] / ref['decode_tok_per_s']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
