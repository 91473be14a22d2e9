"""Evaluation on a loaded model: perplexity, KL divergence, imatrix statistics, throughput, memory.

Definitions (DESIGN §4, field-anchors §2.1, llama-perplexity):

* **Windows** — the whole text is tokenized once (with BOS in front when the vocabulary adds
  BOS); window i is tokens[i·n_ctx : (i+1)·n_ctx] with its first token replaced by BOS (when the
  vocabulary adds BOS); n_chunk = ⌊n_tokens / n_ctx⌋ (capped by --chunks); at least 2·n_ctx tokens
  are required. Only the second half is scored: positions j = first … n_ctx−2 with
  first = n_ctx/2, position j predicting token j+1 (n_ctx − 1 − first tokens per window).
* **PPL** = exp(mean NLL), NLL_j = −log softmax(logits_j)[target_j] (float64);
  ± PPL·sqrt((E[NLL²] − E[NLL]²)/(N−1)).
* **KLD** — KL(base ‖ model) = Σ_v p_v (log p_v − log q_v) per scored token, exact in float64 over
  the full vocabulary (no 16-bit base, no −16 cut-off); mean ± sqrt(var/(N−1)); percentiles by
  linear interpolation at fraction·(N−1). Same top p: share f of positions whose argmaxes agree,
  ± sqrt(f(1−f)/(N−1)). Δp = q(correct) − p(correct); RMS Δp ± 0.5/RMS·se(Δp²).
  Paired ΔNLL = NLL_model − NLL_base per token: mean ± sqrt(var/(N−1)) (= ln PPL ratio).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from seeddelta.evaluation.windows import Windows
from seeddelta.runtime.llama_cpp_engine import EvalModel

Logits = Callable[[np.ndarray, int], torch.Tensor]  # (window tokens, first) -> logits for positions first..


def model_logits(model: EvalModel) -> Logits:
    """Scored-position logits (n_ctx − 1 − first, n_vocab) of one window, from either engine's model."""

    def run(window: np.ndarray, first: int) -> torch.Tensor:
        return model.forward(window, logits_start=first)[:-1]

    return run


# ---------------------------------------------------------------------------------- statistics
def mean_se(x: np.ndarray) -> tuple[float, float]:
    """mean and sqrt((E[x²] − E[x]²)/(N−1)) (llama.cpp's uncertainty of a mean)."""
    x = np.asarray(x, dtype=np.float64)
    n = x.size
    if n == 0:
        return float("nan"), float("nan")
    m = float(x.mean())
    if n < 2:
        return m, float("nan")
    var = max(0.0, float((x * x).mean()) - m * m)
    return m, math.sqrt(var / (n - 1))


def ppl_from_nll(nll: np.ndarray) -> tuple[float, float]:
    """(PPL, its standard error) = (exp(mean), PPL·se(mean))."""
    m, se = mean_se(nll)
    ppl = math.exp(m)
    return ppl, ppl * se


def percentiles(x: np.ndarray, fractions: Sequence[float]) -> dict[str, float]:
    """Linear interpolation at fraction·(N−1) of the sorted values (llama.cpp's percentiles)."""
    s = np.sort(np.asarray(x, dtype=np.float64))
    out = {}
    for f in fractions:
        pos = f * (s.size - 1)
        lo = int(math.floor(pos))
        hi = min(lo + 1, s.size - 1)
        out[f"p{f * 100:g}"] = float(s[lo] + (s[hi] - s[lo]) * (pos - lo))
    return out


ROW_BLOCK_BYTES = 4 << 20  # float64 bytes of log-probabilities formed at once (rows are independent)


def row_blocks(n_rows: int, n_vocab: int) -> list[slice]:
    """Row ranges whose float64 (rows, n_vocab) arrays take about ROW_BLOCK_BYTES: a large vocabulary's
    float64 copies of a whole window (100 MB each at 49k tokens) are never formed."""
    step = max(1, ROW_BLOCK_BYTES // (8 * max(1, n_vocab)))
    return [slice(a, min(n_rows, a + step)) for a in range(0, n_rows, step)]


def nll_of(logits: torch.Tensor, targets: np.ndarray) -> np.ndarray:
    tgt = torch.as_tensor(targets, dtype=torch.int64)[:, None]
    parts = []
    for rows in row_blocks(logits.shape[0], logits.shape[-1]):
        lp = torch.log_softmax(logits[rows].to(torch.float64), dim=-1)
        parts.append(-lp.gather(1, tgt[rows])[:, 0])
    return torch.cat(parts).numpy()


# ---------------------------------------------------------------------------------- perplexity
@dataclass
class PplResult:
    nll: np.ndarray
    ppl: float
    se: float
    n_chunk: int
    n_ctx: int
    seconds: float  # forward time over all windows
    tokens_processed: int  # n_chunk · n_ctx

    @property
    def prompt_tok_per_s(self) -> float:
        return self.tokens_processed / self.seconds if self.seconds > 0 else float("nan")


def perplexity(logits_fn: Logits, windows: Windows, progress: Callable[[int, float], None] | None = None) -> PplResult:
    nlls: list[np.ndarray] = []
    seconds = 0.0
    for i in range(windows.n_chunk):
        t0 = time.perf_counter()
        lg = logits_fn(windows.inputs[i], windows.first)
        seconds += time.perf_counter() - t0
        nlls.append(nll_of(lg, windows.targets[i]))
        del lg  # not alive during the next window's forward (50 MB at a 49k vocabulary)
        if progress is not None:
            progress(i, math.exp(float(np.concatenate(nlls).mean())))
    nll = np.concatenate(nlls)
    ppl, se = ppl_from_nll(nll)
    return PplResult(nll, ppl, se, windows.n_chunk, windows.n_ctx, seconds, windows.n_chunk * windows.n_ctx)


# ---------------------------------------------------------------------------------- KLD
@dataclass
class KldResult:
    kld: np.ndarray
    same_top: np.ndarray  # bool
    dp: np.ndarray  # q(correct) − p(correct)
    nll_base: np.ndarray
    nll_model: np.ndarray
    n_chunk: int
    n_ctx: int
    base_prompt_tok_per_s: float = float("nan")
    model_prompt_tok_per_s: float = float("nan")

    def summary(self) -> dict[str, Any]:
        n = int(self.kld.size)
        kl_mean, kl_se = mean_se(self.kld)
        f = float(self.same_top.mean()) if n else float("nan")
        f_se = math.sqrt(f * (1 - f) / (n - 1)) if n > 1 else float("nan")
        dp_mean, dp_se = mean_se(self.dp)
        dp2_mean, dp2_se = mean_se(self.dp ** 2)
        rms = math.sqrt(dp2_mean)
        d = self.nll_model - self.nll_base
        d_mean, d_se = mean_se(d)
        ppl_b, ppl_b_se = ppl_from_nll(self.nll_base)
        ppl_m, ppl_m_se = ppl_from_nll(self.nll_model)
        corr = float(np.corrcoef(self.nll_base, self.nll_model)[0, 1]) if n > 1 and np.std(d) > 0 else 1.0
        fr = (0.999, 0.99, 0.95, 0.90, 0.5, 0.10, 0.05, 0.01, 0.001)
        return {
            "n_tokens": n,
            "kld": {"mean": kl_mean, "se": kl_se, "p99": percentiles(self.kld, [0.99])["p99"],
                    "max": float(self.kld.max()), "min": float(self.kld.min()), "percentiles": percentiles(self.kld, fr)},
            "same_top_p": {"mean": f, "se": f_se},
            "delta_p": {"mean": dp_mean, "se": dp_se, "rms": rms, "rms_se": 0.5 / rms * dp2_se if rms > 0 else 0.0,
                        "percentiles": percentiles(self.dp, (0.999, 0.99, 0.95, 0.90, 0.75, 0.5, 0.25, 0.10, 0.05, 0.01, 0.001))},
            "delta_nll": {"mean": d_mean, "se": d_se, "note": "paired: mean NLL_model − NLL_base = ln(PPL_model/PPL_base)"},
            "ppl_base": {"ppl": ppl_b, "se": ppl_b_se},
            "ppl_model": {"ppl": ppl_m, "se": ppl_m_se},
            "ppl_ratio": math.exp(d_mean),
            "nll_correlation": corr,
            "throughput": {"base_prompt_tok_per_s": self.base_prompt_tok_per_s,
                           "model_prompt_tok_per_s": self.model_prompt_tok_per_s},
        }


def kl_divergence(base_fn: Logits, model_fn: Logits, windows: Windows,
                  progress: Callable[[int], None] | None = None) -> KldResult:
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("kld", "same", "dp", "nb", "nm")}
    secs = [0.0, 0.0]
    for i in range(windows.n_chunk):
        t0 = time.perf_counter()
        lb = base_fn(windows.inputs[i], windows.first)
        t1 = time.perf_counter()
        lm = model_fn(windows.inputs[i], windows.first)
        secs[0] += t1 - t0
        secs[1] += time.perf_counter() - t1
        targets = torch.as_tensor(windows.targets[i], dtype=torch.int64)[:, None]
        for rows in row_blocks(lb.shape[0], lb.shape[-1]):
            lp = torch.log_softmax(lb[rows].to(torch.float64), dim=-1)
            lq = torch.log_softmax(lm[rows].to(torch.float64), dim=-1)
            p = lp.exp()
            tgt = targets[rows]
            parts["kld"].append((p * (lp - lq)).sum(-1).numpy())
            parts["same"].append((lp.argmax(-1) == lq.argmax(-1)).numpy())
            lpc, lqc = lp.gather(1, tgt)[:, 0], lq.gather(1, tgt)[:, 0]
            parts["dp"].append((lqc.exp() - lpc.exp()).numpy())
            parts["nb"].append((-lpc).numpy())
            parts["nm"].append((-lqc).numpy())
        del lb, lm, lp, lq, p  # not alive during the next window's forwards
        if progress is not None:
            progress(i)
    cat = {k: np.concatenate(v) for k, v in parts.items()}
    n = windows.n_chunk * windows.n_ctx
    return KldResult(cat["kld"], cat["same"].astype(bool), cat["dp"], cat["nb"], cat["nm"], windows.n_chunk, windows.n_ctx,
                     n / secs[0] if secs[0] > 0 else float("nan"), n / secs[1] if secs[1] > 0 else float("nan"))


def decode_speed(model: EvalModel, prompt: Sequence[int], n_new: int = 16) -> dict[str, float]:
    """Greedy decode n_new tokens after prompt with the KV cache; prompt and decode tok/s."""
    cache = model.new_cache(len(prompt) + n_new)
    t0 = time.perf_counter()
    lg = model.forward(list(prompt), cache)[-1]
    t1 = time.perf_counter()
    for _ in range(n_new):
        lg = model.forward([int(torch.argmax(lg))], cache)[-1]
    t2 = time.perf_counter()
    return {"prompt_tokens": len(prompt), "prompt_tok_per_s": len(prompt) / max(t1 - t0, 1e-9),
            "decode_tokens": n_new, "decode_tok_per_s": n_new / max(t2 - t1, 1e-9)}
