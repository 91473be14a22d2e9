"""Mechanism 1's retention score and mechanism 6's replay weighting (the v1 plan): one definition,
used by `seeddelta scan` (per unit) and by `seeddelta v1 run` (per gate tensor).

* **retention** — a proxy of how faithfully SeedΔ reproduces a tensor's output: its functional
  cosine `cos_mean_x_w` (rows weighted by the imatrix, random inputs), min–max scaled over a set
  of comparable tensors (the same kind at the same K): ret = (v − lowest) / (highest − lowest), in
  [0, 1]; the most faithful tensor of the set gets 1, the least faithful 0; all 1 when the values
  are equal (nothing to tell them apart: nothing decays). Without an imatrix the weighted metric is
  not measured (the report writes 0), so a scan without --imatrix uses `cos_mean_x` (the same
  functional cosine, rows unweighted) and says so per unit (`retention_metric`). The decay Δ ← Δ·(1 − α(1 − ret)) then
  shrinks the least faithful tensor's Δ most.
* **replay weighting** — the measured damage of each tensor on a replay pack of the prompts the
  original model is most fragile on (KLD on the pack's tokens, `evaluation.replay`), min–max scaled
  over the same set to imp ∈ [0, 1] (0: the least damaging), mixed with the proxy retention:
  ret_replay = (1 − β)·ret + β·(1 − imp), β ∈ [0, 1]. It lies in [0, 1], is non-increasing in the
  impact, rises above ret where the replay damage is low and falls below it where it is high (the
  note: "increase retention for deltas that do well on the critical prompts"); β = 0, or impacts
  that are all equal (the pack tells the tensors apart in nothing), give mechanism 1's retention
  exactly. A multiplicative weighting ret·(1 − β·imp) was tried first: on the tiny model the proxy
  and the pack agree on the extremes (ret 0 is also the most damaging), so it changed nothing.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping
from typing import TypeVar

from seeddelta.errors import SeedDeltaError

K = TypeVar("K", bound=Hashable)

RETENTION_METRIC = "cos_mean_x_w"
RETENTION_FALLBACK = "cos_mean_x"  # when the tensor has no imatrix weights (has_w false)
REPLAY_BETA = 0.5  # the proxy and the replay measurement count equally


def minmax(values: Mapping[K, float], equal: float) -> dict[K, float]:
    """(v − lowest) / (highest − lowest) for each key; `equal` for all when the values are equal."""
    vals = {k: float(v) for k, v in values.items()}
    bad = [k for k, v in vals.items() if not math.isfinite(v)]
    if bad:
        raise SeedDeltaError(f"retention: value of {bad[0]!r} is not finite ({vals[bad[0]]})")
    if not vals:
        return {}
    lo, hi = min(vals.values()), max(vals.values())
    return {k: (v - lo) / (hi - lo) if hi > lo else equal for k, v in vals.items()}


def retention_metric(has_w: bool) -> str:
    return RETENTION_METRIC if has_w else RETENTION_FALLBACK


def retention(values: Mapping[K, float]) -> dict[K, float]:
    """Mechanism 1's retention in [0, 1] from each tensor's RETENTION_METRIC (higher = more faithful)."""
    return minmax(values, 1.0)


def replay_weighted(ret: Mapping[K, float], impact: Mapping[K, float], beta: float = REPLAY_BETA) -> dict[K, float]:
    """Mechanism 6: (1 − β)·ret + β·(1 − imp), imp = the replay impact min–max scaled over the same keys
    (ret unchanged when the impacts are all equal)."""
    if not (math.isfinite(beta) and 0.0 <= beta <= 1.0):
        raise SeedDeltaError(f"replay weight β must be in [0, 1], got {beta}")
    if set(ret) != set(impact):
        raise SeedDeltaError("replay weighting: retention and replay impact cover different tensors")
    imp = minmax(impact, -1.0)
    return {k: float(ret[k]) if imp[k] < 0 else (1.0 - beta) * float(ret[k]) + beta * (1.0 - imp[k]) for k in ret}
