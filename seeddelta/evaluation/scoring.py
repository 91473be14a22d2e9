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
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from seeddelta.errors import SeedDeltaError

Logits = Callable[[np.ndarray, int], torch.Tensor]  # (window tokens, first) -> logits for positions first..


# ---------------------------------------------------------------------------------- windows
@dataclass(frozen=True)
class Windows:
    inputs: np.ndarray  # (n_chunk, n_ctx) int64, first token replaced by BOS when the vocab adds BOS
    targets: np.ndarray  # (n_chunk, n_ctx - 1 - first) int64
    n_ctx: int
    first: int
    n_text_tokens: int

    @property
    def n_chunk(self) -> int:
        return int(self.inputs.shape[0])

    @property
    def n_scored(self) -> int:
        return int(self.targets.size)


def make_windows(tokens: Sequence[int] | np.ndarray, n_ctx: int, chunks: int | None = None,
                 bos_id: int | None = None, what: str = "text") -> Windows:
    toks = np.asarray(tokens, dtype=np.int64)
    if n_ctx < 4:
        raise SeedDeltaError(f"context size -c {n_ctx} is too small (need >= 4)")
    if toks.size < 2 * n_ctx:
        raise SeedDeltaError(f"{what} has {toks.size} tokens; llama-perplexity's method needs at least "
                             f"2·n_ctx = {2 * n_ctx} (use a smaller -c or a longer text)")
    n_chunk = toks.size // n_ctx
    if chunks is not None and chunks > 0:
        n_chunk = min(n_chunk, chunks)
    first = n_ctx // 2
    inputs = toks[: n_chunk * n_ctx].reshape(n_chunk, n_ctx).copy()
    targets = inputs[:, first + 1:].copy()
    if bos_id is not None:
        inputs[:, 0] = bos_id
    return Windows(inputs, targets, n_ctx, first, int(toks.size))


def tokenize_text(tokenizer: Any, text: str) -> list[int]:
    """Tokenize the whole text once, with BOS first when the vocabulary adds BOS (llama-perplexity)."""
    return list(tokenizer.encode(text, add_bos=bool(getattr(tokenizer, "add_bos", True))))


def window_bos(tokenizer: Any) -> int | None:
    return int(tokenizer.bos_id) if getattr(tokenizer, "add_bos", True) else None


def model_logits(model: Any) -> Logits:
    """Scored-position logits (n_ctx − 1 − first, n_vocab) of one window, from a LlamaModel-like object."""

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


def nll_of(logits: torch.Tensor, targets: np.ndarray) -> np.ndarray:
    lp = torch.log_softmax(logits.to(torch.float64), dim=-1)
    return (-lp.gather(1, torch.as_tensor(targets, dtype=torch.int64)[:, None])[:, 0]).numpy()


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
        lp = torch.log_softmax(lb.to(torch.float64), dim=-1)
        lq = torch.log_softmax(lm.to(torch.float64), dim=-1)
        p = lp.exp()
        tgt = torch.as_tensor(windows.targets[i], dtype=torch.int64)[:, None]
        parts["kld"].append((p * (lp - lq)).sum(-1).numpy())
        parts["same"].append((lp.argmax(-1) == lq.argmax(-1)).numpy())
        lpc, lqc = lp.gather(1, tgt)[:, 0], lq.gather(1, tgt)[:, 0]
        parts["dp"].append((lqc.exp() - lpc.exp()).numpy())
        parts["nb"].append((-lpc).numpy())
        parts["nm"].append((-lqc).numpy())
        if progress is not None:
            progress(i)
    cat = {k: np.concatenate(v) for k, v in parts.items()}
    n = windows.n_chunk * windows.n_ctx
    return KldResult(cat["kld"], cat["same"].astype(bool), cat["dp"], cat["nb"], cat["nm"], windows.n_chunk, windows.n_ctx,
                     n / secs[0] if secs[0] > 0 else float("nan"), n / secs[1] if secs[1] > 0 else float("nan"))


class LayerDrift:
    """Where the candidate's error enters and grows: after every block, the relative L2 distance
    ‖h_model − h_base‖ / ‖h_base‖, the cosine and the norm ratio of the two residual streams, per token, over every
    position of every window. Attach to both models, then run base before model on each window
    (as `kl_divergence` does)."""

    def __init__(self, base: Any, model: Any) -> None:
        self.base, self.model = base, model
        self.n_layer = len(base.layers)
        self._h: dict[int, torch.Tensor] = {}
        self.rel: list[list[np.ndarray]] = [[] for _ in range(self.n_layer)]
        self.cos: list[list[np.ndarray]] = [[] for _ in range(self.n_layer)]
        self.ratio: list[list[np.ndarray]] = [[] for _ in range(self.n_layer)]

    @staticmethod
    def applies(base: Any, model: Any) -> bool:
        return len(base.layers) == len(model.layers) and base.config.n_embd == model.config.n_embd

    def _keep(self, layer: int, h: torch.Tensor) -> None:
        self._h[layer] = h  # a fresh tensor per block (h = h + …), never written again; float64 only when compared

    def _compare(self, layer: int, h: torch.Tensor) -> None:
        hb, hm = self._h.pop(layer).to(torch.float64), h.to(torch.float64)
        nb, nm = hb.norm(dim=-1).clamp_min(1e-300), hm.norm(dim=-1).clamp_min(1e-300)
        self.rel[layer].append(((hm - hb).norm(dim=-1) / nb).numpy())
        self.cos[layer].append(((hm * hb).sum(-1) / (nb * nm)).numpy())
        self.ratio[layer].append((nm / nb).numpy())

    def __enter__(self) -> LayerDrift:
        self.base.layer_observer, self.model.layer_observer = self._keep, self._compare
        return self

    def __exit__(self, *exc: object) -> None:
        self.base.layer_observer = self.model.layer_observer = None

    def summary(self) -> list[dict[str, Any]]:
        out = []
        for i in range(self.n_layer):
            rel, cos = np.concatenate(self.rel[i]), np.concatenate(self.cos[i])
            out.append({"layer": i, "rel_l2_mean": float(rel.mean()), "rel_l2_p95": float(np.percentile(rel, 95)),
                        "cos_mean": float(cos.mean()), "cos_p05": float(np.percentile(cos, 5)),
                        "norm_ratio_mean": float(np.concatenate(self.ratio[i]).mean())})
        return out


# ---------------------------------------------------------------------------------- imatrix
def collect_imatrix(model: Any, windows: Windows) -> tuple[dict[str, np.ndarray], dict[str, int]]:
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
    finally:
        model.ffn_observer = previous
    return sums, counts


# ---------------------------------------------------------------------------------- throughput / memory
def trim_heap() -> None:
    """Return freed heap pages to the OS (glibc malloc_trim), so RSS reflects live data only."""
    import gc

    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def rss_bytes() -> int | None:
    """Resident set size of this process (psutil when installed, else /proc/self/statm)."""
    try:
        import psutil

        return int(psutil.Process(os.getpid()).memory_info().rss)
    except ImportError:
        pass
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def rss_anon_bytes() -> int | None:
    """Anonymous (private, not file-backed) resident memory of this process, from /proc/self/status.

    Unlike the whole RSS it leaves out shared-library code that a load happens to touch for the
    first time (torch kernels: several MiB), so its change over a load is the memory the model holds."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


@dataclass
class Loaded:
    model: Any
    tokenizer: Any
    load_seconds: float
    rss_before: int | None
    rss_after: int | None
    anon_before: int | None = None
    anon_after: int | None = None

    def memory(self) -> dict[str, Any]:
        def delta(before: int | None, after: int | None) -> int | None:
            return None if before is None or after is None else after - before

        return {
            "weights_bytes": int(self.model.weight_nbytes()),
            "ffn_bytes": int(self.model.ffn_nbytes()),
            "rss_before_load_bytes": self.rss_before,
            "rss_after_load_bytes": self.rss_after,
            "rss_load_delta_bytes": delta(self.rss_before, self.rss_after),
            "rss_anon_load_delta_bytes": delta(self.anon_before, self.anon_after),
            "method": "weights_bytes = sum of nbytes of every tensor the loaded model holds (float32 after "
                      "dequantization; SeedΔ sparse: int32 indices + float32 values + base); rss_* = process "
                      "resident set size (psutil or /proc/self/statm) just before and after loading in this process; "
                      "rss_anon_* = its anonymous part (RssAnon), without library code pages touched by the load",
        }


def load(path: str | Path, *, use_seeddelta: bool = True, mode: str = "materialized") -> Loaded:
    from seeddelta.runtime.model import load_model, load_tokenizer

    trim_heap()
    before, anon_before = rss_bytes(), rss_anon_bytes()
    t0 = time.perf_counter()
    model = load_model(path, use_seeddelta=use_seeddelta, mode=mode)
    seconds = time.perf_counter() - t0
    trim_heap()
    after, anon_after = rss_bytes(), rss_anon_bytes()
    return Loaded(model, load_tokenizer(path), seconds, before, after, anon_before, anon_after)


def decode_speed(model: Any, prompt: Sequence[int], n_new: int = 16) -> dict[str, float]:
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


# ---------------------------------------------------------------------------------- I/O helpers
def read_text(path: str | Path) -> str:
    p = Path(path)
    try:
        with open(p, encoding="utf-8", newline="") as f:
            return f.read()
    except FileNotFoundError:
        raise SeedDeltaError(f"text file not found: {p}") from None
    except UnicodeDecodeError as exc:
        raise SeedDeltaError(f"text file {p} is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise SeedDeltaError(f"cannot read text file {p}: {exc.strerror or exc}") from None


def default_model() -> Path:
    try:
        from seeddelta.tiny import default_model_path
    except ImportError as exc:
        raise SeedDeltaError(f"no -m MODEL given and the tiny model package is unavailable ({exc})") from None
    p = Path(default_model_path())
    if not p.is_file():
        raise SeedDeltaError(f"no -m MODEL given and the default tiny model {p} does not exist yet "
                             "(train and export it with `seeddelta tiny`)")
    return p


def default_text() -> Path:
    try:
        from seeddelta.tiny.dataset import default_val_text_path
    except ImportError as exc:
        raise SeedDeltaError(f"no -f TEXT given and the tiny dataset package is unavailable ({exc})") from None
    p = Path(default_val_text_path())
    if not p.is_file():
        raise SeedDeltaError(f"no -f TEXT given and the default validation text {p} does not exist yet")
    return p


def chunk_printer(stream: Any = None) -> Callable[[int, float], None]:
    """llama-perplexity style running estimate: [1]x.xxxx,[2]y.yyyy,…"""
    out = stream or sys.stderr

    def show(i: int, ppl: float) -> None:
        out.write(f"[{i + 1}]{ppl:.4f},")
        out.flush()

    return show



# ---------------------------------------------------------------------------------- CLI helpers
def add_runtime_args(p: Any) -> None:
    """Options shared by ppl, kld, greedy and imatrix."""
    p.add_argument("--sparse", action="store_true",
                   help="evaluate SeedΔ projections without building dense weights (default: materialized)")
    p.add_argument("--no-seeddelta", dest="use_seeddelta", action="store_false",
                   help="ignore SeedΔ tensors and run the dense weights (fails on stripped files)")
    p.add_argument("-t", "--threads", type=int, default=0, metavar="N", help="torch threads (0: torch's default)")


def add_model_arg(p: Any, what: str = "GGUF model") -> None:
    p.add_argument("-m", "--model", default=None, metavar="FILE", help=f"{what} (default: the tiny model)")


def add_text_args(p: Any, text_help: str = "UTF-8 text") -> None:
    """-f/-c/--chunks of ppl, kld and imatrix (llama-perplexity's flags)."""
    p.add_argument("-f", "--file", default=None, metavar="TEXT",
                   help=f"{text_help} (default: the tiny model's validation text)")
    p.add_argument("-c", "--ctx-size", dest="ctx", type=int, default=512, metavar="N", help="window size n_ctx (512)")
    p.add_argument("--chunks", type=int, default=-1, metavar="N", help="at most N windows (-1: all)")


class TextWindows(NamedTuple):
    path: Path
    text: str
    tokens: list[int]
    windows: Windows


def text_windows(args: Any, tokenizer: Any) -> TextWindows:
    """The text named by -f (or the default), its tokens and its llama-perplexity windows under `tokenizer`."""
    text_path = Path(args.file) if args.file else default_text()
    text = read_text(text_path)
    tokens = tokenize_text(tokenizer, text)
    windows = make_windows(tokens, args.ctx, args.chunks, window_bos(tokenizer), what=str(text_path))
    return TextWindows(text_path, text, tokens, windows)


def apply_threads(args: Any) -> None:
    if getattr(args, "threads", 0) and args.threads > 0:
        torch.set_num_threads(int(args.threads))


def load_from_args(args: Any, path: str | Path) -> Loaded:
    return load(path, use_seeddelta=bool(args.use_seeddelta), mode="sparse" if args.sparse else "materialized")


def model_info(loaded: Loaded) -> dict[str, Any]:
    m = loaded.model
    projections = m.projections()
    return {
        "path": str(m.path),
        "seeddelta_projections": int(m.n_seeddelta),
        "ffn_projections": len(projections),
        "seeddelta_mode": m.metadata.get("mode") if m.n_seeddelta else None,
        "use_seeddelta": bool(m.metadata.get("use_seeddelta")),
        "strip_dense": bool(m.metadata.get("strip_dense")),
        "load_seconds": loaded.load_seconds,
        "memory": loaded.memory(),
    }
