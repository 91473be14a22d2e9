"""The original builder's policy self-test (`--policy-self-test`, spec-policy-eval §3), case by case,
plus the further values the spec derives from the same merge rules.

Run: .venv/bin/python -m pytest tests/toy/test_policy_selftest.py
"""

from __future__ import annotations

import json

import pytest

from seeddelta.errors import SeedDeltaError
from seeddelta.policy import Baseline, parse_policy, parse_selector, resolve, selector_layers

# Policy A of §3, written out as JSON.
POLICY_A = {
    "version": 1,
    "defaults": {"enabled": False, "strip_dense": False, "block": 64, "K": {"gate": 100, "up": 200, "down": 300}},
    "ranges": [
        {"layers": "1-3", "enabled": True, "K": {"gate": 111}},
        {"layers": "2-4", "strip_dense": True, "K": {"gate": 222}},
    ],
    "layers": {
        "2": {"K": {"gate": 333}, "tensors": {"ffn_gate": {"K": 444}, "ffn_up": {"enabled": False}}},
        "3": {"enabled": False},
    },
}
# Baseline of case 3: enabled, no strip, block 11, K 1/2/3, metric cos_x_w.
BASELINE_3 = Baseline(strip_dense=False, block=11, K={"ffn_gate": 1, "ffn_up": 2, "ffn_down": 3}, metric="cos_x_w")


def test_1_selector_reversed_range_duplicates():
    assert selector_layers(parse_selector("3-1,2,2,5")) == [1, 2, 3, 5]


def test_2a_unknown_key_lenient_loads_with_a_warning():
    policy = parse_policy('{"version":1,"defaults":{"enabled":true,"unknown_key":123}}')
    assert policy.defaults is not None and policy.defaults.enabled is True
    assert len(policy.warnings) == 1 and "unknown key in policy: unknown_key" in policy.warnings[0]


def test_2b_unknown_key_strict_fails():
    with pytest.raises(SeedDeltaError, match="unknown key in policy: unknown_key"):
        parse_policy('{"version":1,"defaults":{"enabled":true,"unknown_key":123}}', strict=True)


@pytest.fixture(scope="module")
def policy_a():
    return parse_policy(json.dumps(POLICY_A), strict=True)  # case 3: the strict load must succeed


def test_3a_layer0_gate_defaults_only(policy_a):
    r = resolve(policy_a, 0, "ffn_gate", BASELINE_3)
    assert (r.enabled, r.block, r.K_gate) == (False, 64, 100)


def test_3b_layer1_gate_first_range(policy_a):
    r = resolve(policy_a, 1, "ffn_gate", BASELINE_3)
    assert (r.enabled, r.K_gate, r.strip_dense) == (True, 111, False)


def test_3c_layer2_gate_tensor_override_beats_layer_K(policy_a):
    r = resolve(policy_a, 2, "ffn_gate", BASELINE_3)
    assert (r.enabled, r.strip_dense, r.K_gate, r.block) == (True, True, 444, 64)
    assert (r.K_up, r.K_down) == (444, 444)  # a scalar K in the tensor rule sets all three kinds
    assert r.source["K_gate"] == "layers.2.tensors.ffn_gate"


def test_3d_layer2_up_disabled_by_tensor_override(policy_a):
    r = resolve(policy_a, 2, "ffn_up", BASELINE_3)
    assert r.enabled is False
    assert (r.K_gate, r.K_up, r.K_down, r.strip_dense) == (333, 200, 300, True)
    assert r.source["enabled"] == "layers.2.tensors.ffn_up"


def test_3e_layer3_gate_last_matching_range(policy_a):
    r = resolve(policy_a, 3, "ffn_gate", BASELINE_3)
    assert (r.enabled, r.K_gate) == (False, 222)
    assert r.source["enabled"] == "layers.3" and r.source["K_gate"] == "ranges[1]"


def test_3_extra_layer4_down(policy_a):
    r = resolve(policy_a, 4, "ffn_down", BASELINE_3)
    assert (r.enabled, r.strip_dense, r.K_gate) == (False, True, 222)
    assert r.source["enabled"] == "defaults"


def test_4_gating_metric_and_requirements():
    policy = parse_policy('{"version":1,"defaults":{"enabled":true,"gating":'
                          '{"metric":"cos_x_w","min_mean":0.1,"min_p05":0.1}}}', strict=True)
    baseline = Baseline(metric="cos", thresholds=dict.fromkeys(("ffn_gate", "ffn_up", "ffn_down"), (0.0, 0.0)))
    r = resolve(policy, 0, "ffn_gate", baseline)
    assert r.metric == "cos_x_w" and r.require_eval_x and r.require_imatrix
    assert r.gating_enabled and (r.min_mean, r.min_p05) == (0.1, 0.1)
