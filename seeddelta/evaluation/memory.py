"""Loading a model for evaluation, with the resident memory it costs measured around the load."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from seeddelta.errors import SeedDeltaError
from seeddelta.gguf_format.reader import GGUFModel
from seeddelta.gguf_format.seeddelta_tensors import check_seeddelta_file
from seeddelta.runtime.engines import DEFAULT_CTX, ENGINES
from seeddelta.runtime.llama_cpp_engine import EvalModel, LlamaCppModel
from seeddelta.runtime.model import load_model, load_tokenizer, weight_source
from seeddelta.runtime.tokenizers import Tokenizer


def trim_heap() -> None:
    """Return freed heap pages to the OS (glibc malloc_trim), so RSS reflects live data only."""
    import gc

    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
MMAP_THRESHOLD_BYTES = 1 << 20


def fixed_mmap_threshold(nbytes: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Serve every allocation of >= nbytes by its own mapping, returned to the OS when freed.

    glibc raises its mmap threshold (up to 32 MiB) after the first large free, after which freed
    activation and logit buffers stay in the heap: on SmolLM2 that retention was ~90 MB of the peak
    resident memory of `seeddelta ppl` (750 → 664 MB). A fixed threshold turns that adjustment off;
    it costs one mapping and its page faults per buffer of >= 1 MiB (milliseconds per forward).
    Returns False where mallopt is unavailable (not glibc)."""
    try:
        import ctypes

        return bool(ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, int(nbytes)))
    except (OSError, AttributeError):
        return False


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
    model: EvalModel
    tokenizer: Tokenizer
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
            "method": "weights_bytes = sum of nbytes of every tensor the loaded model holds (as stored for "
                      "F32/F16/BF16, float16 for quantized types, materialized SeedΔ float16 unless the model is "
                      "F32; SeedΔ sparse: int32 indices + float32 values + base); rss_* = process "
                      "resident set size (psutil or /proc/self/statm) just before and after loading in this process; "
                      "rss_anon_* = its anonymous part (RssAnon), without library code pages touched by the load; "
                      "engine llama.cpp: weights_bytes = the tensors of the (materialized) file it maps, as stored",
        }


def load(path: str | Path, *, use_seeddelta: bool = True, mode: str = "materialized", hold: str = "stored",
         engine: str = "torch", n_ctx: int = DEFAULT_CTX, threads: int = 0) -> Loaded:
    """Model and tokenizer from one opening of the file. The metadata (tokenizer, configuration) is read
    first and the reader let go before the weights are read, so the two are never resident together.

    engine "llama.cpp": stock llama.cpp runs the file (SeedΔ materialized first; `mode` and `hold` do not
    apply), with a context of n_ctx positions and `threads` threads (0: every CPU)."""
    if engine not in ENGINES:
        raise SeedDeltaError(f"engine {engine!r} unknown (expected one of {', '.join(ENGINES)})")
    fixed_mmap_threshold()
    gguf_model = GGUFModel(path, what="model")
    if use_seeddelta:
        check_seeddelta_file(gguf_model)  # a damaged SeedΔ file fails now, before anything is measured or decoded
    trim_heap()
    before, anon_before = rss_bytes(), rss_anon_bytes()
    t0 = time.perf_counter()
    tokenizer = load_tokenizer(gguf_model)
    model: EvalModel
    if engine == "llama.cpp":
        del gguf_model
        model = LlamaCppModel(path, use_seeddelta=use_seeddelta, n_ctx=n_ctx, threads=threads)
    else:
        source = weight_source(gguf_model)
        del gguf_model
        trim_heap()
        model = load_model(source, use_seeddelta=use_seeddelta, mode=mode, hold=hold)
        del source
    seconds = time.perf_counter() - t0
    trim_heap()
    after, anon_after = rss_bytes(), rss_anon_bytes()
    return Loaded(model, tokenizer, seconds, before, after, anon_before, anon_after)


def model_info(loaded: Loaded) -> dict[str, Any]:
    m = loaded.model
    projections = m.projections()
    return {
        "path": str(m.path),
        "engine": "llama.cpp" if isinstance(m, LlamaCppModel) else "torch",
        "seeddelta_projections": int(m.n_seeddelta),
        "ffn_projections": len(projections),
        "seeddelta_mode": m.metadata.get("mode") if m.n_seeddelta else None,
        "use_seeddelta": bool(m.metadata.get("use_seeddelta")),
        "strip_dense": bool(m.metadata.get("strip_dense")),
        "load_seconds": loaded.load_seconds,
        "memory": loaded.memory(),
    }
