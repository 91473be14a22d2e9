"""The scan: every layer × FFN tensor (× K) encoded alone, with its weight-space and functional
metrics (the original's `seeddelta-layer-scan.py` field names) **and** its measured effect on the
model: paired ΔNLL ± se, KL divergence, same top-1 and the bytes it saves — what autogate ranks.

Each unit goes through `UnitMeasure.measure_all` (evaluation.sweep): a file with only that tensor
as SeedΔ at that K (dense stripped), against the dense base on the same windows, so one unit's
figures equal `build` + `kld` of that unit. Units are independent: they run in this process, in
local worker processes or on a Dask cluster (evaluation.workers) with the same figures. Results
are cached per unit (evaluation.unit_cache), so an interrupted scan resumes where it stopped.

Field names follow the original scan where one exists (spec-policy-eval §5): `S_mean` =
rel_l2_mean, `S_p95` = rel_l2_p95, `cos_mean`, `cos_p05`, `cos_mean_x_w`, `cos_p05_x_w`,
`log_norm_ratio_mean` = ln(norm_ratio_mean), the `ffn_proxy_*` figures and `ffn_proxy_score` =
max(1 − proxy cos_p05, proxy l2_p95, |proxy log_norm_ratio_p95|) (lower is better; null when the
proxy is unavailable — the original wrote 1.0), `raw`. The original's never-computed
`log_norm_ratio_p95` is left out. Ours: the other metric groups (`_w`, `_x`), `ffn_score`,
`K`/`K_eff`, the measured figures, `bytes_dense`/`bytes_seeddelta`, and `delta_nll_per_mb` (ΔNLL
per MB saved: the cost per byte that a byte budget is allocated by), `retention` (the v1 plan's
mechanism 1: cos_mean_x_w min–max scaled to [0, 1] over the units of the same kind and K,
evaluation.retention) and, with a replay pack, `replay_impact` (the unit's KLD/ΔNLL on the pack's
windows, evaluation.replay) and `retention_replay` (mechanism 6: retention lowered where the replay
impact is high, raised where it is low).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from seeddelta.evaluation.replay import impact
from seeddelta.evaluation.retention import (
    REPLAY_BETA,
    RETENTION_FALLBACK,
    RETENTION_METRIC,
    replay_weighted,
    retention,
    retention_metric,
)
from seeddelta.evaluation.sweep import Progress, UnitMeasure
from seeddelta.evaluation.workers import Pool

SCAN_FORMAT = 1
METRIC_COPY = ("cos_mean", "cos_p05", "cos_mean_w", "cos_p05_w", "cos_mean_x", "cos_p05_x", "cos_mean_x_w",
               "cos_p05_x_w", "ffn_score")
PROXY_COPY = ("ffn_proxy_cos_mean", "ffn_proxy_cos_p05", "ffn_proxy_l2_mean", "ffn_proxy_l2_p95",
              "ffn_proxy_log_norm_ratio_mean", "ffn_proxy_log_norm_ratio_p95")
MEASURED = ("delta_nll", "delta_nll_se", "ppl_ratio", "kld_mean", "kld_p99", "same_top_p", "bytes_saved")


@dataclass(frozen=True)
class ScanUnit:
    layer: int
    kind: str
    K: int

    @property
    def label(self) -> str:
        return f"blk.{self.layer}.{self.kind} K={self.K}"


def scan_units(layers: Sequence[int], kinds: Sequence[str], ks: Mapping[str, Sequence[int]]) -> list[ScanUnit]:
    """Every layer × kind × K of that kind, in build order (layer, kind, then K as given)."""
    return [ScanUnit(layer, kind, K) for layer in layers for kind in kinds for K in ks[kind]]


def scan_row(unit: ScanUnit, result: dict[str, Any]) -> dict[str, Any]:
    """One unit's row: the original scan's fields, ours, and the measured figures."""
    (entry,) = result["weights"]
    norm_ratio = float(entry["norm_ratio_mean"])
    row: dict[str, Any] = {"layer": unit.layer, "kind": unit.kind, "K": unit.K, "K_eff": entry["K"],
                           "S_mean": entry["rel_l2_mean"], "S_p95": entry["rel_l2_p95"]}
    row.update({k: entry[k] for k in METRIC_COPY})
    row["log_norm_ratio_mean"] = math.log(norm_ratio) if norm_ratio > 0 else 0.0
    available = bool(entry["ffn_proxy_available"])
    row["ffn_proxy_available"] = available
    row.update({k: (entry[k] if available else None) for k in PROXY_COPY})
    row["ffn_proxy_score"] = (max(1.0 - entry["ffn_proxy_cos_p05"], entry["ffn_proxy_l2_p95"],
                                  abs(entry["ffn_proxy_log_norm_ratio_p95"])) if available else None)
    row["retention_metric"] = retention_metric(bool(entry["has_w"]))
    row["raw"] = {"rel_l2_mean": entry["rel_l2_mean"], "rel_l2_p95": entry["rel_l2_p95"], "norm_ratio_mean": norm_ratio}
    row.update({k: result[k] for k in MEASURED})
    row["bytes_dense"], row["bytes_seeddelta"] = entry["bytes_dense"], entry["bytes_seeddelta"]
    saved = result["bytes_saved"]
    row["delta_nll_per_mb"] = result["delta_nll"] / (saved / 1e6) if saved > 0 else None
    return row


def add_retention(rows: list[dict[str, Any]], beta: float = REPLAY_BETA) -> None:
    """`retention` on every row (over the rows of the same kind and K); `retention_replay` too when the
    rows carry a `replay_impact` (weighted by its kld_mean)."""
    groups: dict[tuple[str, int, str], list[int]] = {}
    for i, row in enumerate(rows):
        groups.setdefault((row["kind"], row["K"], row["retention_metric"]), []).append(i)
    for (_, _, metric), members in groups.items():
        ret = retention({i: rows[i][metric] for i in members})
        for i, r in ret.items():
            rows[i]["retention"] = r
        if all("replay_impact" in rows[i] for i in members):
            weighted = replay_weighted(ret, {i: rows[i]["replay_impact"]["kld_mean"] for i in members}, beta)
            for i, r in weighted.items():
                rows[i]["retention_replay"] = r


def run_scan(measure: UnitMeasure, units: Sequence[ScanUnit], progress: Progress | None = None,
             pool: Pool | None = None, replay: UnitMeasure | None = None) -> list[dict[str, Any]]:
    """Measure every unit (cached units are read back; the others run where `pool` says and are cached
    as each finishes); the rows in unit order, a progress line per unit as it finishes, with an
    estimate of the time left (from the units computed in this run)."""
    t0 = time.perf_counter()
    computed = finished = 0

    def done(i: int, result: dict[str, Any]) -> None:
        nonlocal computed, finished
        finished += 1
        computed += 0 if result["cached"] else 1
        if progress is None:
            return
        elapsed = time.perf_counter() - t0
        left = len(units) - finished
        eta = f", ~{elapsed / computed * left:.0f}s left" if computed and left else ""
        how = "cached" if result["cached"] else f"{elapsed:.1f}s{eta}"
        progress(f"[{finished}/{len(units)}] {units[i].label}: ΔNLL {result['delta_nll']:+.5f} ± "
                 f"{result['delta_nll_se']:.5f}, {result['bytes_saved']:,} B saved  ({how})")

    tasks = [({(u.layer, u.kind): u.K}, f"scan_{u.layer}_{u.kind}_{u.K}") for u in units]
    results = measure.measure_all(tasks, pool, done)
    rows = [scan_row(unit, result) for unit, result in zip(units, results, strict=True)]
    if replay is not None:
        if progress is not None:
            progress(f"replay pack: the {len(units)} unit(s) on its {replay.windows.n_chunk} window(s)")
        for row, result in zip(rows, replay.measure_all(tasks, pool), strict=True):
            row["replay_impact"] = impact(result)
    add_retention(rows)
    return rows


def scan_document(rows: list[dict[str, Any]], *, model: str, model_sha256: str, text: str, ctx: int, chunks: int,
                  encoding: dict[str, Any], ks: dict[str, list[int]], k_fixed: int, eval_cols: int, eval_x: int,
                  cache_dir: str | None, replay: dict[str, Any] | None = None) -> dict[str, Any]:
    """The scan file: the original's layout (`layers."L".<kind>` at the first K, its meta keys) plus every
    unit at every K under `units`, and what autogate needs to check it scans the same model."""
    first = {kind: values[0] for kind, values in ks.items()}
    layers: dict[str, dict[str, Any]] = {}
    for row in rows:
        if row["K"] == first[row["kind"]]:
            layers.setdefault(str(row["layer"]), {})[row["kind"]] = row
    meta = {"scheme": encoding["scheme"], "block": encoding["block"] if encoding["scheme"] == "block" else 0,
            "K_fixed": k_fixed, "eval_cols": eval_cols, "eval_x": eval_x, "seed": encoding["seed"],
            "tensors_scanned": list(first), "base_used": bool(encoding["base"]),
            "row_scale": bool(encoding["row_scale"]), "strip_dense": True, "imatrix": encoding["imatrix"]}
    return {
        "version": SCAN_FORMAT, "input": model, **{k: meta[k] for k in ("scheme", "block", "K_fixed", "eval_cols",
                                                                         "eval_x", "seed", "base_used", "row_scale",
                                                                         "strip_dense")},
        "meta": meta, "layers": layers, "errors": [],
        "model_sha256": model_sha256, "text": text, "ctx": ctx, "chunks": chunks, "K_values": ks,
        "encoding": encoding, "cache": cache_dir, "units": rows, "replay": replay,
        "retention": {"metric": RETENTION_METRIC, "without_imatrix": RETENTION_FALLBACK,
                      "over": "units of the same kind and K", "replay_beta": REPLAY_BETA},
        "method": "per unit: a file with only that tensor as SeedΔ at that K (dense stripped), sparse runtime, "
                  "against the dense base on the same llama-perplexity windows; delta_nll = mean paired "
                  "NLL_model - NLL_base (ln PPL ratio) ± its standard error; bytes_saved = dense bytes stripped - "
                  "SeedΔ bytes added; weight metrics on the stored tensors (eval_cols rows, eval_x random inputs)",
    }
