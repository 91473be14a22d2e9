"""Autogate's loop: add one candidate at a time, re-evaluate the WHOLE selection, keep it only if the
limits still hold.

Every step builds a file with the selection so far plus the step's move (dense stripped, the scan's
encoding), measures it against the dense base on the same windows (paired ΔNLL ± se, KLD) and runs
the greedy pack on it with the compressed weights in use, exactly as `UnitMeasure` does for one
unit — so the last kept step's figures are what `build --policy` + `kld` + `greedy` of the output
policy measure. A step is kept iff ΔNLL + se_margin·se <= max_delta_nll, KLD mean <= max_kld (when
set) and the greedy pack PASSes (when on). Every step is recorded with the scan figures it read and
the figures it measured; a step whose evaluation raises or returns incomplete figures fails the
run (the original counted missing results as a pass). Steps are cached like units (same key
scheme), so an interrupted run resumes.

With a retention cap (`caps`: each scan unit's capped K, policy.autogate.retention_caps) a step builds
and measures every selected tensor at its capped K; the record's `selection` (what the policy holds)
is at the capped K too, each step giving both K (the scan's) and `K_built`.

The loop stops when the byte target is reached (bytes the evaluated GGUF file is smaller), when no move
is left, or — with only --max-tensors — when no move can add or upgrade a tensor any more.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from seeddelta.errors import SeedDeltaError
from seeddelta.evaluation.sweep import UnitMeasure
from seeddelta.policy.autogate import Filters, Move, MoveQueue, Scan, Tensor, candidates, gap_conflict

Progress = Callable[[str], None]
FIGURES = ("delta_nll", "delta_nll_se", "ppl_ratio", "kld_mean", "kld_se", "kld_p99", "same_top_p", "bytes_saved",
           "input_bytes", "file_bytes")


@dataclass(frozen=True)
class Limits:
    max_delta_nll: float = 0.01
    max_kld: float | None = None
    se_margin: float = 0.0  # keep only if ΔNLL + se_margin·se <= max_delta_nll
    greedy: bool = True


@dataclass(frozen=True)
class Budget:
    max_tensors: int | None = None
    target_bytes: int | None = None  # bytes the GGUF file must shrink by


def judge(figures: Mapping[str, Any], limits: Limits) -> str:
    """'' when the figures meet the limits, else every reason they do not."""
    reasons = []
    bound = figures["delta_nll"] + limits.se_margin * figures["delta_nll_se"]
    if bound > limits.max_delta_nll:
        what = "ΔNLL" if limits.se_margin == 0 else f"ΔNLL + {limits.se_margin:g}·se"
        reasons.append(f"{what} {bound:+.5f} > {limits.max_delta_nll:g}")
    if limits.max_kld is not None and figures["kld_mean"] > limits.max_kld:
        reasons.append(f"KLD mean {figures['kld_mean']:.5f} > {limits.max_kld:g}")
    if limits.greedy and figures["greedy"]["result"] != "PASS":
        reasons.append("greedy FAIL: " + "; ".join(figures["greedy"]["reasons"]))
    return "; ".join(reasons)


def _complete(figures: Mapping[str, Any], limits: Limits) -> str:
    """What is missing or not finite in a step's figures ('' when complete)."""
    for name in FIGURES:
        value = figures.get(name)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            return f"{name} is {value!r}"
    if limits.greedy and not isinstance(figures.get("greedy"), dict):
        return "no greedy result"
    return ""


def _label(tensor: Tensor) -> str:
    return f"blk.{tensor[0]}.{tensor[1]}"


def run_autogate(measure: UnitMeasure, scan: Scan, filters: Filters, limits: Limits, budget: Budget,
                 progress: Progress | None = None,
                 caps: Mapping[tuple[int, str, int], int] | None = None) -> dict[str, Any]:
    """The incremental loop; returns the run's record (selection, steps, final figures, stop reason)."""

    def built(sel: Mapping[Tensor, int]) -> dict[Tensor, int]:
        return dict(sel) if caps is None else {t: caps[(t[0], t[1], K)] for t, K in sel.items()}

    moves, refused = candidates(scan, filters)
    queue = MoveQueue(by_bytes=budget.target_bytes is not None, moves=moves)
    selection: dict[Tensor, int] = {}
    final: dict[str, Any] | None = None
    steps: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    stopped = "no candidate left"

    def note(message: str) -> None:
        if progress is not None:
            progress(f"[step {len(steps)}] {message}  {time.perf_counter() - t0:.1f}s")

    while True:
        if budget.target_bytes is not None and final is not None and final["file_saved"] >= budget.target_bytes:
            stopped = f"byte target reached ({final['file_saved']:,} >= {budget.target_bytes:,} B saved)"
            break
        full = budget.max_tensors is not None and len(selection) >= budget.max_tensors
        item = queue.pop()
        if item is None:
            break
        move, index = item
        step: dict[str, Any] = {"step": len(steps) + 1, "move": "add" if move.from_K is None else "upgrade",
                                "layer": move.tensor[0], "kind": move.tensor[1], "K": move.K, "from_K": move.from_K,
                                "scan": move.scan_figures(), "evaluated": False}
        if caps is not None:
            step["K_built"] = caps[(*move.tensor, move.K)]
        skip = _structural(move, selection, filters, budget, full)
        if skip:
            step.update(kept=False, reason=skip)
            steps.append(step)
            note(f"{_label(move.tensor)} K={move.K}: skipped ({skip})")
            continue
        trial = {**selection, move.tensor: move.K}
        figures = _evaluate(measure, built(trial), step["step"], move, limits)
        reason = judge(figures, limits)
        step.update(evaluated=True, cached=figures.pop("cached"), figures=figures, kept=not reason,
                    reason=reason or "within the limits",
                    selection=[[layer, kind, K] for (layer, kind), K in sorted(built(trial).items())])
        steps.append(step)
        note(f"{step['move']} {_label(move.tensor)} K={move.K}: ΔNLL {figures['delta_nll']:+.5f} ± "
             f"{figures['delta_nll_se']:.5f}, KLD {figures['kld_mean']:.5f}, "
             f"greedy {figures.get('greedy', {}).get('result', '-')}, {figures['bytes_saved']:,} B saved: "
             + ("kept" if not reason else f"rejected ({reason})"))
        if not reason:
            selection, final = trial, figures
            queue.kept(move, index)
    return {
        "filters": {**asdict(filters), "band": sorted(filters.band) if filters.band is not None else None},
        "limits": asdict(limits), "budget": asdict(budget),
        "candidates": {_label(t): [{"K": m.K, "from_K": m.from_K, **m.scan_figures()} for m in ms]
                       for t, ms in moves.items()},
        "refused": refused, "steps": steps, "stopped": stopped,
        "selection": [[layer, kind, K] for (layer, kind), K in sorted(built(selection).items())],
        "final": final,
        "budget_met": None if budget.target_bytes is None else bool(final and final["file_saved"] >= budget.target_bytes),
    }


def _structural(move: Move, selection: Mapping[Tensor, int], filters: Filters, budget: Budget, full: bool) -> str:
    """Why a move cannot be tried at all ('' when it can): the tensor budget, the layer gap."""
    if move.from_K is not None:
        return ""
    if full:
        return f"--max-tensors {budget.max_tensors} reached"
    other = gap_conflict(move.tensor[0], {layer for layer, _ in selection}, filters.min_gap)
    if other is not None:
        return f"--min-gap {filters.min_gap}: layer {other} is selected"
    return ""


def _evaluate(measure: UnitMeasure, trial: Mapping[Tensor, int], n: int, move: Move, limits: Limits) -> dict[str, Any]:
    where = f"step {n} ({move.tensor[1]} of layer {move.tensor[0]} at K={move.K})"
    try:
        result = measure.measure(dict(trial), f"autogate_step{n}")
    except SeedDeltaError as exc:
        raise SeedDeltaError(f"{where}: evaluation failed: {exc}", exit_code=1) from None
    missing = _complete(result, limits)
    if missing:
        raise SeedDeltaError(f"{where}: evaluation incomplete ({missing}); the run stops rather than count it as a pass",
                             exit_code=1)
    figures = {k: result[k] for k in FIGURES}
    figures["file_saved"] = result["input_bytes"] - result["file_bytes"]  # the GGUF's size, keys included
    figures["saving"] = figures["file_saved"] / result["input_bytes"]
    figures["cached"] = result["cached"]
    if "greedy" in result:
        figures["greedy"] = result["greedy"]
    return figures
