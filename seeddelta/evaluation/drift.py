"""Where a candidate's error enters and how it grows: the residual stream after every block, against the base's."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from seeddelta.runtime.model import LlamaModel


class LayerDrift:
    """Where the candidate's error enters and grows: after every block, the relative L2 distance
    ‖h_model − h_base‖ / ‖h_base‖, the cosine and the norm ratio of the two residual streams, per token, over every
    position of every window. Attach to both models, then run base before model on each window
    (as `kl_divergence` does)."""

    def __init__(self, base: LlamaModel, model: LlamaModel) -> None:
        self.base, self.model = base, model
        self.n_layer = len(base.layers)
        self._h: dict[int, torch.Tensor] = {}
        self.rel: list[list[np.ndarray]] = [[] for _ in range(self.n_layer)]
        self.cos: list[list[np.ndarray]] = [[] for _ in range(self.n_layer)]
        self.ratio: list[list[np.ndarray]] = [[] for _ in range(self.n_layer)]

    @staticmethod
    def applies(base: LlamaModel, model: LlamaModel) -> bool:
        return len(base.layers) == len(model.layers) and base.config.n_embd == model.config.n_embd

    @classmethod
    def of(cls, base: object, model: object) -> LayerDrift | None:
        """A drift table for two torch runtime models of the same shape, else None (llama.cpp offers no
        hook into the residual stream)."""
        if isinstance(base, LlamaModel) and isinstance(model, LlamaModel) and cls.applies(base, model):
            return cls(base, model)
        return None

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
