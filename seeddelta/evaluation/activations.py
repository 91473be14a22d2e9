"""Activation statistics for an imatrix: Σx² per input column of every FFN weight, in llama-imatrix's sense."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from seeddelta.evaluation.windows import Windows
from seeddelta.runtime.model import LlamaModel


def collect_imatrix(model: LlamaModel, windows: Windows,
                    progress: Callable[[], None] | None = None) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Σx² per input column and row counts at the inputs of every ffn_gate/ffn_up/ffn_down.

    Every position of every window is accumulated (llama-imatrix sees whole batches), inputs are
    the ffn_norm output (gate, up) and silu(gate)·up (down), in float64.
    """
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}

    def observe(layer: int, kind: str, x: torch.Tensor) -> None:
        name = f"blk.{layer}.{kind}.weight"
        x2 = x.reshape(-1, x.shape[-1]).to(torch.float64)
        s = (x2 * x2).sum(0).numpy()
        if name in sums:
            sums[name] += s
            counts[name] += int(x2.shape[0])
        else:
            sums[name] = s
            counts[name] = int(x2.shape[0])

    previous = model.ffn_observer
    model.ffn_observer = observe
    try:
        for i in range(windows.n_chunk):
            model.forward(windows.inputs[i], logits_start=windows.n_ctx - 1)
            if progress is not None:
                progress()
    finally:
        model.ffn_observer = previous
    return sums, counts
