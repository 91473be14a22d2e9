"""Greedy pack: held-out prompts with known answers, decoded greedily with the model actually in use.

Per prompt: the input is BOS (when the vocabulary adds BOS) + the tokenized prompt; argmax
decoding with the KV cache (ties → lowest token id) until a newline appears in the decoded
continuation, EOS, or ``max_new`` tokens. The answer is the decoded text up to the first newline;
**exact match** compares it with the pack's answer character for character.

Collapse flags (any flag fails the pack, DESIGN §4):

* ``repetition_loop`` — the generated tokens contain a p-gram (1 <= p <= 8) repeated back to back
  at least ``LOOP_MIN_REPEATS`` times over at least ``LOOP_MIN_SPAN`` tokens; a correct answer is
  never flagged (an expected answer may itself repeat characters);
* ``empty`` — the answer is empty or whitespace;
* ``no_stop`` — neither a newline nor EOS within ``max_new`` tokens.

Verdict: PASS iff no prompt is flagged and, when a base model is given, the overall accuracy is
not below the base's by more than ``tolerance`` (absolute share, declared in the output).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from seeddelta.evaluation.pack import DEFAULT_MAX_NEW as DEFAULT_MAX_NEW
from seeddelta.evaluation.pack import DEFAULT_TOLERANCE as DEFAULT_TOLERANCE
from seeddelta.evaluation.pack import PackItem as PackItem
from seeddelta.evaluation.pack import load_pack as load_pack
from seeddelta.runtime.llama_cpp_engine import EvalModel
from seeddelta.runtime.tokenizers import Tokenizer

LOOP_MAX_PERIOD = 8
LOOP_MIN_REPEATS = 4
LOOP_MIN_SPAN = 16


def repetition_loop(ids: Sequence[int], max_period: int = LOOP_MAX_PERIOD, min_repeats: int = LOOP_MIN_REPEATS,
                    min_span: int = LOOP_MIN_SPAN) -> tuple[int, int] | None:
    """(period, span) of the longest back-to-back repetition meeting the thresholds, else None."""
    best: tuple[int, int] | None = None
    n = len(ids)
    for p in range(1, max_period + 1):
        run = 0
        for k in range(p, n):
            run = run + 1 if ids[k] == ids[k - p] else 0
            span = run + p
            if span >= min_span and span >= min_repeats * p and (best is None or span > best[1]):
                best = (p, span)
    return best


@dataclass
class Decoded:
    ids: list[int]
    text: str
    stop: str  # "newline" | "eos" | "max_new"
    prefill_tokens: int
    prefill_seconds: float
    decode_tokens: int
    decode_seconds: float


def greedy_decode(model: EvalModel, tokenizer: Tokenizer, prompt: str, max_new: int = DEFAULT_MAX_NEW) -> Decoded:
    add_bos = bool(getattr(tokenizer, "add_bos", True))
    ids = list(tokenizer.encode(prompt, add_bos=add_bos))
    cache = model.new_cache(len(ids) + max_new)
    t0 = time.perf_counter()
    logits = model.forward(ids, cache)[-1]
    t1 = time.perf_counter()
    out: list[int] = []
    stop = "max_new"
    n_decode = 0
    while True:
        nxt = int(torch.argmax(logits))
        if nxt == tokenizer.eos_id:
            stop = "eos"
            break
        out.append(nxt)
        if "\n" in tokenizer.decode(out):
            stop = "newline"
            break
        if len(out) >= max_new:
            break
        logits = model.forward([nxt], cache)[-1]
        n_decode += 1
    t2 = time.perf_counter()
    return Decoded(out, tokenizer.decode(out), stop, len(ids), t1 - t0, n_decode, t2 - t1)


def run_pack(model: EvalModel, tokenizer: Tokenizer, items: Sequence[PackItem], max_new: int = DEFAULT_MAX_NEW,
             progress: Callable[[], None] | None = None) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    prefill_t = decode_t = 0.0
    prefill_n = decode_n = 0
    for it in items:
        d = greedy_decode(model, tokenizer, it.prompt, max_new)
        answer = d.text.split("\n", 1)[0]
        ok = answer == it.answer
        flags = []
        loop = None if ok else repetition_loop(d.ids)
        if loop is not None:
            flags.append(f"repetition_loop(period={loop[0]},span={loop[1]})")
        if not answer.strip():
            flags.append("empty")
        if d.stop == "max_new":
            flags.append("no_stop")
        rows.append({"id": it.id, "task": it.task, "expected": it.answer, "answer": answer, "exact": ok,
                     "flags": flags, "stop": d.stop, "generated_tokens": len(d.ids)})
        prefill_t += d.prefill_seconds
        prefill_n += d.prefill_tokens
        decode_t += d.decode_seconds
        decode_n += d.decode_tokens
        if progress is not None:
            progress()
    tasks: dict[str, dict[str, Any]] = {}
    for r in rows:
        t = tasks.setdefault(r["task"], {"n": 0, "correct": 0, "flagged": 0})
        t["n"] += 1
        t["correct"] += int(r["exact"])
        t["flagged"] += int(bool(r["flags"]))
    for t in tasks.values():
        t["accuracy"] = t["correct"] / t["n"]
    n = len(rows)
    correct = sum(int(r["exact"]) for r in rows)
    return {
        "n": n,
        "correct": correct,
        "accuracy": correct / n if n else float("nan"),
        "flagged": sum(int(bool(r["flags"])) for r in rows),
        "tasks": tasks,
        "items": rows,
        "throughput": {
            "prompt_tokens": prefill_n, "prompt_tok_per_s": prefill_n / prefill_t if prefill_t > 0 else None,
            "decode_tokens": decode_n, "decode_tok_per_s": decode_n / decode_t if decode_t > 0 else None,
        },
    }


def verdict(result: dict[str, Any], base: dict[str, Any] | None, tolerance: float) -> dict[str, Any]:
    reasons = []
    if result["flagged"]:
        reasons.append(f"{result['flagged']} prompt(s) flagged")
    if base is not None and result["accuracy"] < base["accuracy"] - tolerance:
        reasons.append(f"accuracy {result['accuracy']:.4f} below base {base['accuracy']:.4f} - tolerance {tolerance}")
    return {"result": "FAIL" if reasons else "PASS", "reasons": reasons, "tolerance": tolerance,
            "rule": "PASS = no collapse flag and (with --base) accuracy >= base accuracy - tolerance"}
