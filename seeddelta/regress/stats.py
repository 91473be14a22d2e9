"""Statistics of the regress report: window-block bootstrap of paired differences, Spearman's rank
correlation with a permutation p-value. numpy only, seeded: the same inputs give the same numbers.

Why windows, not tokens: tokens of one window share their context, so their NLL differences are
correlated and the textbook standard error (tokens as independent draws) is too small. Resampling
whole windows with replacement keeps that correlation inside each draw (a block bootstrap)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

BOOTSTRAP_DRAWS = 2000
SEED = 20240531


def bootstrap_windows(per_window: Sequence[float], draws: int = BOOTSTRAP_DRAWS, seed: int = SEED) -> dict[str, float]:
    """Mean of per-window means (windows have equal token counts) and its window-bootstrap spread:
    sd of the resampled means and the 2.5 / 97.5 % percentiles."""
    x = np.asarray(per_window, dtype=np.float64)
    if x.size == 0:
        return {"mean": float("nan"), "sd": float("nan"), "lo95": float("nan"), "hi95": float("nan"), "n_windows": 0}
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(draws, x.size))
    means = x[idx].mean(axis=1)
    return {"mean": float(x.mean()), "sd": float(means.std(ddof=1)) if x.size > 1 else 0.0,
            "lo95": float(np.percentile(means, 2.5)), "hi95": float(np.percentile(means, 97.5)), "n_windows": int(x.size)}


def ranks(x: Sequence[float]) -> np.ndarray:
    """Ranks 1..n, ties sharing their average rank."""
    a = np.asarray(x, dtype=np.float64)
    order = np.argsort(a, kind="stable")
    r = np.empty(a.size, dtype=np.float64)
    r[order] = np.arange(1, a.size + 1)
    for v in np.unique(a):
        tie = a == v
        if tie.sum() > 1:
            r[tie] = r[tie].mean()
    return r


def spearman(x: Sequence[float], y: Sequence[float], permutations: int = 2000, seed: int = SEED) -> dict[str, float]:
    """ρ = Pearson correlation of the ranks; p = two-sided permutation p-value (share of shuffles of y
    with |ρ| at least as large, counting the observed one). NaN when either side is constant."""
    rx, ry = ranks(x), ranks(y)
    n = rx.size
    if n < 3 or rx.std() == 0 or ry.std() == 0:
        return {"rho": float("nan"), "p": float("nan"), "n": int(n)}
    rho = float(np.corrcoef(rx, ry)[0, 1])
    rng = np.random.default_rng(seed)
    perm = np.argsort(rng.random((permutations, n)), axis=1)
    rys = ry[perm]
    cx = rx - rx.mean()
    cys = rys - rys.mean(axis=1, keepdims=True)
    rhos = (cys @ cx) / (np.sqrt((cx * cx).sum()) * np.sqrt((cys * cys).sum(axis=1)))
    p = (1 + int(np.sum(np.abs(rhos) >= abs(rho) - 1e-12))) / (permutations + 1)
    return {"rho": rho, "p": p, "n": int(n)}


def pct_from_nll(d: float) -> float:
    """ΔPPL in percent from a paired mean ΔNLL (= ln PPL ratio)."""
    return 100.0 * math.expm1(d)
