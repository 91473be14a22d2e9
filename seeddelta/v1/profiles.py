"""What each v1 experiment sweeps, per model.

SmolLM2-135M (30 layers, n_in 576 for gate/up, 1536 for down): the note's own values — the
gate-only policy {13, 15, 18, 20} at K_gate 128, K_down ∈ {256, 384, 512, 768}. The tiny model
(8 layers, n_in 192 / 768): the same shape scaled to it — gate at K 64 (a third of n_in, the regress
suite's default budget) in the non-adjacent middle layers {2, 4, 6}, K_down ∈ {128, 192, 256, 384}
(a sixth to a half of n_in). Any other model gets the tiny model's *fractions* of its own size.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from seeddelta.assets import TINY_MODEL
from seeddelta.gguf_format.reader import GGUFModel
from seeddelta.gguf_format.schema import KINDS

SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


@dataclass(frozen=True)
class Profile:
    name: str
    n_layer: int
    n_in: dict[str, int]
    gate_layers: tuple[int, ...]  # the gate-only reference policy
    K_gate: int
    down_layers: tuple[int, ...]  # H1: down in one of these layers at a time; H3a/H3b in the last of them
    K_down: tuple[int, ...]  # H1 sweep
    K_down_ref: int  # H2 (every layer alone), H3a, H3b
    h2_layers: tuple[int, ...]  # H2: down alone in each of these layers
    taus: tuple[float, ...] = (0.8, 0.65, 0.5)  # H3a: ‖Δ‖ ≤ τ·‖W‖ (a third of a row's largest entries hold ~0.85)
    dense_fractions: tuple[float, ...] = (0.125, 0.25, 0.5)  # H3b: share of down's rows kept dense

    def public(self) -> dict[str, object]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


def profile_for(model_path: str, sha256: str) -> Profile:
    """The profile of a model: the named ones by identity, else the tiny model's fractions."""
    model = GGUFModel(model_path, what="model")
    n = model.n_layer
    dims = {kind: model.weight_dims(0, kind)[0] for kind in KINDS}
    # down in layer 1 (the layer whose whole FFN the regress suite measured harmless) and in layer 4 (inside
    # the gate band): H3a/H3b try to repair the second
    tiny = Profile("tiny", 8, dims, (2, 4, 6), 64, (1, 4), (128, 192, 256, 384), 256, tuple(range(8)))
    if sha256 == SMOLLM2_SHA256:
        # bounded for a shared 2-core machine: two clamp values that bind (‖Δ‖/‖W‖ of a third of a row's
        # largest entries is ~0.85 for Gaussian rows), two dense shares, H2 on every fifth layer and the last
        return Profile("smollm2", n, dims, (13, 15, 18, 20), 128, (15,), (256, 384, 512, 768), 512,
                       tuple(range(0, n, 5)) + ((n - 1,) if (n - 1) % 5 else ()), taus=(0.75, 0.5),
                       dense_fractions=(0.125, 0.25))
    from pathlib import Path

    if Path(model_path).resolve() == TINY_MODEL.resolve() or (n == 8 and dims == {"ffn_gate": 192, "ffn_up": 192,
                                                                                      "ffn_down": 768}):
        return tiny
    d_in, g_in = dims["ffn_down"], dims["ffn_gate"]
    mid = n // 2
    return replace(
        tiny, name="generic", n_layer=n, gate_layers=tuple(x for x in (mid - 2, mid, mid + 2) if 0 <= x < n),
        K_gate=max(1, g_in // 3), down_layers=(mid,), K_down=tuple(max(1, d_in * f // 12) for f in (2, 3, 4, 6)),
        K_down_ref=max(1, d_in // 3), h2_layers=tuple(range(n)))
