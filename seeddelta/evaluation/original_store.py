"""The original model's logits and greedy answers, shared through files by the processes of one run.

Every measurement compares a candidate with the original on the same windows and prompts. Each
worker process used to compute the original's side itself, and again at every step (each step's
workers are new processes): on the tiny model ≈ 45 CPU-seconds per worker per full-text step, the
same numbers every time. Now the first process that computes one writes it under the run's work
directory and every other process reads it. The directory is keyed by the model's SHA-256 and the
measuring code's fingerprint, a logits file by the window's tokens: a changed model or runtime never
reads a stale file. float32 written by numpy reads back bit for bit and JSON keeps Python floats
exactly, so no figure depends on which process computed what (tests/toy/test_original_store.py).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from seeddelta.evaluation.result_cache import code_fingerprint
from seeddelta.evaluation.scoring import Logits
from seeddelta.outputs import AtomicOutput, write_json_atomic


class OriginalStore:
    """Files of the original's results under `root/original-<model>-<code>`; `root` None: memory only."""

    def __init__(self, root: Path | None, model_sha256: str) -> None:
        self.directory = None if root is None else root / f"original-{model_sha256[:16]}-{code_fingerprint()[:16]}"
        self._logits: dict[str, torch.Tensor] = {}

    def logits(self, compute: Logits) -> Logits:
        """`compute` (the original's logits of one window), each window computed once across processes."""

        def run(window: np.ndarray, first: int) -> torch.Tensor:
            key = hashlib.sha256(np.ascontiguousarray(window, dtype=np.int64).tobytes()
                                 + first.to_bytes(4, "little")).hexdigest()[:32]
            if key not in self._logits:
                self._logits[key] = self._load_or_make(key, lambda: compute(window, first))
            return self._logits[key]

        return run

    def _load_or_make(self, key: str, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        if self.directory is None:
            return make()
        path = self.directory / f"logits-{key}.npy"
        if path.is_file():
            return torch.from_numpy(np.load(path))
        value = make()
        self.directory.mkdir(parents=True, exist_ok=True)
        with AtomicOutput(path, "original's logits") as out, open(out.tmp, "wb") as fh:
            np.save(fh, value.numpy())
        return value

    def greedy(self, prompt_ids: list[str], compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """The original's greedy-pack result on these prompts (by id), computed once across processes."""
        if self.directory is None:
            return compute()
        key = hashlib.sha256("\0".join(prompt_ids).encode("utf-8")).hexdigest()[:32]
        path = self.directory / f"greedy-{key}.json"
        if path.is_file():
            return dict(json.loads(path.read_text(encoding="utf-8")))
        value = compute()
        self.directory.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, value, "original's greedy answers")
        return value
