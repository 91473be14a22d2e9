"""`seeddelta sweep`: one layer at a time (the user's B2), which layers and tensors take SeedΔ.

For every swept layer (or, with --per-kind, every layer and FFN tensor) a SeedΔ file is built with
that unit alone encoded (the encoding flags of `seeddelta build`, dense weights stripped) and compared
with the base on the same windows, as `seeddelta kld` does: paired ΔNLL ± se, mean and p99 KLD,
same top-1, and the bytes that unit saves. With --stack the units are then encoded together, safest
first, one more at each step (the user's B3/B4: where is the first cliff). The base runs once; its
logits are reused for every measurement.
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

from seeddelta.builder.pipeline import BuildOptions, Resolver, baseline_resolver, run_build
from seeddelta.commands.build import add_encoding_args, encoding_options
from seeddelta.errors import SeedDeltaError
from seeddelta.evaluation import scoring as ev
from seeddelta.gguf_format.schema import KINDS
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
    p.add_argument("--stack", action="store_true",
                   help="then encode the safest units together, adding one at a time (where is the cliff?)")
    p.add_argument("--json", default=None, metavar="PATH", help="write the table as JSON")
    p.add_argument("--keep", default=None, metavar="DIR", help="keep the per-layer SeedΔ files in DIR")
    add_encoding_args(p)
    p.set_defaults(handler=run)


CACHE_LIMIT_BYTES = 2 << 30  # above this the base's logits are recomputed for every unit instead


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


Pair = tuple[int, str]  # (layer, kind)


def _only(opts: BuildOptions, chosen: frozenset[Pair]) -> Resolver:
    """The baseline configuration with every tensor outside `chosen` left dense."""
    baseline = baseline_resolver(opts)
    return lambda layer, kind: replace(baseline(layer, kind), enabled=(layer, kind) in chosen)


class _Measure:
    """Build a file with exactly the chosen tensors as SeedΔ (dense stripped) and compare it with the
    base on the windows; the base's logits are computed once for all measurements."""

    def __init__(self, args: argparse.Namespace, model_path: Path, base: ev.Loaded, windows: ev.Windows,
                 out_dir: Path) -> None:
        self.args, self.model_path, self.windows, self.out_dir = args, model_path, windows, out_dir
        logits = ev.model_logits(base.model)
        cache_bytes = windows.n_scored * base.model.config.n_vocab * 4  # float32 logits of every scored position
        if cache_bytes <= CACHE_LIMIT_BYTES:
            self.base_logits = _cached(logits)
        else:
            print(f"note: the base's logits would take {cache_bytes / 2**30:.1f} GiB; recomputing them for every unit "
                  "(fewer --chunks caches them)", file=sys.stderr)
            self.base_logits = logits

    def __call__(self, chosen: frozenset[Pair], name: str) -> dict[str, Any]:
        path = self.out_dir / f"{name}.gguf"
        layers = ",".join(str(layer) for layer in sorted({layer for layer, _ in chosen}))
        opts = BuildOptions(input=str(self.model_path), output=str(path), layers=layers, strip_dense=True,
                            progress=False, **encoding_options(self.args))
        result = run_build(opts, _only(opts, chosen))
        cand = ev.load(path, mode="sparse")
        s = ev.kl_divergence(self.base_logits, ev.model_logits(cand.model), self.windows).summary()
        del cand
        if not self.args.keep:
            os.unlink(path)
        return {"delta_nll": s["delta_nll"]["mean"], "delta_nll_se": s["delta_nll"]["se"], "ppl_ratio": s["ppl_ratio"],
                "kld_mean": s["kld"]["mean"], "kld_p99": s["kld"]["p99"], "same_top_p": s["same_top_p"]["mean"],
                "bytes_saved": result.bytes_stripped - result.bytes_added}


def run(args: argparse.Namespace) -> int:
    ev.apply_threads(args)
    kinds = _kinds(args.kinds)
    model_path = Path(args.model) if args.model else ev.default_model()
    base = ev.load(model_path, use_seeddelta=False)
    text_path, _, _, windows = ev.text_windows(args, base.tokenizer)
    layers = parse_layers(args.layers, len(base.model.layers))
    units = [(layer, (kind,)) for layer in layers for kind in kinds] if args.per_kind else [(layer, kinds) for layer in layers]
    print(f"seeddelta sweep: {model_path}, {len(units)} unit(s), {windows.n_chunk} window(s) of {windows.n_ctx}, "
          f"{windows.n_scored} scored", file=sys.stderr)
    rows: list[dict[str, Any]] = []
    stack: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="seeddelta-sweep-") as tmp:
        out_dir = Path(args.keep) if args.keep else Path(tmp)
        out_dir.mkdir(parents=True, exist_ok=True)
        measure = _Measure(args, model_path, base, windows, out_dir)
        for n, (layer, unit_kinds) in enumerate(units, 1):
            row: dict[str, Any] = {"layer": layer, "kinds": list(unit_kinds)}
            row.update(measure(frozenset((layer, k) for k in unit_kinds), _label(row)))
            rows.append(row)
            print(f"[{n}/{len(units)}] {_label(row)}: ΔNLL {row['delta_nll']:+.5f}  "
                  f"{time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
        if args.stack:
            chosen: set[Pair] = set()
            for n, unit in enumerate(_safest_first(rows), 1):
                chosen |= {(unit["layer"], k) for k in unit["kinds"]}
                step: dict[str, Any] = {"step": n, "added": _label(unit)}
                step.update(measure(frozenset(chosen), f"stack{n}"))
                stack.append(step)
                print(f"[stack {n}/{len(rows)}] + {step['added']}: ΔNLL {step['delta_nll']:+.5f}  "
                      f"{time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
    _print(rows)
    if stack:
        _print_stack(stack)
    if args.json:
        write_json_atomic(args.json, {
            "model": str(model_path), "text": str(text_path), "ctx": windows.n_ctx, "chunks": windows.n_chunk,
            "encoding": encoding_options(args), "kinds": list(kinds), "per_kind": bool(args.per_kind), "layers": rows,
            "stack": stack,
            "method": "per unit: a file with only that unit's FFN weights as SeedΔ (dense stripped), sparse runtime, "
                      "against the dense base on the same llama-perplexity windows; delta_nll = mean paired "
                      "NLL_model - NLL_base = ln(PPL ratio); stack step n: the n units with the smallest "
                      "delta_nll encoded together"})
    return 0


def _safest_first(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(rows, key=lambda r: (r["delta_nll"], r["layer"]))


def _label(r: dict[str, Any]) -> str:
    return f"blk.{r['layer']}" + (f".{r['kinds'][0]}" if len(r["kinds"]) == 1 else "")


def _print(rows: list[dict[str, Any]]) -> None:
    width = max(len(_label(r)) for r in rows) + 2
    print(f"{'unit':<{width}}{'ΔNLL':>10}{'± se':>9}{'PPL ratio':>11}{'KLD mean':>10}{'KLD p99':>9}{'same top':>10}{'bytes saved':>13}")
    for r in rows:
        print(f"{_label(r):<{width}}{r['delta_nll']:+10.5f}{r['delta_nll_se']:9.5f}{r['ppl_ratio']:11.4f}"
              f"{r['kld_mean']:10.5f}{r['kld_p99']:9.4f}{r['same_top_p']:10.2%}{r['bytes_saved']:13,}")
    print("safest first: " + ", ".join(_label(r) for r in _safest_first(rows)))


def _print_stack(stack: list[dict[str, Any]]) -> None:
    print("\nthe safest units encoded together, one more at each step:")
    width = max(len(r["added"]) for r in stack) + 4
    print(f"{'step':<6}{'+ unit':<{width}}{'ΔNLL':>10}{'± se':>9}{'PPL ratio':>11}{'KLD mean':>10}{'same top':>10}"
          f"{'bytes saved':>13}")
    for r in stack:
        print(f"{r['step']:<6}{r['added']:<{width}}{r['delta_nll']:+10.5f}{r['delta_nll_se']:9.5f}{r['ppl_ratio']:11.4f}"
              f"{r['kld_mean']:10.5f}{r['same_top_p']:10.2%}{r['bytes_saved']:13,}")
