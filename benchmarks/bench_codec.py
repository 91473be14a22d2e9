"""Codec benchmarks: encode a 7B-sized gate (14336 × 4096, K = 256, imatrix on) with and without
the XOR base; apply to 1 and 512 tokens against a dense matmul of the same shape.
Targets: encode <= 10 s per tensor on 2 cores."""

from __future__ import annotations

import time

import numpy as np
import torch

from benchmarks.timing import best_of
from seeddelta.codec.encode import EncodeConfig, encode

N_OUT, N_IN, K = 14336, 4096, 256




def main() -> int:
    rng = np.random.default_rng(0)
    W = (rng.standard_normal((N_OUT, N_IN)) * 0.02).astype(np.float32)
    scale = rng.uniform(0.5, 1.5, N_IN)
    print(f"torch threads: {torch.get_num_threads()}")
    encoded = {}
    for base in ("none", "xor_circulant"):
        cfg = EncodeConfig(K=K, base=base, row_scale=True)
        t0 = time.perf_counter()
        encoded[base] = encode(W, cfg, scale)
        dt = time.perf_counter() - t0
        verdict = "OK" if dt <= 10 else "OVER TARGET"
        print(f"encode {N_OUT}x{N_IN} K={K} base={base:<13} imatrix=on: {dt:6.2f} s  {N_OUT * N_IN / dt / 1e6:6.1f} Mweights/s  [{verdict} <= 10 s]")
    Wt = torch.from_numpy(W)
    for tokens in (1, 512):
        x = rng.standard_normal((tokens, N_IN)).astype(np.float32)
        xt = torch.from_numpy(x)
        dense = best_of(lambda xt=xt: xt @ Wt.T)
        for base, sdw in encoded.items():
            sdw.apply(x)  # build the cached sparse structure outside the timing
            t = best_of(lambda sdw=sdw, x=x: sdw.apply(x))
            print(f"apply T={tokens:<4} base={base:<13}: {t * 1e3:8.2f} ms  dense {dense * 1e3:8.2f} ms  ratio {t / dense:6.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
