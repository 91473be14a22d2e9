"""Calibrated bounds for conditional Δ (extension delta_regime/1, `codec.regime`): a regime bound given
as a quantile of the weight's input statistic on a calibration text instead of a fixed number.

`--delta-regime-gate rms:q0.1:` means "ffn_gate's Δ only for the tokens whose input rms is at or above
that layer's 0.1-quantile": the quantile is taken per layer over every position of the calibration
text cut into CALIBRATION_CTX-token windows (the whole text), run through the original model (dense,
any SeedΔ tensors of the input ignored), with the statistic computed exactly as the runtime computes it
(`runtime.regime.token_statistic`, float32), then rounded once to float32 — the value the file stores
and the runtime compares with. This is the calibration `seeddelta v1 run`'s mechanism 3 uses (it calls
`calibrate` below), so `build` with the same text reproduces its bounds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from seeddelta.codec.regime import STATISTICS, DeltaRegime, parse_regime, regime_problem
from seeddelta.errors import SeedDeltaError

CALIBRATION_CTX = 512  # windows of the calibration text (v1 mechanism 3's)


@dataclass(frozen=True)
class QuantileRegime:
    """A regime whose bounds are quantiles (in [0, 1]) of the statistic on a calibration text (None: open)."""

    statistic: str
    q_min: float | None = None
    q_max: float | None = None

    def quantiles(self) -> tuple[float, ...]:
        return tuple(q for q in (self.q_min, self.q_max) if q is not None)

    def resolve(self, bounds: dict[str, float]) -> DeltaRegime:
        """The fixed regime once the quantiles' values (keyed f"{q:g}") are known."""
        lo = -math.inf if self.q_min is None else bounds[f"{self.q_min:g}"]
        hi = math.inf if self.q_max is None else bounds[f"{self.q_max:g}"]
        return DeltaRegime(self.statistic, lo, hi)


def parse_gate_regime(text: str, flag: str) -> DeltaRegime | QuantileRegime:
    """STAT:MIN:MAX as codec.regime.parse_regime, or with quantile bounds written qP (P in [0, 1]):
    "rms:q0.1:" (Δ at or above the 0.1-quantile), "rms::q0.9", "rms:q0.1:q0.9". Fixed and quantile bounds
    are not mixed."""
    parts = text.split(":")
    quant = [p.strip().startswith("q") for p in parts[1:]] if len(parts) == 3 else []
    if not any(quant):
        return parse_regime(text, flag)
    if any(not q and p.strip() != "" for q, p in zip(quant, parts[1:], strict=True)):
        raise SeedDeltaError(f"{flag}: give both bounds as quantiles (qP) or both as numbers, got {text!r}")

    def q(s: str, which: str) -> float | None:
        s = s.strip()
        if s == "":
            return None
        try:
            v = float(s[1:])
        except ValueError:
            raise SeedDeltaError(f"{flag}: {which} {s!r} is not a quantile qP with P a number in [0, 1]") from None
        if not (math.isfinite(v) and 0.0 <= v <= 1.0):
            raise SeedDeltaError(f"{flag}: {which} quantile must be in [0, 1], got {s!r}")
        return v

    lo, hi = q(parts[1], "MIN"), q(parts[2], "MAX")
    problem = regime_problem(parts[0], -math.inf if lo is None else lo, math.inf if hi is None else hi)
    if problem is not None:
        raise SeedDeltaError(f"{flag}: {problem.replace('min', 'quantile min').replace('max', 'quantile max')}")
    return QuantileRegime(parts[0], lo, hi)


def calibrate(model: Any, windows: Any, layers: Sequence[int], quantiles: Sequence[float],
              statistic: str = "rms") -> dict[str, Any]:
    """Per layer, the quantiles of the per-token statistic of ffn_gate's input over every position of
    `windows` on `model` (a runtime LlamaModel), computed as the runtime computes it (float32); each
    quantile (linear interpolation, numpy's default) in float64, then rounded once to float32."""
    from seeddelta.runtime.regime import token_statistic

    if statistic not in STATISTICS:
        raise SeedDeltaError(f"calibration: unknown statistic {statistic!r} (expected {', '.join(STATISTICS)})")
    wanted = set(layers)
    values: dict[int, list[np.ndarray]] = {layer: [] for layer in layers}

    def observe(layer: int, kind: str, x: Any) -> None:
        if kind == "ffn_gate" and layer in wanted:
            values[layer].append(token_statistic(x.reshape(-1, x.shape[-1]), statistic).numpy())

    previous = model.ffn_observer
    model.ffn_observer = observe
    try:
        for i in range(windows.n_chunk):
            model.forward(windows.inputs[i], logits_start=windows.n_ctx - 1)
    finally:
        model.ffn_observer = previous
    out: dict[str, Any] = {"statistic": statistic, "tokens": 0, "quantiles": {}}
    for layer in layers:
        v = np.concatenate(values[layer]).astype(np.float64)
        out["tokens"] = int(v.size)
        # rounded once to float32: the value the file stores and the runtime compares with
        out["quantiles"][str(layer)] = {f"{q:g}": float(np.float32(np.quantile(v, q))) for q in quantiles}
    return out


def calibrated_gate_regimes(model_path: str | Path, text: str | Path,
                            regime: QuantileRegime) -> tuple[tuple[int, DeltaRegime], ...]:
    """Every layer's ffn_gate regime with its quantile bounds calibrated on `text` (see the module text)."""
    from seeddelta.evaluation.memory import load
    from seeddelta.evaluation.windows import text_windows

    base = load(model_path, use_seeddelta=False)
    windows = text_windows(Path(text), CALIBRATION_CTX, -1, base.tokenizer).windows
    layers = list(range(base.model.config.n_layer))
    cal = calibrate(base.model, windows, layers, regime.quantiles(), regime.statistic)
    return tuple((layer, regime.resolve(cal["quantiles"][str(layer)])) for layer in layers)
