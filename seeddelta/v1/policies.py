"""The policy documents the v1 experiments build: the gate-only reference and what each setting
adds to it. Every setting is a complete version-2 policy text (`seeddelta build --policy` with the
encoding flags of the run reproduces its file), and its text is part of the measurement's cache key.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from seeddelta.v1.profiles import Profile

NO_GATING = {"metric": "cos_x_w", "min_mean": -1, "min_p05": -1}  # every tensor the policy enables is written


def _layer_rule(kinds: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """A `layers.N` rule enabling exactly `kinds` (kind -> extra tensor keys), the others off."""
    tensors = {k: {"enabled": k in kinds, **dict(kinds.get(k, {}))} for k in ("ffn_gate", "ffn_up", "ffn_down")}
    return {"enabled": True, "tensors": tensors}


def policy_text(p: Profile, gate_layers: Iterable[int], down: Mapping[int, Mapping[str, Any]] | None = None,
                gate_extra: Mapping[str, Any] | None = None) -> str:
    """Gate (at p.K_gate, with `gate_extra` keys) in `gate_layers`, ffn_down in the layers of `down`
    (layer -> its tensor keys, e.g. {"K": 256, "delta_norm_clamp": 0.5}); nothing else."""
    down = dict(down or {})
    layers: dict[str, Any] = {}
    for layer in sorted(set(gate_layers) | set(down)):
        kinds: dict[str, dict[str, Any]] = {}
        if layer in set(gate_layers):
            kinds["ffn_gate"] = dict(gate_extra or {})
        if layer in down:
            kinds["ffn_down"] = dict(down[layer])
        layers[str(layer)] = _layer_rule(kinds)
    doc = {"version": 2,
           "defaults": {"enabled": False, "strip_dense": True,
                        "K": {"gate": p.K_gate, "up": p.n_in["ffn_up"] // 3, "down": p.K_down_ref},
                        "gating": dict(NO_GATING)},
           "layers": layers}
    return json.dumps(doc, indent=2, sort_keys=False) + "\n"


def gate_only(p: Profile) -> str:
    return policy_text(p, p.gate_layers)
