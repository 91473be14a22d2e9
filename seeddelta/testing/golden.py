"""Normalisation of reports before snapshotting: drift guards, not proofs of correctness.

Floats are rounded to 4 decimals (coarser than the float noise of any platform, ~1e-7, so
snapshots do not flap; finer than the tolerances the numeric tests enforce), -0.0 becomes 0.0,
and fields that are pure noise (deviations, timings, paths) are dropped."""

from __future__ import annotations

from typing import Any

NOISE_KEYS = frozenset({"deviation", "tolerance_max", "functional_deviation", "seconds", "timing", "elapsed"})


def normalize(obj: Any, drop: frozenset[str] = NOISE_KEYS, decimals: int = 4) -> Any:
    if isinstance(obj, dict):
        return {k: normalize(v, drop, decimals) for k, v in obj.items() if k not in drop}
    if isinstance(obj, (list, tuple)):
        return [normalize(v, drop, decimals) for v in obj]
    if isinstance(obj, float):
        return round(obj, decimals) + 0.0
    return obj
