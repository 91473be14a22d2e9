"""Monitoring evaluator on the training-side model: greedy exact match per task and perplexity.

Greedy: BOS + prompt, argmax decoding with a KV cache until a newline is produced (or 48 tokens);
the answer is the decoded text up to the first newline; exact match against the pack's answer.
Perplexity: llama-perplexity's method (text tokenized with BOS prepended, windows of n_ctx tokens, BOS
replaces the first token of each window, n_ctx/2 - 1 tokens of the second half scored per window); PPL = exp(mean NLL), standard error = PPL · sd(NLL)/sqrt(n-1)
as llama.cpp reports it. The official evaluators on GGUF are `seeddelta ppl/greedy`.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from seeddelta.assets import TINY_MODEL
from seeddelta.runtime.tokenizers.spm import SPMTokenizer, tiny_tokenizer
from seeddelta.tiny import dataset as ds
from seeddelta.tiny.checkpoint import load_checkpoint, model_from_checkpoint
from seeddelta.tiny.export import load_gguf_model
from seeddelta.tiny.model import TinyLlama

MAX_ANSWER_TOKENS = 48


def load_eval_model(ckpt: Path | None = None, gguf_path: Path | None = None) -> tuple[TinyLlama, SPMTokenizer]:
    if ckpt is not None:
        return model_from_checkpoint(load_checkpoint(ckpt)), tiny_tokenizer()
    return load_gguf_model(gguf_path if gguf_path is not None else TINY_MODEL)


@torch.no_grad()
def greedy_answer(model: TinyLlama, tok: SPMTokenizer, prompt: str, max_tokens: int = MAX_ANSWER_TOKENS) -> str:
    ids = tok.encode(prompt, add_bos=True)
    caches: list[dict] = [{} for _ in model.blocks]
    logits = model(torch.tensor([ids]), 0, caches)
    pos = len(ids)
    out: list[int] = []
    nl = tok.piece_to_id("<0x0A>")
    for _ in range(max_tokens):
        nxt = int(torch.argmax(logits[0, -1]))
        if nxt == nl or nxt == tok.eos_id or pos >= model.cfg.n_ctx:
            break
        out.append(nxt)
        logits = model(torch.tensor([[nxt]]), pos, caches)
        pos += 1
    return tok.decode(out).split("\n", 1)[0]


@torch.no_grad()
def perplexity(model: TinyLlama, ids: list[int], n_ctx: int, bos_id: int, chunks: int | None = None) -> dict:
    n_win = len(ids) // n_ctx
    if chunks is not None:
        n_win = min(n_win, chunks)
    nlls = []
    for w in range(n_win):
        chunk = list(ids[w * n_ctx:(w + 1) * n_ctx])
        chunk[0] = bos_id
        x = torch.tensor([chunk])
        lp = torch.log_softmax(model(x)[0].double(), dim=-1)
        # as perplexity.cpp: logits at positions first..n_ctx-2 predict tokens first+1..n_ctx-1
        first = n_ctx // 2
        tgt = x[0, first + 1:]
        nlls.append(-lp[first:n_ctx - 1].gather(1, tgt[:, None])[:, 0].numpy())
    if not nlls:
        return {"ppl": float("nan"), "se": float("nan"), "windows": 0, "tokens": 0}
    v = np.concatenate(nlls)
    mean = float(v.mean())
    sd = float(math.sqrt(max(0.0, (v ** 2).mean() - mean ** 2) / max(1, v.size - 1)))
    ppl = math.exp(mean)
    return {"ppl": ppl, "se": ppl * sd, "mean_nll": mean, "windows": n_win, "tokens": int(v.size)}


def evaluate_model(model_tok: tuple[TinyLlama, SPMTokenizer], pack: Path | None = None,
                   per_task: int | None = None, ctxs: list[int] | tuple[int, ...] = (512, 1024, 2048),
                   chunks: int | None = None, val_text: str | None = None) -> dict:
    model, tok = model_tok
    model.eval()
    recs = ds.load_test_pack(pack)
    greedy: dict[str, dict] = {}
    items = []
    for task in ds.TASKS:
        sel = [r for r in recs if r.task == task]
        if per_task is not None:
            sel = sel[:per_task]
        correct = 0
        for r in sel:
            got = greedy_answer(model, tok, r.prompt)
            ok = got == r.answer
            correct += ok
            items.append({"id": r.id, "answer": r.answer, "got": got, "ok": ok})
        greedy[task] = {"n": len(sel), "correct": correct, "accuracy": correct / max(1, len(sel))}
    # llama-perplexity tokenizes the whole text with BOS prepended (add_bos_token is true)
    ids = tok.encode(val_text if val_text is not None else ds.load_val_text(), add_bos=True)
    ppl = {str(c): perplexity(model, ids, c, tok.bos_id, chunks) for c in ctxs}
    return {"greedy": greedy, "ppl": ppl, "items": items}
