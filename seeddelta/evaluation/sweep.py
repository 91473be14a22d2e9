"""One unit at a time (the user's B2), then the safest units together (B3/B4): where SeedΔ is safe.

A unit is a layer (its chosen FFN tensors) or one (layer, tensor), each at the encoding's K or at a
K of its own. Each unit is measured by building a file with exactly that unit's weights as SeedΔ
(dense stripped) and comparing it with the dense base on the same windows in the sparse runtime
(and, when asked, running the greedy pack on it); the base's logits and greedy answers are
computed once for all units. One unit's figures therefore equal `build --layers L` followed by
`kld` of that file.

`UnitMeasure.run(pairs)` is a pure function of (model, windows, encoding, greedy settings, the
tensors and their K); `UnitMeasure.spec(pairs)` names exactly those inputs, and its `unit_key`
is the key of the on-disk cache (`evaluation.unit_cache`), so scans and autogate runs resume
after an interruption and units can be computed anywhere that shares the cache directory."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from seeddelta.builder.options import BuildOptions, Resolver, baseline_resolver
from seeddelta.builder.pipeline import run_build
from seeddelta.errors import SeedDeltaError
from seeddelta.evaluation.greedy import DEFAULT_MAX_NEW, PackItem, run_pack, verdict
from seeddelta.evaluation.memory import Loaded, load
from seeddelta.evaluation.scoring import Logits, kl_divergence, model_logits
from seeddelta.evaluation.unit_cache import UnitCache, unit_key, unit_spec
from seeddelta.evaluation.windows import Windows
from seeddelta.gguf_format.schema import KINDS

CACHE_LIMIT_BYTES = 2 << 30  # above this the base's logits are recomputed for every unit instead

Pair = tuple[int, str]  # (layer, kind)
Progress = Callable[[str], None]
# Encoding flags that do not change the encoded tensors (left out of cache keys).
NOT_ENCODING = ("input", "output", "layers", "threads", "progress", "report_json", "policy", "policy_strict",
                "policy_export", "deterministic_report", "overwrite_existing", "strip_dense", "K", "K_gate", "K_up",
                "K_down")
# Report fields kept per encoded tensor in a unit's result (what a scan reads).
ENTRY_FIELDS = ("layer", "kind", "n_in", "n_out", "K_budget", "K", "block", "has_w", "has_x", "ops_ratio",
                "rel_l2_mean", "rel_l2_p95", "cos_mean", "cos_p05", "norm_ratio_mean",
                "rel_l2_mean_w", "rel_l2_p95_w", "cos_mean_w", "cos_p05_w", "norm_ratio_mean_w",
                "rel_l2_mean_x", "rel_l2_p95_x", "cos_mean_x", "cos_p05_x", "norm_ratio_mean_x",
                "rel_l2_mean_x_w", "rel_l2_p95_x_w", "cos_mean_x_w", "cos_p05_x_w", "norm_ratio_mean_x_w",
                "ffn_score", "ffn_proxy_available", "ffn_proxy_reason", "ffn_proxy_cos_mean", "ffn_proxy_cos_p05",
                "ffn_proxy_l2_mean", "ffn_proxy_l2_p95", "ffn_proxy_log_norm_ratio_mean",
                "ffn_proxy_log_norm_ratio_p95", "dense_type", "bytes_dense", "bytes_seeddelta", "bits_per_weight")
# The figures the sweep reports per unit (its JSON rows: unchanged by the additions above).
SWEEP_FIELDS = ("delta_nll", "delta_nll_se", "ppl_ratio", "kld_mean", "kld_p99", "same_top_p", "bytes_saved")


@dataclass(frozen=True)
class GreedySettings:
    """The greedy pack a unit is also judged by: the prompts (with the pack file's hash for the key),
    the accuracy tolerance against the base, and the decoding budget."""

    items: tuple[PackItem, ...]
    pack_sha256: str
    tolerance: float
    max_new: int = DEFAULT_MAX_NEW

    def spec(self) -> dict[str, Any]:
        return {"pack_sha256": self.pack_sha256, "ids": [it.id for it in self.items], "tolerance": self.tolerance,
                "max_new": self.max_new}


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
    memo: dict[bytes, torch.Tensor] = {}

    def run(window: np.ndarray, first: int) -> torch.Tensor:
        key = window.tobytes() + first.to_bytes(4, "little")
        if key not in memo:
            memo[key] = fn(window, first)
        return memo[key]

    return run


def only(opts: BuildOptions, chosen: frozenset[Pair], ks: Mapping[Pair, int] | None = None) -> Resolver:
    """The baseline configuration with every tensor outside `chosen` left dense; `ks` gives tensors
    a K of their own (default: the encoding's K of their kind)."""
    baseline = baseline_resolver(opts)
    ks = ks or {}

    def resolve(layer: int, kind: str) -> Any:
        cfg = replace(baseline(layer, kind), enabled=(layer, kind) in chosen)
        return replace(cfg, K=ks[(layer, kind)]) if (layer, kind) in ks else cfg

    return resolve


def windows_sha256(windows: Windows) -> str:
    """Hash of exactly what is scored: the window inputs (BOS included), targets and first scored position."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(windows.inputs, dtype=np.int64).tobytes())
    h.update(np.ascontiguousarray(windows.targets, dtype=np.int64).tobytes())
    h.update(int(windows.first).to_bytes(8, "little"))
    return h.hexdigest()


def encoding_spec(encoding: BuildOptions) -> dict[str, Any]:
    """The encoding flags that change the encoded tensors; an imatrix by its SHA-256, not its path."""
    from seeddelta.assets import sha256_file

    out: dict[str, Any] = {}
    for name, value in sorted(vars(encoding).items()):
        if name in NOT_ENCODING:
            continue
        if name == "imatrix" and value is not None:
            value = "sha256:" + sha256_file(value)
        out[name] = value
    return out


class UnitMeasure:
    """Build a file with exactly the chosen tensors as SeedΔ (dense stripped) and compare it with the
    base on the windows; the base's logits (and greedy answers) are computed once for all measurements."""

    def __init__(self, model_path: Path, base: Loaded, windows: Windows, encoding: BuildOptions, out_dir: Path,
                 *, keep_files: bool = False, note: Progress | None = None, greedy: GreedySettings | None = None,
                 cache: UnitCache | None = None, engine: str = "torch", threads: int = 0) -> None:
        self.model_path, self.windows, self.encoding, self.out_dir = model_path, windows, encoding, out_dir
        self.keep_files = keep_files
        self.base, self.greedy, self.cache = base, greedy, cache or UnitCache(None)
        self.engine, self.threads = engine, threads
        self._base_greedy: dict[str, Any] | None = None
        self._spec_base: dict[str, Any] | None = None
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
        """The sweep's figures of a unit at the encoding's K (SWEEP_FIELDS), through the cache."""
        ks = {pair: self.encoding.kind_K(pair[1]) for pair in chosen}
        result = self.measure(ks, name)
        return {k: result[k] for k in SWEEP_FIELDS}

    def spec(self, ks: Mapping[Pair, int]) -> dict[str, Any]:
        """Everything the figures of these tensors at these K depend on (the cache key's inputs)."""
        if self._spec_base is None:
            from seeddelta.assets import sha256_file

            evaluation: dict[str, Any] = {
                "windows_sha256": windows_sha256(self.windows), "ctx": self.windows.n_ctx,
                "chunks": self.windows.n_chunk, "runtime": "sparse" if self.engine == "torch" else self.engine,
                "strip_dense": True,
                "greedy": self.greedy.spec() if self.greedy is not None else None,
            }
            self._spec_base = {"model_sha256": sha256_file(self.model_path), "encoding": encoding_spec(self.encoding),
                               "evaluation": evaluation}
        return unit_spec(unit=[(layer, kind, K) for (layer, kind), K in ks.items()], **self._spec_base)

    def measure(self, ks: Mapping[Pair, int], name: str) -> dict[str, Any]:
        """`run` through the cache: a unit already measured with the same inputs is read back."""
        if self.cache.directory is None:
            return {**self.run(ks, name), "cached": False}
        spec = self.spec(ks)
        key = unit_key(spec)
        cached = self.cache.get(key)
        if cached is not None:
            return {**cached, "cached": True}
        result = self.run(ks, name)
        self.cache.put(key, spec, result)
        return {**result, "cached": False}

    def base_greedy(self) -> dict[str, Any]:
        if self._base_greedy is None:
            assert self.greedy is not None
            self._base_greedy = run_pack(self.base.model, self.base.tokenizer, self.greedy.items, self.greedy.max_new)
        return self._base_greedy

    def run(self, ks: Mapping[Pair, int], name: str) -> dict[str, Any]:
        """Build the unit's file (these tensors at these K, dense stripped), compare it with the base and
        (with greedy settings) run the pack on it; a pure function of the unit and the settings."""
        chosen = frozenset(ks)
        path = self.out_dir / f"{name}.gguf"
        # every layer visited (the others disabled): the same file, keys included, as `build --policy` of a
        # policy enabling exactly these tensors
        opts = replace(self.encoding, input=str(self.model_path), output=str(path), layers=None, strip_dense=True,
                       progress=False)
        return self._evaluate(path, run_build(opts, only(opts, chosen, ks)))

    def run_policy(self, policy: str | os.PathLike[str], name: str) -> dict[str, Any]:
        """The same figures for the file `build --policy` makes with the encoding's flags (not cached:
        the key would have to hold the policy's resolution)."""
        path = self.out_dir / f"{name}.gguf"
        from seeddelta.policy.build import build

        opts = replace(self.encoding, input=str(self.model_path), output=str(path), policy=os.fspath(policy),
                       progress=False)
        return self._evaluate(path, build(opts))

    def _evaluate(self, path: Path, result: Any) -> dict[str, Any]:
        cand = load(path, mode="sparse", engine=self.engine, n_ctx=self.windows.n_ctx, threads=self.threads)
        s = kl_divergence(self.base_logits, model_logits(cand.model), self.windows).summary()
        out: dict[str, Any] = {
            "delta_nll": s["delta_nll"]["mean"], "delta_nll_se": s["delta_nll"]["se"], "ppl_ratio": s["ppl_ratio"],
            "kld_mean": s["kld"]["mean"], "kld_se": s["kld"]["se"], "kld_p99": s["kld"]["p99"],
            "same_top_p": s["same_top_p"]["mean"], "bytes_saved": result.bytes_stripped - result.bytes_added,
            "input_bytes": result.input_bytes, "file_bytes": result.output_bytes,
            "weights": [{k: e[k] for k in ENTRY_FIELDS} for e in result.report["weights"] if e["emit"]],
        }
        if self.greedy is not None:
            base = self.base_greedy()
            res = run_pack(cand.model, cand.tokenizer, self.greedy.items, self.greedy.max_new)
            v = verdict(res, base, self.greedy.tolerance)
            out["greedy"] = {"result": v["result"], "reasons": v["reasons"], "accuracy": res["accuracy"],
                             "base_accuracy": base["accuracy"], "flagged": res["flagged"], "n": res["n"],
                             "tolerance": self.greedy.tolerance}
        del cand
        if not self.keep_files:
            os.unlink(path)
        return out


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
