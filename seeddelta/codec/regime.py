"""Conditional Δ (the v1 plan's mechanism 3, "dendritic gating"): a weight's residual Δ is applied
only to the tokens whose input row x lies in a declared regime of a cheap per-token statistic:

    ŷ(x) = s ⊙ (W0·x + Δ·x)    when  min ≤ stat(x) ≤ max      (both bounds inclusive)
    ŷ(x) = s ⊙ (W0·x)          otherwise                       (the base alone)

Rows kept dense (extension dense_rows/1) are the original's rows whatever the regime. Statistics:
``rms`` = sqrt(mean_i x_i²) and ``max_abs`` = max_i |x_i|, computed in float32 from the projection's
input row (ffn_gate/ffn_up: the ffn_norm output; ffn_down: silu(gate)·up); a NaN statistic is outside
every regime. An omitted bound is open (stored as ∓∞). The bounds are stored as float32 and compared
with the float32 statistic, so a policy's number is rounded once to float32.

Stored per weight as the opt-in extension ``delta_regime/1`` (`gguf_format.extensions`):
``rg_stat`` (I32, (1,)): the statistic's code (0 rms, 1 max_abs); ``rg_lim`` (F32, (2,)): [min, max].
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from seeddelta.errors import SeedDeltaError

EXTENSION = "delta_regime/1"
SUFFIXES = ("rg_stat", "rg_lim")
STATISTICS: tuple[str, ...] = ("rms", "max_abs")  # index = code stored in rg_stat


@dataclass(frozen=True)
class DeltaRegime:
    """Where Δ is applied: `statistic` of the input row within [min, max] (inclusive; ±inf = open)."""

    statistic: str
    min: float = -math.inf
    max: float = math.inf

    def __post_init__(self) -> None:
        problem = regime_problem(self.statistic, self.min, self.max)
        if problem is not None:
            raise SeedDeltaError(f"delta regime: {problem}")

    def tensors(self) -> dict[str, np.ndarray]:
        return {"rg_stat": np.array([STATISTICS.index(self.statistic)], dtype=np.int32),
                "rg_lim": np.array([self.min, self.max], dtype=np.float32)}

    def stored(self) -> DeltaRegime:
        """The regime as the file holds it (bounds rounded once to float32)."""
        lim = self.tensors()["rg_lim"]
        return DeltaRegime(self.statistic, float(lim[0]), float(lim[1]))

    def to_json(self) -> dict[str, Any]:
        """The policy form: open bounds are omitted (JSON holds no infinity)."""
        out: dict[str, Any] = {"statistic": self.statistic}
        if math.isfinite(self.min):
            out["min"] = self.min
        if math.isfinite(self.max):
            out["max"] = self.max
        return out

    @classmethod
    def from_tensors(cls, name: str, stat: np.ndarray, lim: np.ndarray) -> DeltaRegime:
        check_regime_tensors(name, stat, lim)
        return cls(STATISTICS[int(stat[0])], float(lim[0]), float(lim[1]))


def regime_problem(statistic: object, lo: float, hi: float) -> str | None:
    """What is wrong with a regime (None: nothing)."""
    if statistic not in STATISTICS:
        return f"unknown statistic {statistic!r} (expected {', '.join(STATISTICS)})"
    if math.isnan(lo) or math.isnan(hi):
        return "min/max must not be NaN"
    if lo == math.inf or hi == -math.inf:
        return f"empty regime [{lo}, {hi}]"
    if lo > hi:
        return f"min {lo:g} > max {hi:g}"
    return None


def parse_regime(text: str, flag: str) -> DeltaRegime:
    """The CLI form STAT:MIN:MAX, an empty bound open: "rms:0.8:" (Δ for rms ≥ 0.8), "max_abs::2.5"."""
    parts = text.split(":")
    if len(parts) != 3:
        raise SeedDeltaError(f"{flag}: expected STAT:MIN:MAX (an empty bound is open, e.g. rms:0.8:), got {text!r}")

    def bound(s: str, open_value: float, which: str) -> float:
        if s.strip() == "":
            return open_value
        try:
            v = float(s)
        except ValueError:
            raise SeedDeltaError(f"{flag}: {which} {s!r} is not a number") from None
        if not math.isfinite(v):
            raise SeedDeltaError(f"{flag}: {which} must be a finite number or empty (open), got {s!r}")
        return v

    lo, hi = bound(parts[1], -math.inf, "MIN"), bound(parts[2], math.inf, "MAX")
    problem = regime_problem(parts[0], lo, hi)
    if problem is not None:
        raise SeedDeltaError(f"{flag}: {problem}")
    return DeltaRegime(parts[0], lo, hi)


def check_regime_tensors(name: str, stat: np.ndarray, lim: np.ndarray) -> None:
    """`rg_stat` int32 (1,) a known code; `rg_lim` float32 (2,) without NaN, min ≤ max."""
    if stat.dtype != np.int32 or stat.shape != (1,):
        raise SeedDeltaError(f"SeedΔ tensor {name}.rg_stat: expected int32 of shape (1,), got {stat.dtype} {stat.shape}")
    code = int(stat[0])
    if not 0 <= code < len(STATISTICS):
        raise SeedDeltaError(f"SeedΔ tensor {name}.rg_stat: unknown statistic code {code} (known: "
                             + ", ".join(f"{i} {s}" for i, s in enumerate(STATISTICS)) + ")")
    if lim.dtype != np.float32 or lim.shape != (2,):
        raise SeedDeltaError(f"SeedΔ tensor {name}.rg_lim: expected float32 of shape (2,), got {lim.dtype} {lim.shape}")
    problem = regime_problem(STATISTICS[code], float(lim[0]), float(lim[1]))
    if problem is not None:
        raise SeedDeltaError(f"SeedΔ tensor {name}.rg_lim: {problem}")


def delta_flops(n_out: int, entries_per_row: int) -> int:
    """Multiply-adds ×2 of one token's Δ·x (every stored entry, block padding included)."""
    return 2 * n_out * entries_per_row
