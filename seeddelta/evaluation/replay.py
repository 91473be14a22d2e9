"""Mechanism 6's replay pack: the text windows the original model is most fragile on, and the
per-tensor damage measured on them (the scan's `replay_impact`).

**Selection.** The text is cut into llama-perplexity windows of `ctx` tokens; on each window's scored
positions the original model's margin between its top-1 and top-2 logits is taken, and windows are
ranked by the mean margin, smallest first (ties: the earlier window). Why the margin: a compressed
tensor perturbs the logits; where the top-two gap is small a small perturbation already changes the
model's choice (the greedy token), so these windows show first what a compression breaks. Entropy
mixes in the tail of the distribution, which cannot flip the choice; the expected token's NLL
rewards windows the model simply does not know. The pack stores the chosen windows' tokens (so it
is measured without the text) with the model's and the text's SHA-256.

**Impact.** Each unit is measured on the pack's windows exactly as the scan measures it on the
text (evaluation.sweep.UnitMeasure: a file with only that tensor as SeedΔ, against the dense base):
KLD, paired ΔNLL, same top-1. Cached per unit; the key holds the pack's SHA-256 and its tokens' hash.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from seeddelta.errors import SeedDeltaError
from seeddelta.evaluation.scoring import Logits
from seeddelta.evaluation.sweep import UnitMeasure
from seeddelta.evaluation.windows import Windows

PACK_FORMAT = "seeddelta.replay-pack/1"
CRITERION = "mean top-1 minus top-2 logit margin of the original over each window's scored positions, smallest first"
IMPACT_FIELDS = ("kld_mean", "delta_nll", "delta_nll_se", "same_top_p")


def window_margins(logits: Logits, windows: Windows) -> np.ndarray:
    """Per window, the mean over its scored positions of (top-1 − top-2) logit of the model."""
    out = np.empty(windows.n_chunk, dtype=np.float64)
    for i in range(windows.n_chunk):
        top = torch.topk(logits(windows.inputs[i], windows.first).to(torch.float64), 2, dim=-1).values
        out[i] = float((top[:, 0] - top[:, 1]).mean())
    return out


def select(margins: np.ndarray, n: int) -> list[int]:
    """The n windows with the smallest mean margin (ties: the earlier window), in that order."""
    if n < 1:
        raise SeedDeltaError(f"--n must be at least 1, got {n}")
    if n > margins.size:
        raise SeedDeltaError(f"--n {n} is more than the text's {margins.size} window(s) at this -c")
    return [int(i) for i in np.lexsort((np.arange(margins.size), margins))[:n]]


def make_pack(logits: Logits, windows: Windows, n: int, *, model: str, model_sha256: str, text: str,
              text_sha256: str) -> dict[str, Any]:
    margins = window_margins(logits, windows)
    chosen = select(margins, n)
    return {"format": PACK_FORMAT, "model": model, "model_sha256": model_sha256, "text": text,
            "text_sha256": text_sha256, "ctx": windows.n_ctx, "first": windows.first, "candidates": windows.n_chunk,
            "criterion": CRITERION, "n": n,
            "cut_margin": float(margins[chosen[-1]]),
            "windows": [{"index": i, "mean_margin": float(margins[i]), "inputs": windows.inputs[i].tolist(),
                         "targets": windows.targets[i].tolist()} for i in chosen]}


def read_pack(path: str | Path, model_sha256: str | None, n_vocab: int) -> tuple[dict[str, Any], Windows]:
    """A replay pack file and its windows; one-line errors naming the file and the problem."""
    p = Path(path)
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SeedDeltaError(f"replay pack not found: {p}") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise SeedDeltaError(f"replay pack {p} is not readable JSON ({str(exc).splitlines()[0]})") from None
    if not isinstance(doc, dict) or doc.get("format") != PACK_FORMAT:
        raise SeedDeltaError(f"replay pack {p}: not a {PACK_FORMAT} file (make one with `seeddelta replay-pack`)")
    if model_sha256 is not None and doc.get("model_sha256") != model_sha256:
        raise SeedDeltaError(f"replay pack {p} was made for another model (SHA-256 differs): make it with this -m")
    try:
        ctx, first = int(doc["ctx"]), int(doc["first"])
        inputs = np.array([w["inputs"] for w in doc["windows"]], dtype=np.int64)
        targets = np.array([w["targets"] for w in doc["windows"]], dtype=np.int64)
    except (KeyError, TypeError, ValueError):
        raise SeedDeltaError(f"replay pack {p}: windows missing or not equal-length token lists") from None
    if inputs.ndim != 2 or inputs.shape[0] == 0 or inputs.shape[1] != ctx or not 0 < first < ctx - 1 \
            or targets.shape != (inputs.shape[0], ctx - 1 - first):
        raise SeedDeltaError(f"replay pack {p}: windows do not match ctx {ctx} / first {first}")
    if inputs.min() < 0 or inputs.max() >= n_vocab or targets.min() < 0 or targets.max() >= n_vocab:
        raise SeedDeltaError(f"replay pack {p}: token ids outside the model's vocabulary of {n_vocab}")
    return doc, Windows(inputs, targets, ctx, first, int(inputs.size))


def pack_sha256(path: str | Path) -> str:
    from seeddelta.assets import sha256_file

    return sha256_file(Path(path))


class ReplayMeasure(UnitMeasure):
    """A UnitMeasure on a replay pack's windows; its cache key also holds the pack file's SHA-256."""

    def __init__(self, *args: Any, pack_sha256: str, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.pack_sha256 = pack_sha256

    def spec(self, ks: Mapping[tuple[int, str], int]) -> dict[str, Any]:
        out = super().spec(ks)
        out["evaluation"] = {**out["evaluation"], "replay_pack_sha256": self.pack_sha256}
        return out


def impact(result: Mapping[str, Any]) -> dict[str, Any]:
    """A unit's replay impact: its measured figures on the pack (kld_mean is what retention is weighted by)."""
    return {k: result[k] for k in IMPACT_FIELDS}


def impacts_by_unit(measure: UnitMeasure, tasks: Sequence[tuple[Mapping[tuple[int, str], int], str]],
                    pool: Any = None) -> list[dict[str, Any]]:
    return [impact(r) for r in measure.measure_all(tasks, pool)]

