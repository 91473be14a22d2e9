"""Activation statistics at the FFN inputs: Σx² per input column (an imatrix, in llama-imatrix's sense)
and, for the variant sdq's activation-aware values, Σ x xᵀ per input vector."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from seeddelta.errors import SeedDeltaError
from seeddelta.evaluation.windows import Windows
from seeddelta.runtime.llama_cpp_engine import EvalModel
from seeddelta.runtime.model import LlamaModel

Observer = Callable[[int, str, torch.Tensor], None]


def _run(model: LlamaModel, windows: Windows, observe: Observer, progress: Callable[[], None] | None) -> None:
    previous = model.ffn_observer
    model.ffn_observer = observe
    try:
        for i in range(windows.n_chunk):
            model.forward(windows.inputs[i], logits_start=windows.n_ctx - 1)
            if progress is not None:
                progress()
    finally:
        model.ffn_observer = previous


def _accumulate(sums: dict[str, np.ndarray], counts: dict[str, int], name: str, value: np.ndarray, rows: int) -> None:
    if name in sums:
        sums[name] += value
        counts[name] += rows
    else:
        sums[name] = value
        counts[name] = rows


def collect_statistics(model: EvalModel, windows: Windows, progress: Callable[[], None] | None = None, *,
                       xtx: bool = False) -> tuple[dict[str, np.ndarray], dict[str, int],
                                                   dict[str, np.ndarray], dict[str, int]]:
    """(imatrix sums, counts, XᵀX sums, counts) in one pass over the windows (XᵀX empty unless `xtx`).

    imatrix: Σx² per input column and row counts at the inputs of every ffn_gate/ffn_up/ffn_down;
    every position of every window is accumulated (llama-imatrix sees whole batches), inputs are the
    ffn_norm output (gate, up) and silu(gate)·up (down), in float64.
    XᵀX: Σ x xᵀ (float64) per input *vector*: `blk.N.ffn_gate.weight` (the ffn_norm output, read by
    ffn_gate and ffn_up alike) and `blk.N.ffn_down.weight`."""
    if not isinstance(model, LlamaModel):
        raise SeedDeltaError("imatrix statistics need the torch runtime (llama.cpp offers no hook into FFN inputs)")
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    xsums: dict[str, np.ndarray] = {}
    xcounts: dict[str, int] = {}

    def observe(layer: int, kind: str, x: torch.Tensor) -> None:
        name = f"blk.{layer}.{kind}.weight"
        x2 = x.reshape(-1, x.shape[-1]).to(torch.float64)
        _accumulate(sums, counts, name, (x2 * x2).sum(0).numpy(), int(x2.shape[0]))
        if xtx and kind != "ffn_up":  # ffn_up reads the same vector as ffn_gate
            _accumulate(xsums, xcounts, name, (x2.T @ x2).numpy(), int(x2.shape[0]))

    _run(model, windows, observe, progress)
    return sums, counts, xsums, xcounts


def collect_imatrix(model: EvalModel, windows: Windows,
                    progress: Callable[[], None] | None = None) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Σx² per input column and row counts at the inputs of every ffn_gate/ffn_up/ffn_down
    (see `collect_statistics`)."""
    sums, counts, _, _ = collect_statistics(model, windows, progress)
    return sums, counts


def collect_xtx(model: EvalModel, windows: Windows,
                progress: Callable[[], None] | None = None) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Σ x xᵀ and row counts per FFN input vector (see `collect_statistics`)."""
    _, _, xsums, xcounts = collect_statistics(model, windows, progress, xtx=True)
    return xsums, xcounts
