"""Training loop for the tiny model: packed sequences, AdamW, warm-up + cosine, resumable checkpoints.

Determinism: the batch of step s is a pure function of (seed, s) (see `make_batch`), the learning
rate a pure function of s, and a checkpoint holds model + optimizer + step (+ RNG states for
completeness), so `--resume` continues bit-for-bit with the same thread count.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from seeddelta.assets import sha256_file
from seeddelta.errors import SeedDeltaError
from seeddelta.runtime.tokenizers.spm import SPMTokenizer, tiny_tokenizer
from seeddelta.tiny import dataset as ds
from seeddelta.tiny.checkpoint import load_checkpoint, save_atomic, save_checkpoint
from seeddelta.tiny.export import load_gguf_model
from seeddelta.tiny.model import TinyConfig, TinyLlama


@dataclass
class TrainConfig:
    seed: int = ds.DEFAULT_SEED
    steps: int = 3000
    lr: float = 2e-3
    min_lr_frac: float = 0.05
    warmup: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    # curriculum: (fraction of steps up to which the phase applies, sequence length, batch size)
    phases: list[tuple[float, int, int]] = field(default_factory=lambda: [(0.5, 512, 8), (1.0, 2048, 2)])
    answer_weight: float = 2.0          # loss weight of answer tokens (incl. the closing newline)
    task_weights: tuple[float, float, float] = (1.0, 2.0, 1.0)  # copy, sum, brackets
    boundary_start_prob: float = 0.5    # share of sequences starting exactly at a sample boundary
    threads: int = 2
    log_every: int = 10
    eval_every: int = 100
    ckpt_every_sec: float = 180.0
    model: dict = field(default_factory=dict)  # TinyConfig overrides (tests use small models)
    # added to the step index of the data stream: a warm-started continuation sees new batches
    data_offset: int = 0

    def phase(self, step: int) -> tuple[int, int]:
        for frac, T, B in self.phases:
            if step < frac * self.steps:
                return T, B
        return self.phases[-1][1], self.phases[-1][2]

    def lr_at(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        t = (step - self.warmup) / max(1, self.steps - self.warmup)
        return self.lr * (self.min_lr_frac + (1 - self.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["phases"] = [list(p) for p in self.phases]
        d["task_weights"] = list(self.task_weights)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        d = dict(d)
        d["phases"] = [tuple(p) for p in d["phases"]]
        d["task_weights"] = tuple(d["task_weights"])
        return cls(**d)


def model_config(tok: SPMTokenizer, cfg: TrainConfig) -> TinyConfig:
    return TinyConfig(n_vocab=tok.n_vocab, **cfg.model)


def make_batch(cfg: TrainConfig, step: int, tok: SPMTokenizer, heldout: set[str]
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(inputs (B,T), targets (B,T), answer mask (B,T)) for step `step`.

    Each row is BOS + a stream of concatenated samples; with probability 1 - boundary_start_prob the
    first sample is entered at a random token, as llama-perplexity's windows start mid-sample."""
    T, B = cfg.phase(step)
    rows, masks = [], []
    for b in range(B):
        rng = random.Random(f"seeddelta-tiny/{cfg.seed}/row/{step + cfg.data_offset}/{b}")
        stream = ds.train_samples(cfg.seed, (step + cfg.data_offset) * 1000 + b, heldout, cfg.task_weights)
        ids, msk = [tok.bos_id], [0]
        first = True
        while len(ids) < T + 1:
            s = next(stream)
            p = tok.encode(s.prompt)
            a = tok.encode(s.answer + "\n")
            sid, smask = p + a, [0] * len(p) + [1] * len(a)
            if first and rng.random() >= cfg.boundary_start_prob:
                k = rng.randrange(len(sid))
                sid, smask = sid[k:], smask[k:]
            first = False
            ids += sid
            msk += smask
        rows.append(ids[: T + 1])
        masks.append(msk[: T + 1])
    x = torch.tensor(rows, dtype=torch.long)
    m = torch.tensor(masks, dtype=torch.bool)
    return x[:, :-1], x[:, 1:], m[:, 1:]


def _param_groups(model: TinyLlama, wd: float) -> list[dict]:
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]


def build(cfg: TrainConfig, tok: SPMTokenizer) -> tuple[TinyLlama, torch.optim.Optimizer]:
    torch.manual_seed(cfg.seed)
    model = TinyLlama(model_config(tok, cfg))
    model.init_weights(cfg.seed)
    opt = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr,
                            betas=(cfg.beta1, cfg.beta2), eps=1e-8)
    return model, opt


@torch.no_grad()
def window_nll(model: TinyLlama, ids: list[int], n_ctx: int, bos_id: int, max_windows: int) -> tuple[float, int]:
    """Sum of NLL and count over llama-perplexity windows (BOS replaces the first token, second half scored)."""
    n_win = min(len(ids) // n_ctx, max_windows)
    tot, cnt = 0.0, 0
    for w in range(n_win):
        chunk = list(ids[w * n_ctx:(w + 1) * n_ctx])
        chunk[0] = bos_id
        x = torch.tensor([chunk])
        logits = model(x)[0].float()
        lp = torch.log_softmax(logits[:-1], dim=-1)
        tgt = x[0, 1:]
        nll = -lp.gather(1, tgt[:, None])[:, 0]
        first = n_ctx // 2
        part = nll[first:]  # as perplexity.cpp: predictions of tokens first+1..n_ctx-1
        tot += float(part.sum())
        cnt += part.numel()
    return tot, cnt


def train(cfg: TrainConfig, run_dir: Path, resume: bool = False, max_steps: int | None = None,
          log=print, val_text: str | None = None, steps_override: int | None = None,
          overrides: dict | None = None, init_from: Path | None = None) -> TinyLlama:
    """Train (or resume) into run_dir (ckpt.pt, best.pt, log.jsonl). `max_steps` stops early
    (tests) without changing the schedule. On resume the checkpoint's configuration is used;
    `steps_override` changes its total step count (and so the rest of the schedule), which is
    recorded in the state's "schedule_changes"; so are `overrides` (TrainConfig fields, e.g. phases).
    `init_from` warm-starts a new run from a tiny GGUF's weights (fresh optimizer and schedule);
    its path and sha256 are kept in the state so the manifest can name the parent model."""
    torch.set_num_threads(cfg.threads)
    tok = tiny_tokenizer()
    heldout = ds.heldout_texts(cfg.seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = run_dir / "ckpt.pt"
    if not resume and ckpt_path.exists():
        raise SeedDeltaError(f"{ckpt_path} exists; pass --resume or choose another --run-dir")
    model, opt = build(cfg, tok)
    state: dict[str, Any] = {"step": 0, "tokens": 0, "elapsed": 0.0, "best_val": None, "best_step": None}
    if init_from is not None:
        if resume:
            raise SeedDeltaError("--init-from starts a new run; it cannot be combined with --resume")
        _warm_start(model, init_from)
        state["init_from"] = {"path": str(init_from), "sha256": sha256_file(init_from)}
        save_checkpoint(ckpt_path, model, opt, cfg, state)  # the run dir names its parent from the start
        log(f"warm start from {init_from}")
    if resume:
        ck = load_checkpoint(ckpt_path)
        if TrainConfig.from_dict(ck["train_config"]) != cfg:
            log("note: resuming with the checkpoint's training configuration")
            cfg = TrainConfig.from_dict(ck["train_config"])
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        state = ck["state"]
        if steps_override is not None and steps_override != cfg.steps:
            state.setdefault("schedule_changes", []).append(
                {"at_step": state["step"], "steps_from": cfg.steps, "steps_to": steps_override})
            log(f"schedule change at step {state['step']}: total steps {cfg.steps} -> {steps_override}")
            cfg.steps = steps_override
        if overrides:
            d = cfg.to_dict()
            changed = {k: v for k, v in overrides.items() if d.get(k) != v}
            if changed:
                d.update(changed)
                state.setdefault("schedule_changes", []).append({"at_step": state["step"], "changed": changed})
                log(f"configuration change at step {state['step']}: {changed}")
                cfg = TrainConfig.from_dict(d)
        torch.set_rng_state(ck["rng"]["torch"])
        random.setstate(ck["rng"]["python"])
        log(f"resumed from {ckpt_path} at step {state['step']}")
    with open(run_dir / "train_config.json", "w") as f:
        json.dump({"train": cfg.to_dict(), "model": model.cfg.to_dict()}, f, indent=1)
    val_ids = tok.encode(val_text if val_text is not None else ds.load_val_text(), add_bos=True)
    logf = open(run_dir / "log.jsonl", "a")
    end = cfg.steps if max_steps is None else min(cfg.steps, max_steps)
    t_last_ckpt = time.time()
    t_start = time.time() - state["elapsed"]
    t_win, tok_win = time.time(), 0
    model.train()
    while state["step"] < end:
        step = state["step"]
        x, y, m = make_batch(cfg, step, tok, heldout)
        for g in opt.param_groups:
            g["lr"] = cfg.lr_at(step)
        logits = model(x)
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="none")
        w = 1.0 + (cfg.answer_weight - 1.0) * m.reshape(-1).float()
        loss = (nll * w).sum() / w.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        state["step"] = step + 1
        state["tokens"] += x.numel()
        tok_win += x.numel()
        state["elapsed"] = time.time() - t_start
        rec: dict = {}
        if state["step"] % cfg.log_every == 0 or state["step"] == end:
            now = time.time()
            rec = {"step": state["step"], "loss": round(float(loss.detach()), 5), "nll": round(float(nll.detach().mean()), 5),
                   "ans_nll": round(float(nll.detach()[m.reshape(-1)].mean()), 5) if m.any() else None,
                   "lr": cfg.lr_at(step), "gnorm": round(float(gnorm), 4), "T": x.shape[1],
                   "tok_s": round(tok_win / max(1e-9, now - t_win)), "tokens": state["tokens"],
                   "elapsed": round(state["elapsed"], 1)}
            t_win, tok_win = now, 0
        if state["step"] % cfg.eval_every == 0 or state["step"] == end:
            model.eval()
            n_ctx = min(512, model.cfg.n_ctx)
            s, c = window_nll(model, val_ids, n_ctx, tok.bos_id, max_windows=4)
            model.train()
            val = s / max(1, c)
            rec.setdefault("step", state["step"])
            rec["val_nll512"] = round(val, 5)
            if state["best_val"] is None or val < state["best_val"]:
                state["best_val"], state["best_step"] = val, state["step"]
                save_atomic(run_dir / "best.pt", {"model": model.state_dict(), "model_config": model.cfg.to_dict(),
                                                   "train_config": cfg.to_dict(), "state": dict(state)})
        if rec:
            line = " ".join(f"{k}={v}" for k, v in rec.items())
            log(line)
            logf.write(json.dumps(rec) + "\n")
            logf.flush()
        if time.time() - t_last_ckpt >= cfg.ckpt_every_sec or state["step"] == end:
            save_checkpoint(ckpt_path, model, opt, cfg, state)
            t_last_ckpt = time.time()
    logf.close()
    model.eval()
    return model


def _warm_start(model: TinyLlama, gguf_path: Path) -> None:
    parent, _ = load_gguf_model(gguf_path)
    if parent.cfg != model.cfg:
        raise SeedDeltaError(f"{gguf_path}: model configuration {parent.cfg} differs from the run's {model.cfg}")
    model.load_state_dict(parent.state_dict())


def _print_flush(s: str) -> None:
    print(s, flush=True)
    sys.stdout.flush()
