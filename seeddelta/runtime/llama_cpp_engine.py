"""Stock llama.cpp as an evaluation engine, through llama-cpp-python (the optional extra `interop`).

`LlamaCppModel` offers the part of `LlamaModel` that evaluation uses — `forward(tokens, cache,
logits_start)` returning float32 logits, `new_cache(max_len)`, `config` and the bookkeeping shown in
reports — so windows, scoring, statistics and greedy decoding are the same code for both engines.
Tokens are always ours (the interop tier checks that llama.cpp tokenizes identically).

A file with SeedΔ tensors is first rewritten by `runtime.materialize.materialize_file` (Ŵ exactly
as the torch runtime's materialized mode holds it) into a temporary file, which is unlinked as soon
as llama.cpp has mapped it. llama.cpp computes as it always does: F16 weights multiply activations
rounded to F16, quantized weights multiply activations re-quantized to 8 bits per block, K/V are
held in F16 — which is what this engine is for.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from seeddelta.errors import SeedDeltaError
from seeddelta.gguf_format.reader import GGUFModel
from seeddelta.gguf_format.schema import KINDS, weight_name
from seeddelta.runtime.engines import DEFAULT_CTX
from seeddelta.runtime.model import LlamaConfig, LlamaModel, weight_source

INSTALL_HINT = ("pip install 'seeddelta[interop]' (in a checkout: .venv/bin/pip install -e '.[interop]'; it builds "
                "llama.cpp, several minutes)")


def import_llama_cpp() -> Any:
    """The llama_cpp module, or one SeedDeltaError line naming the install command."""
    try:
        import llama_cpp
    except ImportError as exc:
        raise SeedDeltaError(f"--engine llama.cpp needs llama-cpp-python, which is not importable ({exc}): "
                             f"{INSTALL_HINT}") from None
    return llama_cpp


@dataclass
class EngineCache:
    """Positions llama.cpp holds for this cache (one cache is live per engine at a time)."""

    max_len: int
    n: int = 0
    serial: int = 0


class LlamaCppModel:
    """One GGUF run by llama.cpp; see the module docstring."""

    kind = "llama.cpp"

    def __init__(self, path: str | os.PathLike[str], *, use_seeddelta: bool = True, n_ctx: int = DEFAULT_CTX,
                 threads: int = 0) -> None:
        self._llama_cpp = import_llama_cpp()
        self.path = os.fspath(path)
        src = GGUFModel(self.path, what="model")
        source = weight_source(src)
        self.config: LlamaConfig = source.config
        self.metadata: dict[str, Any] = {**source.meta, "mode": "materialized", "use_seeddelta": use_seeddelta,
                                         "engine": "llama.cpp"}
        self._n_seeddelta = len(src.seeddelta_weights()) if use_seeddelta else 0
        self._n_ffn = sum(1 for layer in range(self.config.n_layer) for kind in KINDS
                          if src.has(weight_name(layer, kind)) or (layer, kind) in src.seeddelta_weights())
        self.threads = int(threads) if threads and threads > 0 else (os.cpu_count() or 1)
        self._serial = 0
        self.layer_observer = None  # the engine has no hook into the residual stream (no drift table)
        self.ffn_observer = None
        del source
        if src.seeddelta_tensor_names():
            from seeddelta.runtime.materialize import materialize_file

            tmp_dir = tempfile.mkdtemp(prefix="seeddelta-llama-cpp-")
            run_path = os.path.join(tmp_dir, Path(self.path).stem + ".dense.gguf")
            try:
                materialize_file(src, run_path, use_seeddelta=use_seeddelta)
                self._sizes(GGUFModel(run_path, what="model"))
                self._open(run_path, n_ctx)
            finally:  # llama.cpp has mapped it (or failed): the name is not needed any more
                if os.path.exists(run_path):
                    os.unlink(run_path)
                os.rmdir(tmp_dir)
        else:
            self._sizes(src)
            self._open(self.path, n_ctx)

    # ------------------------------------------------------------------ bookkeeping (as LlamaModel)
    def _sizes(self, run: GGUFModel) -> None:
        """Bytes of the tensors llama.cpp runs (as stored; it maps them), all and FFN."""
        self._weight_bytes = sum(run.tensor_nbytes(n) for n in run.tensors)
        self._ffn_bytes = sum(run.tensor_nbytes(weight_name(layer, kind)) for layer in range(run.n_layer)
                              for kind in KINDS if run.has(weight_name(layer, kind)))

    @property
    def n_seeddelta(self) -> int:
        """SeedΔ weights of the file that llama.cpp runs materialized."""
        return self._n_seeddelta

    def projections(self) -> dict[str, Any]:
        return {f"ffn.{i}": None for i in range(self._n_ffn)}

    def weight_nbytes(self) -> int:
        return int(self._weight_bytes)

    def ffn_nbytes(self) -> int:
        return int(self._ffn_bytes)

    def nonfinite_outputs(self) -> int:
        return 0

    # ------------------------------------------------------------------ llama.cpp
    def _open(self, path: str, n_ctx: int) -> None:
        n_ctx = max(16, int(n_ctx))
        self.n_ctx = n_ctx
        self.llm = self._llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
                                         logits_all=True, verbose=False, n_threads=self.threads,
                                         n_threads_batch=self.threads)
        if int(self.llm.n_vocab()) != self.config.n_vocab:
            raise SeedDeltaError(f"{self.path}: llama.cpp reports {self.llm.n_vocab()} tokens, the file's metadata "
                                 f"{self.config.n_vocab}")

    def new_cache(self, max_len: int) -> EngineCache:
        if max_len > self.n_ctx:
            raise SeedDeltaError(f"llama.cpp engine: {max_len} positions do not fit its context of {self.n_ctx} "
                                 "(a larger -c sets it)")
        self._serial += 1
        self.llm.reset()
        return EngineCache(max_len, 0, self._serial)

    def forward(self, tokens: torch.Tensor | list[int] | np.ndarray, cache: EngineCache | None = None,
                logits_start: int = 0) -> torch.Tensor:
        """Float32 logits (T − logits_start, n_vocab) for tokens (T,) appended after the cache's contents
        (without a cache: a fresh sequence)."""
        ids = [int(t) for t in np.asarray(tokens, dtype=np.int64).reshape(-1)]
        if not ids:
            raise SeedDeltaError("forward: tokens must be a non-empty 1-D sequence")
        if min(ids) < 0 or max(ids) >= self.config.n_vocab:
            raise SeedDeltaError(f"forward: token id out of range [0, {self.config.n_vocab})")
        if cache is None:
            self.llm.reset()
            past = 0
        else:
            if cache.serial != self._serial or self.llm.n_tokens != cache.n:
                raise SeedDeltaError("llama.cpp engine: this cache is not the live one (one cache per engine at a time)")
            past = cache.n
        limit = cache.max_len if cache is not None else self.n_ctx
        if past + len(ids) > limit:
            raise SeedDeltaError(f"forward: {past + len(ids)} positions exceed the llama.cpp engine's "
                                 f"{'cache' if cache is not None else 'context'} of {limit}")
        self.llm.eval(ids)
        if cache is not None:
            cache.n = past + len(ids)
        return torch.from_numpy(np.array(self.llm.scores[past + logits_start: past + len(ids)], dtype=np.float32))

    __call__ = forward

    def close(self) -> None:
        """Free llama.cpp's model and context now (otherwise when the object is collected)."""
        llm = getattr(self, "llm", None)
        if llm is not None:
            llm.close()
            self.llm = None


class EvalModel(Protocol):
    """What evaluation needs from a model, met by the torch runtime's `LlamaModel` and by `LlamaCppModel`."""

    config: LlamaConfig
    path: str
    metadata: dict[str, Any]

    @property
    def n_seeddelta(self) -> int: ...
    def forward(self, tokens: Any, cache: Any = None, logits_start: int = 0) -> torch.Tensor: ...
    def new_cache(self, max_len: int) -> Any: ...
    def projections(self) -> dict[str, Any]: ...
    def weight_nbytes(self) -> int: ...
    def ffn_nbytes(self) -> int: ...
    def nonfinite_outputs(self) -> int: ...


_ENGINE_MODELS: tuple[type[EvalModel], ...] = (LlamaModel, LlamaCppModel)  # both meet the protocol (mypy checks)
