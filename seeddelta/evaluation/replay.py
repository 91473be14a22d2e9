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

**Greedy-pack prompts** (`replay-pack --pack FILE`, optional). The original answers each prompt of a
greedy pack (the first `limit` per task) greedily; the prompt's margin is the mean, over the decisions
of that answer (each generated token, and the end-of-sequence when it stopped on one), of the gap
between its top-1 and top-2 logits with the prompt and its own answer as context. The `n` prompts
with the smallest margin (ties: the earlier in the pack) are added as windows of the same `ctx`: the
pack's prompts and the original's answers in pack order make one token stream, and a chosen
prompt's window is the last `ctx` tokens of that stream up to the end of its answer (BOS first, as a
text window), so the scored second half holds its answer and what precedes it. A prompt whose stream
is shorter than `ctx` tokens up to its end cannot make a window and is not a candidate.

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
              text_sha256: str, prompts: dict[str, Any] | None = None) -> dict[str, Any]:
    """The pack document; `prompts`: {"pack", "pack_sha256", "considered", "margins" (id → mean margin of every
    prompt considered), "windows" (prompt_windows)} from the greedy pack, its windows after the text's."""
    margins = window_margins(logits, windows)
    chosen = select(margins, n)
    doc = _text_pack(margins, chosen, windows, n, model=model, model_sha256=model_sha256, text=text,
                     text_sha256=text_sha256)
    if prompts is not None:
        doc["prompts"] = {"pack": prompts["pack"], "pack_sha256": prompts["pack_sha256"],
                          "considered": prompts["considered"], "n": len(prompts["windows"]),
                          "criterion": PROMPT_CRITERION, "ids": [w["id"] for w in prompts["windows"]],
                          "margins": prompts["margins"]}
        doc["windows"] += prompts["windows"]
    return doc


def _text_pack(margins: np.ndarray, chosen: list[int], windows: Windows, n: int, *, model: str, model_sha256: str,
               text: str, text_sha256: str) -> dict[str, Any]:
    return {"format": PACK_FORMAT, "model": model, "model_sha256": model_sha256, "text": text,
            "text_sha256": text_sha256, "ctx": windows.n_ctx, "first": windows.first, "candidates": windows.n_chunk,
            "criterion": CRITERION, "n": n,
            "cut_margin": float(margins[chosen[-1]]),
            "windows": [{"index": i, "mean_margin": float(margins[i]), "inputs": windows.inputs[i].tolist(),
                         "targets": windows.targets[i].tolist()} for i in chosen]}


PROMPT_CRITERION = ("mean top-1 minus top-2 logit margin of the original over the decisions of its greedy answer, "
                    "smallest first")


def prompt_margins(model: Any, tokenizer: Any, items: Sequence[Any], max_new: int) -> list[dict[str, Any]]:
    """Per greedy-pack item: its prompt tokens (no BOS), the original's greedy answer tokens, and the mean
    top-1/top-2 margin over that answer's decisions (see the module text)."""
    from seeddelta.evaluation.greedy import greedy_decode

    add_bos = bool(getattr(tokenizer, "add_bos", True))
    out = []
    for it in items:
        d = greedy_decode(model, tokenizer, it.prompt, max_new)
        ids = list(tokenizer.encode(it.prompt, add_bos=add_bos))
        seq = ids + list(d.ids)
        logits = model.forward(np.array(seq, dtype=np.int64), logits_start=len(ids) - 1)
        decisions = len(d.ids) + (1 if d.stop == "eos" else 0)  # the positions that chose a token (or the end)
        top = torch.topk(logits[:decisions].to(torch.float64), 2, dim=-1).values
        prompt = list(tokenizer.encode(it.prompt, add_bos=False))
        out.append({"id": it.id, "task": it.task, "prompt_tokens": prompt, "answer_tokens": list(d.ids),
                    "answer": d.text, "mean_margin": float((top[:, 0] - top[:, 1]).mean())})
    return out


def prompt_windows(margins: Sequence[dict[str, Any]], n: int, ctx: int, bos_id: int | None) -> list[dict[str, Any]]:
    """The pack windows of the n prompts with the smallest margin among those with ctx tokens of stream."""
    if n < 1:
        raise SeedDeltaError(f"--pack-n must be at least 1, got {n}")
    stream: list[int] = []
    ends = []
    for m in margins:
        stream += m["prompt_tokens"] + m["answer_tokens"]
        ends.append(len(stream))
    eligible = [i for i, end in enumerate(ends) if end >= ctx]
    if n > len(eligible):
        raise SeedDeltaError(f"--pack-n {n} is more than the {len(eligible)} greedy prompt(s) with {ctx} tokens of pack "
                             "before their end (a smaller -c, more prompts with --pack-limit, or a smaller --pack-n)")
    order = sorted(eligible, key=lambda i: (margins[i]["mean_margin"], i))[:n]
    out = []
    for i in order:
        window = np.array(stream[ends[i] - ctx:ends[i]], dtype=np.int64)
        targets = window[ctx // 2 + 1:].copy()  # make_windows' convention: first = ctx // 2
        if bos_id is not None:
            window[0] = bos_id
        out.append({"source": "greedy pack", "id": margins[i]["id"], "task": margins[i]["task"],
                    "mean_margin": margins[i]["mean_margin"], "answer": margins[i]["answer"],
                    "inputs": window.tolist(), "targets": targets.tolist()})
    return out


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

