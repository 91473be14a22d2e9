"""One unit at a time (the user's B2), then the safest units together (B3/B4): where SeedΔ is safe.

A unit is a layer (its chosen FFN tensors) or one (layer, tensor). Each unit is measured by building
a file with exactly that unit's weights as SeedΔ (dense stripped) and comparing it with the dense
base on the same windows in the sparse runtime; the base's logits are computed once for all units.
One unit's figures therefore equal `build --layers L` followed by `kld` of that file."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from seeddelta.builder.options import BuildOptions, Resolver, baseline_resolver
from seeddelta.builder.pipeline import run_build
from seeddelta.errors import SeedDeltaError
from seeddelta.evaluation.memory import Loaded, load
from seeddelta.evaluation.scoring import Logits, kl_divergence, model_logits
from seeddelta.evaluation.windows import Windows
from seeddelta.gguf_format.schema import KINDS

CACHE_LIMIT_BYTES = 2 << 30  # above this the base's logits are recomputed for every unit instead

Pair = tuple[int, str]  # (layer, kind)
Progress = Callable[[str], None]


@dataclass(frozen=True)
class Unit:
    layer: int
    kinds: tuple[str, ...]

    @property
    def label(self) -> str:
        return f"blk.{self.layer}" + (f".{self.kinds[0]}" if len(self.kinds) == 1 else "")

    @property
    def pairs(self) -> frozenset[Pair]:
        return frozenset((self.layer, k) for k in self.kinds)


def parse_kinds(spec: str) -> tuple[str, ...]:
    """'gate,down' -> ('ffn_gate', 'ffn_down') in canonical order."""
    names = [k.strip() for k in spec.split(",") if k.strip()]
    bad = [k for k in names if f"ffn_{k}" not in KINDS]
    if bad or not names:
        raise SeedDeltaError(f"--kinds: expected a list of gate, up, down; got {spec!r}")
    return tuple(f"ffn_{k}" for k in ("gate", "up", "down") if k in names)


def make_units(layers: Sequence[int], kinds: tuple[str, ...], per_kind: bool) -> list[Unit]:
    if per_kind:
        return [Unit(layer, (kind,)) for layer in layers for kind in kinds]
    return [Unit(layer, kinds) for layer in layers]


def _cached(fn: Logits) -> Logits:
    """The base's logits per window, computed once (windows are keyed by their token bytes)."""
    memo: dict[bytes, Any] = {}

    def run(window: np.ndarray, first: int) -> Any:
        key = window.tobytes() + first.to_bytes(4, "little")
        if key not in memo:
            memo[key] = fn(window, first)
        return memo[key]

    return run


def only(opts: BuildOptions, chosen: frozenset[Pair]) -> Resolver:
    """The baseline configuration with every tensor outside `chosen` left dense."""
    baseline = baseline_resolver(opts)
    return lambda layer, kind: replace(baseline(layer, kind), enabled=(layer, kind) in chosen)


class UnitMeasure:
    """Build a file with exactly the chosen tensors as SeedΔ (dense stripped) and compare it with the
    base on the windows; the base's logits are computed once for all measurements."""

    def __init__(self, model_path: Path, base: Loaded, windows: Windows, encoding: BuildOptions, out_dir: Path,
                 *, keep_files: bool = False, note: Progress | None = None, engine: str = "torch",
                 threads: int = 0) -> None:
        self.model_path, self.windows, self.encoding, self.out_dir = model_path, windows, encoding, out_dir
        self.keep_files = keep_files
        self.engine, self.threads = engine, threads
        logits = model_logits(base.model)
        cache_bytes = windows.n_scored * base.model.config.n_vocab * 4  # float32 logits of every scored position
        if cache_bytes <= CACHE_LIMIT_BYTES:
            self.base_logits = _cached(logits)
        else:
            if note is not None:
                note(f"note: the base's logits would take {cache_bytes / 2**30:.1f} GiB; recomputing them for "
                     "every unit (fewer --chunks caches them)")
            self.base_logits = logits

    def __call__(self, chosen: frozenset[Pair], name: str) -> dict[str, Any]:
        path = self.out_dir / f"{name}.gguf"
        layers = ",".join(str(layer) for layer in sorted({layer for layer, _ in chosen}))
        opts = replace(self.encoding, input=str(self.model_path), output=str(path), layers=layers, strip_dense=True,
                       progress=False)
        result = run_build(opts, only(opts, chosen))
        cand = load(path, mode="sparse", engine=self.engine, n_ctx=self.windows.n_ctx, threads=self.threads)
        s = kl_divergence(self.base_logits, model_logits(cand.model), self.windows).summary()
        del cand
        if not self.keep_files:
            os.unlink(path)
        return {"delta_nll": s["delta_nll"]["mean"], "delta_nll_se": s["delta_nll"]["se"], "ppl_ratio": s["ppl_ratio"],
                "kld_mean": s["kld"]["mean"], "kld_p99": s["kld"]["p99"], "same_top_p": s["same_top_p"]["mean"],
                "bytes_saved": result.bytes_stripped - result.bytes_added}


def safest_first(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(rows, key=lambda r: (r["delta_nll"], r["layer"]))


def row_label(row: dict[str, Any]) -> str:
    return Unit(row["layer"], tuple(row["kinds"])).label


def sweep_units(measure: UnitMeasure, units: Sequence[Unit], progress: Progress | None = None) -> list[dict[str, Any]]:
    """Each unit alone: its row (layer, kinds and the measured figures), in the order given."""
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for n, unit in enumerate(units, 1):
        row: dict[str, Any] = {"layer": unit.layer, "kinds": list(unit.kinds)}
        row.update(measure(unit.pairs, unit.label))
        rows.append(row)
        if progress is not None:
            progress(f"[{n}/{len(units)}] {unit.label}: ΔNLL {row['delta_nll']:+.5f}  {time.perf_counter() - t0:.1f}s")
    return rows


def stack_units(measure: UnitMeasure, rows: list[dict[str, Any]], progress: Progress | None = None) -> list[dict[str, Any]]:
    """The safest units together, one more at each step (step n: the n safest units)."""
    stack: list[dict[str, Any]] = []
    chosen: set[Pair] = set()
    t0 = time.perf_counter()
    for n, unit in enumerate(safest_first(rows), 1):
        chosen |= {(unit["layer"], k) for k in unit["kinds"]}
        step: dict[str, Any] = {"step": n, "added": row_label(unit)}
        step.update(measure(frozenset(chosen), f"stack{n}"))
        stack.append(step)
        if progress is not None:
            progress(f"[stack {n}/{len(rows)}] + {step['added']}: ΔNLL {step['delta_nll']:+.5f}  "
                     f"{time.perf_counter() - t0:.1f}s")
    return stack
