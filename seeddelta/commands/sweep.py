"""`seeddelta sweep`: one layer at a time (the user's B2), which layers take SeedΔ and which break.

For every swept layer a SeedΔ file is built with that layer alone encoded (the encoding flags of
`seeddelta build`, dense weights stripped) and compared with the base on the same windows, as
`seeddelta kld` does: paired ΔNLL ± se, mean and p99 KLD, same top-1, and the bytes that layer saves.
The base runs once; its logits are reused for every layer.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from seeddelta import evaluate as ev
from seeddelta.build import BuildOptions, run_build
from seeddelta.commands.build import add_encoding_args, encoding_options
from seeddelta.layers import parse_layers
from seeddelta.outputs import write_json_atomic


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("sweep", help="SeedΔ on one layer at a time: which layers are safe (B2)",
                       description=__doc__.split("\n")[0] if __doc__ else None)
    p.add_argument("-m", "--model", default=None, metavar="FILE", help="GGUF model (default: the tiny model)")
    ev.add_text_args(p)
    p.add_argument("--layers", default=None, metavar="A-B|LIST", help="layers to sweep (default: all)")
    p.add_argument("--json", default=None, metavar="PATH", help="write the table as JSON")
    p.add_argument("--keep", default=None, metavar="DIR", help="keep the per-layer SeedΔ files in DIR")
    add_encoding_args(p)
    p.set_defaults(handler=run)


def _cached(fn: ev.Logits) -> ev.Logits:
    """The base's logits per window, computed once (windows are keyed by their token bytes)."""
    memo: dict[bytes, Any] = {}

    def run(window: np.ndarray, first: int) -> Any:
        key = window.tobytes() + first.to_bytes(4, "little")
        if key not in memo:
            memo[key] = fn(window, first)
        return memo[key]

    return run


def run(args: argparse.Namespace) -> int:
    ev.apply_threads(args)
    model_path = Path(args.model) if args.model else ev.default_model()
    base = ev.load(model_path, use_seeddelta=False)
    text_path, _, windows = ev.text_windows(args, base.tokenizer)
    layers = parse_layers(args.layers, len(base.model.layers))
    base_logits = _cached(ev.model_logits(base.model))
    print(f"seeddelta sweep: {model_path}, {len(layers)} layer(s), {windows.n_chunk} window(s) of {windows.n_ctx}, "
          f"{windows.n_scored} scored", file=sys.stderr)
    rows = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="seeddelta-sweep-") as tmp:
        out_dir = Path(args.keep) if args.keep else Path(tmp)
        out_dir.mkdir(parents=True, exist_ok=True)
        for n, layer in enumerate(layers, 1):
            path = out_dir / f"layer{layer}.gguf"
            result = run_build(BuildOptions(input=str(model_path), output=str(path), layers=str(layer), strip_dense=True,
                                            progress=False, **encoding_options(args)))
            cand = ev.load(path, mode="sparse")
            s = ev.kl_divergence(base_logits, ev.model_logits(cand.model), windows).summary()
            rows.append({"layer": layer, "delta_nll": s["delta_nll"]["mean"], "delta_nll_se": s["delta_nll"]["se"],
                         "ppl_ratio": s["ppl_ratio"], "kld_mean": s["kld"]["mean"], "kld_p99": s["kld"]["p99"],
                         "same_top_p": s["same_top_p"]["mean"],
                         "bytes_saved": result.bytes_stripped - result.bytes_added})
            del cand
            if not args.keep:
                os.unlink(path)
            print(f"[{n}/{len(layers)}] blk.{layer}: ΔNLL {rows[-1]['delta_nll']:+.5f}  "
                  f"{time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
    _print(rows)
    if args.json:
        write_json_atomic(args.json, {
            "model": str(model_path), "text": str(text_path), "ctx": windows.n_ctx, "chunks": windows.n_chunk,
            "encoding": encoding_options(args), "layers": rows,
            "method": "per layer: a file with only that layer's FFN weights as SeedΔ (dense stripped), sparse runtime, "
                      "against the dense base on the same llama-perplexity windows; delta_nll = mean paired "
                      "NLL_model - NLL_base = ln(PPL ratio)"})
    return 0


def _print(rows: list[dict[str, Any]]) -> None:
    print(f"{'layer':<7}{'ΔNLL':>10}{'± se':>9}{'PPL ratio':>11}{'KLD mean':>10}{'KLD p99':>9}{'same top':>10}{'bytes saved':>13}")
    for r in rows:
        print(f"blk.{r['layer']:<3}{r['delta_nll']:+10.5f}{r['delta_nll_se']:9.5f}{r['ppl_ratio']:11.4f}"
              f"{r['kld_mean']:10.5f}{r['kld_p99']:9.4f}{r['same_top_p']:10.2%}{r['bytes_saved']:13,}")
    order = sorted(rows, key=lambda r: r["delta_nll"])
    print("safest first: " + ", ".join(f"blk.{r['layer']}" for r in order))
