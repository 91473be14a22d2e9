"""The runtime side of conditional Δ (extension delta_regime/1, `codec.regime`): the per-token
statistic, the mask of tokens inside a weight's regime, and the count of what skipping Δ saved.

Vectorised over the tokens of a batch (one reduction per row, one comparison): no Python loop over
tokens. The counts are what the evaluation reports as compute saved: (token, tensor) pairs whose Δ was
skipped, and the Δ multiply-adds that were not done.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from seeddelta.codec.regime import DeltaRegime, delta_flops


def token_statistic(x: torch.Tensor, statistic: str) -> torch.Tensor:
    """stat(x_t) per row of x (T, n) in float32: rms = sqrt(mean x²), max_abs = max |x|."""
    x = x.to(torch.float32)
    if statistic == "rms":
        return x.pow(2).mean(dim=-1).sqrt()
    return x.abs().amax(dim=-1)


@dataclass
class RegimeGate:
    """One weight's regime (float32 bounds as stored) and its running counts."""

    regime: DeltaRegime
    n_out: int
    entries_per_row: int  # Δ entries per output row (block padding included)
    tokens: int = 0
    skipped: int = 0

    def __post_init__(self) -> None:
        self.lo = torch.tensor(self.regime.min, dtype=torch.float32)
        self.hi = torch.tensor(self.regime.max, dtype=torch.float32)

    def mask(self, x: torch.Tensor) -> torch.Tensor:
        """Bool (T,): True where Δ applies (lo ≤ stat ≤ hi; a NaN statistic is outside); counted."""
        s = token_statistic(x, self.regime.statistic)
        m = (s >= self.lo) & (s <= self.hi)
        n_in = int(m.sum())
        self.tokens += int(m.shape[0])
        self.skipped += int(m.shape[0]) - n_in
        return m

    def reset(self) -> None:
        self.tokens = self.skipped = 0

    def counts(self) -> dict[str, Any]:
        per_token = delta_flops(self.n_out, self.entries_per_row)
        return {"tokens": self.tokens, "skipped": self.skipped, "delta_flops": self.tokens * per_token,
                "delta_flops_skipped": self.skipped * per_token}


def summarize(gates: dict[str, RegimeGate], tokens: int, ffn_dense_flops_per_token: int) -> dict[str, Any] | None:
    """Compute saved over the gated weights (None when none has a regime): the share of (token, tensor)
    pairs whose Δ was skipped, the Δ FLOPs skipped as a share of those weights' Δ FLOPs and of the dense
    FFN's FLOPs (2·n_in·n_out per FFN weight per token, every layer) over the same `tokens`."""
    if not gates:
        return None
    c = [g.counts() for g in gates.values()]
    pairs, skipped = sum(x["tokens"] for x in c), sum(x["skipped"] for x in c)
    d_all, d_skip = sum(x["delta_flops"] for x in c), sum(x["delta_flops_skipped"] for x in c)
    ffn = tokens * ffn_dense_flops_per_token
    return {"regime_tensors": len(gates), "tokens": tokens, "pairs": pairs, "pairs_skipped": skipped,
            "pairs_skipped_fraction": skipped / pairs if pairs else 0.0,
            "delta_flops": d_all, "delta_flops_skipped": d_skip,
            "delta_flops_skipped_fraction": d_skip / d_all if d_all else 0.0,
            "ffn_dense_flops": ffn, "ffn_flops_skipped_fraction": d_skip / ffn if ffn else 0.0,
            "per_tensor": {name: {"tokens": x["tokens"], "skipped": x["skipped"]} for name, x in zip(gates, c,
                                                                                                      strict=True)}}
