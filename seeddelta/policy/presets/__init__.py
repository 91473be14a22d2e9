"""The original's shipped policies (spec-policy-eval §1.11), re-written as JSON files here.

Same file names and meaning (version 1, the original's schema), so a policy name in the
original's notes means the same thing with `seeddelta`. They target the models they were made
for (Gemma 3 4B: 34 layers; Mistral 7B: 32; Qwen 7B: 28), so resolving them against a model
with fewer layers is an error naming the layer. Thresholds are written gate/up/down.
"""

from __future__ import annotations

from pathlib import Path

PRESET_DIR = Path(__file__).resolve().parent

# What each preset does, in one line (the files hold the exact values).
DESCRIPTIONS: dict[str, str] = {
    "policy.example.gemma.json": "layers 10-11 on and stripped, block 16, K 64/64/128, cos_x_w .45/.45/.25 & .30/.30/.15",
    "policy.example.qwen7b.json": "layers 15-20 on and stripped, K 256/256/512, cos_x_w, autotune over K schedules (4 tries)",
    "policy.gemma4b.baseline.json": "layers 10-11 on, kept dense, block 16, K 64, metric cos with all thresholds 0",
    "policy.gemma4b.baseline.allowdown.json": "baseline, ffn_down ungated (min_p05 -1)",
    "policy.gemma4b.down-only.json": "baseline, only ffn_down encoded",
    "policy.gemma4b.down-only.allowdown.json": "down-only, ffn_down ungated",
    "policy.gemma4b.gateup-only.json": "baseline, only ffn_gate and ffn_up encoded",
    "policy.gemma4b.gateup_k128.json": "layers 10-11 gate+up, K 128/128/64, block from the CLI",
    "policy.gemma4b.gateup_p05_0_2.json": "baseline with p05 0.2 for gate/up, ffn_down ungated",
    "policy.gemma4b.gateup_p05_0_35.json": "baseline with p05 0.35 for gate/up, ffn_down ungated",
    "policy.gemma4b.k128.json": "layers 10-11, block 16, K 128 everywhere, cos 0",
    "policy.gemma4b.k256.json": "layers 10-11, block 16, K 256 everywhere, cos 0",
    "policy.gemma4b.k128_cosxw.json": "k128 gated on cos_x_w",
    "policy.gemma4b.k128_ffnscore.json": "k128 gated on ffn_score",
    "policy.gemma4b.mixk_block16.json": "layers 10-11, block 16, K 32/32/256",
    "policy.gemma4b.mixk_block32.json": "layers 10-11, block 32, K 32/32/256",
    "policy.gemma4b.coo_gateup_k256.json": "layers 10-11 gate+up, K 256/256/64, no block",
    "policy.gemma4b.coo_gateup_k256_allowdown.json": "coo_gateup_k256 plus ffn_down, ungated",
    "policy.gemma4b.coo_gateup_k512.json": "layers 10-11 gate+up, K 512/512/64, no block",
    "policy.gemma4b.coo_gateup_k512_allowdown.json": "coo_gateup_k512 plus ffn_down, ungated",
    "policy.gemma4b.interleave_even_10_18.cli_strip.json": "gate+up on layers 10,12,14,16,18, strip from the CLI",
    "policy.gemma4b.interleave_odd_9_17.cli_strip.json": "gate+up on layers 9,11,13,15,17, strip from the CLI",
    "policy.mistral7b.abl.layer14.only.json": "layer 14 only, cos_x_w .60/.60/.50 & .45/.45/.35, autotune (5 tries)",
    "policy.mistral7b.abl.layers14-15.only.json": "as layer14.only on layers 14-15",
    "policy.mistral7b.abl.layers19-20.only.json": "as layer14.only on layers 19-20",
    "policy.mistral7b.stack-strict.19-23.json": "as layer14.only on layers 19-23",
    "policy.mistral7b.abl.layers14-23.down-only.json": "layers 14-23 ffn_down only, down thresholds .55/.40",
    "policy.mistral7b.base.json": "all layers but 0-5, stripped, thresholds and autotune tightening toward the end",
    "policy.mistral7b.base.no-strip.json": "all layers but 0-5, kept dense",
    "policy.mistral7b.down14-23.exported.json": "canonical export: only layer 23 ffn_down emitted, K 1536",
    "policy.qwen7b.down-heavy.json": "ffn_down (K 512) on 8-18, all three kinds on 19-20, autotune",
    "policy.qwen7b.stack-safe.json": "ffn_down on 8-18 with a long down schedule, all three kinds on 19-20",
}


def preset_names() -> list[str]:
    """File names of the shipped presets, sorted."""
    return sorted(p.name for p in PRESET_DIR.glob("*.json"))


def preset_path(name: str) -> Path:
    """Path of a shipped preset by file name (with or without `.json`)."""
    file = name if name.endswith(".json") else name + ".json"
    path = PRESET_DIR / file
    if not path.is_file():
        raise KeyError(f"no shipped preset {name!r}")
    return path
