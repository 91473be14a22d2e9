"""Variant sdq: the runtime's apply (sparse mode: quantized base dequantized block by block + CSR Δ;
materialized: one dense Ŵ) against a dense float32 matmul of the same shape, and the encode time of one
weight per variant setting — as ratios measured in one run.

Shapes are SmolLM2-135M's FFN weights (gate/up 576 → 1536, down 1536 → 576), random Student-t(3)
rows (heavy-tailed like trained weights), a random XᵀX; T = 1 (decode) and T = 512 (a prompt window).

Run: `python -m benchmarks.bench_variants [--threads N]`.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from benchmarks.timing import best_of
from seeddelta.codec.sdq import SdqConfig, encode_sdq
from seeddelta.gguf_format.writer import RawTensor
from seeddelta.runtime.projections import MaterializedSeedDeltaProjection, parse_payload
from seeddelta.runtime.sdq_projections import SparseSdqProjection

SHAPES = {"gate/up 576→1536": (1536, 576), "down 1536→576": (576, 1536)}
SETTINGS = {
    "Q4_0 alone": SdqConfig(K=0),
    "Q4_0 + 1% coo": SdqConfig(K=-1, coding="coo"),
    "Q4_0 + 1% c8": SdqConfig(K=-1, coding="c8"),
    "Q4_0 rot + 1% c8": SdqConfig(K=-1, coding="c8", rotate=True),
    "Q8_0 + 1% c8": SdqConfig(K=-1, base_type="Q8_0", coding="c8"),
    "MXFP4 + 1% c8": SdqConfig(K=-1, base_type="MXFP4", coding="c8"),
    "Q4_0 gptq + 1% c8 full": SdqConfig(K=-1, coding="c8", quantizer="gptq", refit="full"),
}
REPEATS = 5




def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench_variants")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    args = ap.parse_args(argv if argv is not None else [])
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    print(f"threads {torch.get_num_threads()}; time per call, best of {REPEATS}; ratio = variant / dense float32 "
          "matmul of the same shape, same run")
    for shape_name, (n_out, n_in) in SHAPES.items():
        W = (rng.standard_t(3, size=(n_out, n_in)) * 0.02).astype(np.float32)
        X = rng.standard_normal((4096, n_in)) @ (np.eye(n_in) + 0.1 * rng.standard_normal((n_in, n_in)))
        xtx = X.T @ X / X.shape[0]
        scale = np.sqrt(np.diag(xtx))
        dense = torch.from_numpy(W)
        xs = {t: torch.from_numpy(rng.standard_normal((t, n_in)).astype(np.float32)) for t in (1, 512)}
        t_dense = {t: best_of(lambda x=x, d=dense: torch.nn.functional.linear(x, d), REPEATS) for t, x in xs.items()}
        print(f"\n{shape_name}: dense f32 matmul {t_dense[1] * 1e6:.0f} µs (T=1), {t_dense[512] * 1e3:.2f} ms (T=512)")
        print(f"  {'setting':<24} {'bpw':>6} {'encode s':>9} {'sparse T=1':>12} {'ratio':>7} {'sparse T=512':>13} "
              f"{'ratio':>7} {'mat. T=512':>11} {'ratio':>6}")
        for name, cfg in SETTINGS.items():
            k = max(1, round(0.01 * n_in)) if cfg.K < 0 else cfg.K
            config = SdqConfig(**{**cfg.__dict__, "K": k})
            t0 = time.perf_counter()
            sdw = encode_sdq(W, config, scale, xtx)
            t_enc = time.perf_counter() - t0
            types = sdw.ggml_types()
            arrays = {s: RawTensor(a, types[s], ()) if s in types else a for s, a in sdw.tensors().items()}
            payload = parse_payload("blk.0.ffn_gate", arrays, n_in, n_out)
            sparse = SparseSdqProjection(payload)  # type: ignore[arg-type]
            mat = MaterializedSeedDeltaProjection(payload)  # type: ignore[arg-type]
            ts = {t: best_of(lambda x=x, f=sparse: f(x), REPEATS) for t, x in xs.items()}
            tm = best_of(lambda f=mat, x=xs[512]: f(x), REPEATS)
            bpw = 8 * sdw.nbytes() / W.size
            print(f"  {name:<24} {bpw:>6.3f} {t_enc:>9.2f} {ts[1] * 1e6:>10.0f}µs {ts[1] / t_dense[1]:>7.1f} "
                  f"{ts[512] * 1e3:>11.2f}ms {ts[512] / t_dense[512]:>7.2f} {tm * 1e3:>9.2f}ms "
                  f"{tm / t_dense[512]:>6.2f}")
    return 0


if __name__ == "__main__":
    import sys

    raise SystemExit(main(sys.argv[1:]))
