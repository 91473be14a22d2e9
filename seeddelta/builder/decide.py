"""The decide phase: which K each weight gets, and whether it is written at all.

Per weight, in build order (layers ascending, kinds gate, up, down — Appendix A.3):

1. the thresholds are tightened by the **stack guard** (A.4) when gating is on: after 3 emitted
   tensors of its group (gate+up share one count, down has its own) +0.05 each, from 8 on at
   least 0.60/0.45 (gate, up) or 0.35/0.25 (down);
2. the K schedule is tried in order — one K, or the policy's autotune schedule — and the first
   K whose trial passes gating is taken; if none passes, the weight stays dense and its entry is
   the best trial (highest gating value), decision `gating_fail` / `metric_unavailable`, or
   `autotune_failed_keep_dense` when autotune was on;
3. the **stack cost** max(0, τ_mean − value) + max(0, τ_p05 − p05) of an emitted weight (τ = the
   thresholds of step 1) is added to the running total unless the total would exceed
   `--stack-cost-cap`; then the weight is rejected (`stack_cost_cap`) and — unlike the original,
   whose rejected tensors stayed in the total and so rejected every later tensor (spec-policy-eval
   §11 item 21, spec-builder-runtime §7.1) — its cost is not counted.

Trials (one weight encoded at one K and measured) are computed by workers (builder.workers:
processes, or threads) ahead of the decisions; the decisions themselves are taken one weight at a
time in build order, and every trial is a deterministic function of its inputs, so the outcome never
depends on which worker computed what, or when.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, TextIO

from threadpoolctl import threadpool_limits

from seeddelta.builder.encode import Trial, WeightResult, attempt_record, gate_trial, weight_result
from seeddelta.builder.options import BuildOptions, TensorConfig
from seeddelta.builder.spill import SpillFile
from seeddelta.builder.workers import TrialPool
from seeddelta.gguf_format.imatrix_file import Imatrix
from seeddelta.gguf_format.reader import GGUFModel

# Stack guard of the original (Appendix A.4): (count from which it applies, floors per group).
GUARD_STRICT_FROM = 8
GUARD_STRICT_FLOORS = {"gate_up": (0.60, 0.45), "down": (0.35, 0.25)}
GUARD_TIGHTEN_FROM = 3
GUARD_TIGHTEN_BY = 0.05

Task = tuple[int, str, TensorConfig]


@dataclass
class StackState:
    """Tensors emitted so far in this build (per group) and their running stack cost."""

    gate_up: int = 0
    down: int = 0
    running_cost: float = 0.0

    def thresholds(self, kind: str, cfg: TensorConfig) -> tuple[float, float]:
        """(min_mean, min_p05) for the next weight of `kind`, after the stack guard (gating on only)."""
        mean, p05 = cfg.min_mean, cfg.min_p05
        if not cfg.gating_enabled:
            return mean, p05
        group = "down" if kind == "ffn_down" else "gate_up"
        n = self.down if group == "down" else self.gate_up
        if n >= GUARD_STRICT_FROM:
            floor_mean, floor_p05 = GUARD_STRICT_FLOORS[group]
            return max(mean, floor_mean), max(p05, floor_p05)
        if n >= GUARD_TIGHTEN_FROM:
            return mean + GUARD_TIGHTEN_BY, p05 + GUARD_TIGHTEN_BY
        return mean, p05

    def count(self, kind: str) -> None:
        if kind == "ffn_down":
            self.down += 1
        else:
            self.gate_up += 1


def stack_cost(gating: dict[str, Any]) -> float:
    """max(0, τ_mean − value) + max(0, τ_p05 − p05) against the trial's (stack-adjusted) thresholds."""
    value, p05 = gating["gating_value"], gating["gating_p05"]
    if not (math.isfinite(value) and math.isfinite(p05)):
        return 0.0
    return max(0.0, gating["gating_min_mean"] - value) + max(0.0, gating["gating_min_p05"] - p05)


def decide_weight(model: GGUFModel, opts: BuildOptions, task: Task, pool: TrialPool, state: StackState,
                  *, policy_fields: bool) -> WeightResult:
    """Try the weight's K schedule, take the first passing K (or keep it dense), apply the stack cap."""
    layer, kind, cfg = task
    thresholds = state.thresholds(kind, cfg)
    schedule = cfg.k_schedule()
    attempts: list[dict[str, Any]] = []
    attempt_seconds: list[float] = []
    best: tuple[Trial, dict[str, Any]] | None = None
    last: tuple[Trial, dict[str, Any]] | None = None
    chosen: tuple[Trial, dict[str, Any]] | None = None
    for K in schedule:
        trial = pool.get(layer, kind, cfg, K)
        gating = gate_trial(cfg, kind, trial.metrics, thresholds)
        attempts.append(attempt_record(trial, gating))
        attempt_seconds.append(trial.seconds)
        if gating["available"] and (best is None or gating["gating_value"] > best[1]["gating_value"]):
            best = (trial, gating)
        last = (trial, gating)
        if cfg.enabled and gating["gating_pass"]:
            chosen = (trial, gating)
            break
    assert last is not None
    if chosen is not None:
        trial, gating = chosen
        emit, decision = True, gating["decision"]
    else:
        trial, gating = best if best is not None else last
        emit = False
        decision = "autotune_failed_keep_dense" if cfg.autotune else gating["decision"]

    delta = stack_cost(gating) if emit else 0.0
    if emit and state.running_cost + delta > opts.stack_cost_cap:
        emit, decision = False, "stack_cost_cap"
    if emit:
        state.running_cost += delta
        state.count(kind)
    extra: dict[str, Any] = {"stack_cost_delta": delta, "stack_cost_total": state.running_cost}
    if policy_fields:
        enc = trial.encoding
        extra.update(base_kind=enc.base, row_scale=enc.row_scale, delta_norm_clamp=enc.delta_norm_clamp)
    result = weight_result(model, opts, cfg, trial, gating, emit=emit, decision=decision,
                           attempts=attempts if cfg.autotune else None, seconds=sum(attempt_seconds), extra=extra)
    if cfg.autotune:
        result.attempt_seconds = attempt_seconds
    return result


class _Progress:
    """A tqdm bar on `stream` (none when it is not a terminal, or without a stream: -q — then tqdm is
    not even imported: its import alone costs a build of a small model a few percent)."""

    def __init__(self, total: int, stream: TextIO | None) -> None:
        self.bar: Any = None
        if stream is not None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc="encoding", unit="weight", file=stream, leave=False, dynamic_ncols=True,
                            disable=None)

    def step(self, label: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(label, refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def decide_all(model: GGUFModel, opts: BuildOptions, tasks: list[Task], imatrix: Imatrix | None, log: TextIO,
               *, policy_fields: bool = False, spill: SpillFile | None = None) -> dict[tuple[int, str], WeightResult]:
    """Decide every planned weight in build order (trials encoded ahead by workers, at most two per
    worker ahead of the decisions, so memory holds a few weights whatever the model's size).
    `spill`: where each decided weight's tensors go at once (the builder's spill file) instead of
    staying in memory until the write; worker processes are used only with it (they park there)."""
    threads = opts.threads or (os.cpu_count() or 1)
    workers = min(threads, max(1, len(tasks)))
    state = StackState()
    decided: dict[tuple[int, str], WeightResult] = {}
    progress = _Progress(len(tasks), log if opts.progress else None)
    # The workers are the parallelism: a BLAS call's own threads (the metrics' small products) would
    # only wait for cores the workers hold — 30 ms per call measured on a busy 2-core machine. Set
    # before the pool starts: forked worker processes inherit the limit.
    blas = threadpool_limits(limits=1, user_api="blas")
    pool: TrialPool | None = None
    ahead = 2 * workers
    try:
        pool = TrialPool(model, opts, imatrix, workers, spill)
        for i, task in enumerate(tasks):
            for layer, kind, cfg in tasks[i : i + ahead]:
                pool.prefetch(layer, kind, cfg, cfg.k_schedule()[0])
            res = decide_weight(model, opts, task, pool, state, policy_fields=policy_fields)
            if spill is not None:  # every tensor, a variant's quantized base (RawTensor) included
                res.tensors = [spill.park(t[0], t[1]) if isinstance(t, tuple) else t for t in res.tensors]
            decided[(res.layer, res.kind)] = res
            progress.step(f"blk.{res.layer}.{res.kind}")
    finally:
        progress.close()  # also on Ctrl-C: the next line starts on a line of its own
        if pool is not None:
            pool.close()
        blas.restore_original_limits()
    return decided
