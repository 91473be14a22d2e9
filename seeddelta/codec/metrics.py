"""Metrics of a stored SeedΔ weight: weight space, functional, cost model and bytes.

Every metric reads the stored arrays (through `SeedDeltaWeight.dense/apply`), never float32
intermediates. Convention: a row whose original and reconstruction are both all-zero is exact
(rel_l2 0, cos 1, norm_ratio 1), not cos 0 as in the original.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from seeddelta.codec.encode import SeedDeltaWeight

_TINY = 1e-20  # the original's floor on squared norms (spec §6.1)


SUMMARY_NAMES = ("rel_l2_mean", "rel_l2_p95", "cos_mean", "cos_p05", "norm_ratio_mean")


@dataclass(frozen=True)
class RowMetrics:
    rel_l2: np.ndarray
    cos: np.ndarray
    norm_ratio: np.ndarray

    def summary(self, suffix: str = "") -> dict[str, float]:
        """The report's five figures (SUMMARY_NAMES, in that order) with `suffix` appended to each name."""
        return {
            f"rel_l2_mean{suffix}": float(np.mean(self.rel_l2)),
            f"rel_l2_p95{suffix}": float(np.percentile(self.rel_l2, 95)),
            f"cos_mean{suffix}": float(np.mean(self.cos)),
            f"cos_p05{suffix}": float(np.percentile(self.cos, 5)),
            f"norm_ratio_mean{suffix}": float(np.mean(self.norm_ratio)),
        }


def compare_rows(w: np.ndarray, w_hat: np.ndarray) -> RowMetrics:
    """Per-row (last axis) rel_l2, cos and norm ratio of w_hat against w, in float64."""
    w = np.asarray(w, dtype=np.float64)
    w_hat = np.asarray(w_hat, dtype=np.float64)
    a = np.sum(w * w, axis=-1)
    a_hat = np.sum(w_hat * w_hat, axis=-1)
    dot = np.sum(w * w_hat, axis=-1)
    err = np.sqrt(np.sum((w - w_hat) ** 2, axis=-1))
    nw, nh = np.sqrt(np.maximum(a, _TINY)), np.sqrt(np.maximum(a_hat, _TINY))
    both_zero = (a == 0) & (a_hat == 0)
    rel = np.where(both_zero, 0.0, err / nw)
    cos = np.where(both_zero, 1.0, dot / (nw * nh))
    ratio = np.where(both_zero, 1.0, nh / nw)
    return RowMetrics(rel, cos, ratio)


def sample_rows(n_out: int, eval_cols: int, rng: np.random.Generator) -> np.ndarray:
    """eval_cols distinct output rows (sorted); every row when eval_cols >= n_out."""
    if eval_cols >= n_out:
        return np.arange(n_out)
    return np.sort(rng.choice(n_out, size=eval_cols, replace=False))


def weight_metrics(W: np.ndarray, sdw: SeedDeltaWeight, rows: np.ndarray, scale: np.ndarray | None = None, *,
                   w_hat: np.ndarray | None = None) -> RowMetrics:
    """Weight-space metrics on the given rows; with `scale`, norms of (w_i·s_i) (the _w variant).
    `w_hat`: `sdw.dense(rows)` when the caller has it already (both variants use it)."""
    w = np.asarray(W[rows], dtype=np.float64)
    w_hat = sdw.dense(rows) if w_hat is None else w_hat
    if scale is not None:
        w, w_hat = w * scale[None, :], w_hat * scale[None, :]
    return compare_rows(w, w_hat)


def functional_metrics(
    W: np.ndarray, sdw: SeedDeltaWeight, rows: np.ndarray, n_x: int, rng: np.random.Generator,
    x_scale: np.ndarray | None = None,
) -> RowMetrics:
    """Per input draw x ~ N(0, diag(x_scale²)): compare y = W x (float64) with the runtime's ŷ on
    the sampled outputs, treated as one vector. Percentiles are over input vectors."""
    x = rng.standard_normal((n_x, sdw.n_in)).astype(np.float32)
    if x_scale is not None:
        x = (x * x_scale[None, :]).astype(np.float32)
    y = x.astype(np.float64) @ np.asarray(W[rows], dtype=np.float64).T
    y_hat = sdw.apply_rows(x, rows)
    return compare_rows(y, y_hat)


def evaluate_weight(
    W: np.ndarray, sdw: SeedDeltaWeight, *, eval_cols: int, eval_x: int,
    imatrix_scale: np.ndarray | None = None, seed: int = 0,
) -> dict[str, float | bool]:
    """The report's metric fields (spec §10.2) for one weight; uncomputed groups are 0.

    All four groups use the same sampled rows (the original drew a new sample per group)."""
    out: dict[str, float | bool] = {f"{name}{suffix}": 0.0 for suffix in ("", "_w", "_x", "_x_w") for name in SUMMARY_NAMES}
    has_w = imatrix_scale is not None
    has_x = eval_cols > 0 and eval_x > 0
    out["has_w"], out["has_x"] = has_w, has_x
    if eval_cols <= 0:
        return out
    rng = np.random.default_rng(seed)
    rows = sample_rows(sdw.n_out, eval_cols, rng)
    scale = None if imatrix_scale is None else np.asarray(imatrix_scale, dtype=np.float64)
    w_hat = sdw.dense(rows)  # the stored reconstruction of those rows, for both weight-space groups
    out.update(weight_metrics(W, sdw, rows, w_hat=w_hat).summary(""))
    if scale is not None:
        out.update(weight_metrics(W, sdw, rows, scale, w_hat=w_hat).summary("_w"))
    if has_x:
        out.update(functional_metrics(W, sdw, rows, eval_x, np.random.default_rng([seed, 1])).summary("_x"))
        if scale is not None:
            out.update(functional_metrics(W, sdw, rows, eval_x, np.random.default_rng([seed, 2]), scale).summary("_x_w"))
    return out


def cost_model(sdw: SeedDeltaWeight) -> dict[str, float | int]:
    """Per-token operation counts (spec §7) plus base geometry."""
    n_in, n_out, k = sdw.n_in, sdw.n_out, sdw.K
    ops_base = sdw.base.ops() if sdw.base is not None else 0
    geometry = getattr(sdw.base, "geometry", None)
    ops_dense = 2 * n_in * n_out
    ops_delta = 2 * k * n_out
    ops_row_scale = n_out if sdw.row_scale is not None else 0
    ops_total = ops_base + ops_delta + ops_row_scale
    return {
        "base_L": geometry.L if geometry is not None else 0,
        "base_B": geometry.B if geometry is not None else 0,
        "ops_dense": ops_dense,
        "ops_base": ops_base,
        "ops_delta": ops_delta,
        "ops_row_scale": ops_row_scale,
        "ops_total": ops_total,
        "ops_ratio": ops_total / ops_dense if ops_dense else 0.0,
    }


def bits_per_weight(sdw: SeedDeltaWeight) -> float:
    return 8.0 * sdw.nbytes() / (sdw.n_in * sdw.n_out)
