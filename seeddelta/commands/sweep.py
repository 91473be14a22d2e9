"""`seeddelta sweep`: one layer at a time (the user's B2), which layers and tensors take SeedΔ.

For every swept layer (or, with --per-kind, every layer and FFN tensor) a SeedΔ file is built with
that unit alone encoded (the encoding flags of `seeddelta build`, dense weights stripped) and compared
with the base on the same windows, as `seeddelta kld` does: paired ΔNLL ± se, mean and p99 KLD,
same top-1, and the bytes that unit saves. The base runs once; its logits are reused for every unit.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from seeddelta import evaluate as ev
from seeddelta.build import BuildOptions, Resolver, baseline_resolver, run_build
from seeddelta.commands.build import add_encoding_args, encoding_options
from seeddelta.errors import SeedDeltaError
from seeddelta.gguf_io import KINDS
from seeddelta.layers import parse_layers
from seeddelta.outputs import write_json_atomic


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("sweep", help="SeedΔ on one layer at a time: which layers are safe (B2)",
                       description=__doc__.split("\n")[0] if __doc__ else None)
    ev.add_model_arg(p)
    ev.add_text_args(p)
    p.add_argument("--layers", default=None, metavar="A-B|LIST", help="layers to sweep (default: all)")
    p.add_argument("--kinds", default="gate,up,down", metavar="LIST",
                   help="FFN tensors encoded in each unit: any of gate,up,down (default: all three)")
    p.add_argument("--per-kind", action="store_true", help="one unit per (layer, tensor) instead of per layer")
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


def _kinds(spec: str) -> tuple[str, ...]:
    names = [k.strip() for k in spec.split(",") if k.strip()]
    bad = [k for k in names if f"ffn_{k}" not in KINDS]
    if bad or not names:
        raise SeedDeltaError(f"--kinds: expected a list of gate, up, down; got {spec!r}")
    return tuple(f"ffn_{k}" for k in ("gate", "up", "down") if k in names)


def _only(opts: BuildOptions, kinds: tuple[str, ...]) -> Resolver:
    """The baseline configuration with every tensor outside `kinds` left dense."""
    baseline = baseline_resolver(opts)
    return lambda layer, kind: replace(baseline(layer, kind), enabled=kind in kinds)


def run(args: argparse.Namespace) -> int:
    ev.apply_threads(args)
    kinds = _kinds(args.kinds)
    model_path = Path(args.model) if args.model else ev.default_model()
    base = ev.load(model_path, use_seeddelta=False)
    text_path, _, windows = ev.text_windows(args, base.tokenizer)
    layers = parse_layers(args.layers, len(base.model.layers))
    units = [(layer, (kind,)) for layer in layers for kind in kinds] if args.per_kind else [(layer, kinds) for layer in layers]
    base_logits = _cached(ev.model_logits(base.model))
    print(f"seeddelta sweep: {model_path}, {len(units)} unit(s), {windows.n_chunk} window(s) of {windows.n_ctx}, "
          f"{windows.n_scored} scored", file=sys.stderr)
    rows = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="seeddelta-sweep-") as tmp:
        out_dir = Path(args.keep) if args.keep else Path(tmp)
        out_dir.mkdir(parents=True, exist_ok=True)
        for n, (layer, unit_kinds) in enumerate(units, 1):
            label = f"blk.{layer}" + (f".{unit_kinds[0]}" if args.per_kind else "")
            path = out_dir / f"{label}.gguf"
            opts = BuildOptions(input=str(model_path), output=str(path), layers=str(layer), strip_dense=True,
                                progress=False, **encoding_options(args))
            result = run_build(opts, _only(opts, unit_kinds))
            cand = ev.load(path, mode="sparse")
            s = ev.kl_divergence(base_logits, ev.model_logits(cand.model), windows).summary()
            rows.append({"layer": layer, "kinds": list(unit_kinds), "delta_nll": s["delta_nll"]["mean"], "delta_nll_se": s["delta_nll"]["se"],
                         "ppl_ratio": s["ppl_ratio"], "kld_mean": s["kld"]["mean"], "kld_p99": s["kld"]["p99"],
                         "same_top_p": s["same_top_p"]["mean"],
                         "bytes_saved": result.bytes_stripped - result.bytes_added})
            del cand
            if not args.keep:
                os.unlink(path)
            print(f"[{n}/{len(units)}] {label}: ΔNLL {rows[-1]['delta_nll']:+.5f}  "
                  f"{time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
    _print(rows)
    if args.json:
        write_json_atomic(args.json, {
            "model": str(model_path), "text": str(text_path), "ctx": windows.n_ctx, "chunks": windows.n_chunk,
            "encoding": encoding_options(args), "kinds": list(kinds), "per_kind": bool(args.per_kind), "layers": rows,
            "method": "per layer: a file with only that layer's FFN weights as SeedΔ (dense stripped), sparse runtime, "
                      "against the dense base on the same llama-perplexity windows; delta_nll = mean paired "
                      "NLL_model - NLL_base = ln(PPL ratio)"})
    return 0


def _label(r: dict[str, Any]) -> str:
    return f"blk.{r['layer']}" + (f".{r['kinds'][0]}" if len(r["kinds"]) == 1 else "")


def _print(rows: list[dict[str, Any]]) -> None:
    width = max(len(_label(r)) for r in rows) + 2
    print(f"{'unit':<{width}}{'ΔNLL':>10}{'± se':>9}{'PPL ratio':>11}{'KLD mean':>10}{'KLD p99':>9}{'same top':>10}{'bytes saved':>13}")
    for r in rows:
        print(f"{_label(r):<{width}}{r['delta_nll']:+10.5f}{r['delta_nll_se']:9.5f}{r['ppl_ratio']:11.4f}"
              f"{r['kld_mean']:10.5f}{r['kld_p99']:9.4f}{r['same_top_p']:10.2%}{r['bytes_saved']:13,}")
    order = sorted(rows, key=lambda r: r["delta_nll"])
    print("safest first: " + ", ".join(_label(r) for r in order))
