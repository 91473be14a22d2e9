"""The original's shipped policies (spec-policy-eval §1.11), re-written in seeddelta/policy/presets/:
every one checks strictly and resolves through the CLI, and resolves to what the spec's table says.

Run: .venv/bin/python -m pytest tests/toy/test_policy_presets.py
"""

from __future__ import annotations

import json

import pytest

from seeddelta.cli import main
from seeddelta.policy import export_policy, export_text, load_policy, resolve
from seeddelta.policy.presets import DESCRIPTIONS, preset_names, preset_path
from seeddelta.testing.synthetic_gguf import make_llama_gguf

N_LAYER = 34  # Gemma 3 4B, the largest target among the presets (Mistral 7B: 32, Qwen 7B: 28)


@pytest.fixture(scope="module")
def model34(tmp_path_factory):
    return make_llama_gguf(tmp_path_factory.mktemp("presets") / "m34.gguf", n_layer=N_LAYER, n_embd=32, n_ff=32,
                           seed=5)


def test_every_preset_is_described_and_every_description_has_a_file():
    assert preset_names() == sorted(DESCRIPTIONS)
    assert len(preset_names()) == 32  # the rows of §1.11


@pytest.mark.parametrize("name", preset_names())
def test_preset_checks_strictly_and_resolves_through_the_cli(name, model34, tmp_path, capsys):
    path = str(preset_path(name))
    assert main(["policy", "check", path, "--policy-strict"]) == 0
    out_json = tmp_path / "r.json"
    assert main(["policy", "resolve", path, "-m", model34.path, "--policy-strict", "--json", str(out_json)]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    doc = json.loads(out_json.read_text())
    assert len(doc["tensors"]) == 3 * N_LAYER
    assert load_policy(path, strict=True).version == 1


def r(name: str, layer: int, kind: str):
    return resolve(load_policy(preset_path(name), strict=True), layer, kind)


def test_gemma_example_semantics():
    name = "policy.example.gemma.json"
    assert not r(name, 9, "ffn_gate").enabled and not r(name, 12, "ffn_down").enabled
    down = r(name, 11, "ffn_down")
    assert (down.enabled, down.strip_dense, down.block, down.K, down.metric) == (True, True, 16, 128, "cos_x_w")
    assert (down.min_mean, down.min_p05) == (0.25, 0.15) and not down.autotune.enabled
    assert (r(name, 10, "ffn_up").K, r(name, 10, "ffn_up").min_mean) == (64, 0.45)


def test_gemma4b_allowdown_and_tensor_selection():
    base = r("policy.gemma4b.baseline.json", 10, "ffn_down")
    assert base.gating_enabled and (base.metric, base.min_mean, base.min_p05, base.K) == ("cos", 0.0, 0.0, 64)
    assert not base.strip_dense
    allow = r("policy.gemma4b.baseline.allowdown.json", 10, "ffn_down")
    assert not allow.gating_enabled and r("policy.gemma4b.baseline.allowdown.json", 10, "ffn_gate").gating_enabled
    down_only = [r("policy.gemma4b.down-only.json", 11, k).enabled for k in ("ffn_gate", "ffn_up", "ffn_down")]
    assert down_only == [False, False, True]
    gateup = [r("policy.gemma4b.gateup_k128.json", 10, k) for k in ("ffn_gate", "ffn_up", "ffn_down")]
    assert [g.enabled for g in gateup] == [True, True, False] and [g.K for g in gateup] == [128, 128, 64]
    assert gateup[0].source["block"] == "baseline"  # no block key: the CLI's
    assert not r("policy.gemma4b.gateup_p05_0_35.json", 10, "ffn_down").gating_enabled
    assert r("policy.gemma4b.gateup_p05_0_35.json", 10, "ffn_up").min_p05 == 0.35
    assert r("policy.gemma4b.k128_ffnscore.json", 10, "ffn_up").metric == "ffn_score"
    assert r("policy.gemma4b.mixk_block32.json", 11, "ffn_down").K == 256
    ad = r("policy.gemma4b.coo_gateup_k512_allowdown.json", 10, "ffn_down")
    assert ad.enabled and not ad.gating_enabled and ad.K == 64


def test_interleave_strip_follows_the_cli():
    name = "policy.gemma4b.interleave_odd_9_17.cli_strip.json"
    assert [r(name, layer, "ffn_gate").enabled for layer in (9, 10, 17, 18)] == [True, False, True, False]
    assert r(name, 13, "ffn_up").source["strip_dense"] == "baseline"


def test_mistral_base_bands():
    name = "policy.mistral7b.base.json"
    assert not r(name, 5, "ffn_gate").enabled and r(name, 6, "ffn_gate").enabled
    mid, late = r(name, 10, "ffn_down"), r(name, 25, "ffn_down")
    assert (mid.min_mean, mid.min_p05, mid.K) == (0.35, 0.22, 512)
    assert mid.k_schedule() == [512, 768, 1024, 1280]
    assert (late.min_mean, late.min_p05, late.K) == (0.40, 0.25, 640)
    assert late.k_schedule() == [512, 768, 1024, 1536]
    assert r(name, 2, "ffn_up").k_schedule() == [128, 256, 384, 512, 640]  # defaults' schedule, max_iters 5
    assert all(r(name, layer, "ffn_up").strip_dense for layer in (0, 10, 31))


def test_qwen_stack_safe_gate_up_keep_the_baseline_thresholds():
    name = "policy.qwen7b.stack-safe.json"
    down, gate = r(name, 12, "ffn_down"), r(name, 12, "ffn_gate")
    assert down.enabled and (down.min_mean, down.min_p05) == (0.45, 0.30)
    assert down.k_schedule() == [256, 512, 768, 1024, 1536, 2048]
    assert not gate.enabled and gate.source["min_mean"] == "baseline"
    assert r(name, 20, "ffn_down").min_p05 == 0.25 and r(name, 20, "ffn_gate").k_schedule() == [128, 256, 384, 512]
    assert r("policy.qwen7b.down-heavy.json", 8, "ffn_down").K == 512


def test_mistral_exported_preset_is_the_canonical_export_of_its_decisions():
    # §1.11: layers 14-23, gate/up disabled (no block), down gating-failed with block 32,
    # except layer 23 down emitted with block 32 and K 1536.
    weights = []
    for layer in range(14, 24):
        for kind in ("ffn_gate", "ffn_up", "ffn_down"):
            emit = layer == 23 and kind == "ffn_down"
            block = 32 if kind == "ffn_down" else 0
            weights.append({"layer": layer, "kind": kind, "emit": emit, "strip_dense": False, "block": block,
                            "K_budget": 1536 if kind == "ffn_down" else 0})
    text = export_text(export_policy({"weights": weights}))
    assert preset_path("policy.mistral7b.down14-23.exported.json").read_text() == text
