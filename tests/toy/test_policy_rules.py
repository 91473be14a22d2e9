"""Policy schema and merge rules (spec-policy-eval §1–2): aliases, per-kind values, precedence
facts, negative thresholds, version-2 keys, and the loud errors where the original was silent.
Expected values are hand-resolved from the spec's rules.

Run: .venv/bin/python -m pytest tests/toy/test_policy_rules.py
"""

from __future__ import annotations

import json

import pytest

from seeddelta.builder import options as build
from seeddelta.builder.report import policy_hash
from seeddelta.codec.encode import GGUF_BASE_KINDS
from seeddelta.errors import SeedDeltaError
from seeddelta.policy import Baseline, check_policy, parse_policy, resolve, resolve_all
from seeddelta.policy.schema import METRICS, POLICY_BASE_KINDS

KINDS = ("ffn_gate", "ffn_up", "ffn_down")


def p(doc: dict, strict: bool = True):
    return parse_policy(json.dumps(doc), strict=strict)


def test_constants_agree_with_the_builder_and_codec():
    assert set(METRICS) == set(build.GATING_METRICS)
    assert POLICY_BASE_KINDS == GGUF_BASE_KINDS


def test_aliases_and_metric_aliases():
    pol = p({"defaults": {"enable": True, "strip": True, "gating_metric": "cos-x"}})
    r = resolve(pol, 0, "ffn_up")
    assert (r.enabled, r.strip_dense, r.metric) == (True, True, "cos_x")
    for alias, canonical in (("cos-x-w", "cos_x_w"), ("cos-w", "cos_w"), ("ffn", "ffn_score"),
                             ("ffn-score", "ffn_score"), ("cos", "cos")):
        assert resolve(p({"defaults": {"metric": alias}}), 0, "ffn_gate").metric == canonical


def test_version_defaults_to_1_and_hash_is_the_reports():
    text = '{"defaults": {"enabled": false}}'
    pol = parse_policy(text)
    assert pol.version == 1 and pol.hash == policy_hash(text.encode())


def test_scalar_K_sets_all_kinds_object_only_listed():
    pol = p({"defaults": {"K": 64}, "layers": {"1": {"K": {"down": 128}}}})
    r = resolve(pol, 1, "ffn_gate")
    assert (r.K_gate, r.K_up, r.K_down) == (64, 64, 128)
    assert r.source["K_down"] == "layers.1" and r.source["K_gate"] == "defaults"
    assert resolve(pol, 1, "ffn_down").K == 128


def test_thresholds_per_kind_and_per_field_untouched_keep_baseline():
    # qwen7b.stack-safe idiom: only down thresholds given; gate/up keep the baseline 0.45/0.30.
    pol = p({"defaults": {"gating": {"min_mean": {"down": 0.45}, "min_p05": {"down": 0.30}}}})
    g, d = resolve(pol, 0, "ffn_gate"), resolve(pol, 0, "ffn_down")
    assert (g.min_mean, g.min_p05) == (0.45, 0.30) and g.source["min_mean"] == "baseline"
    assert (d.min_mean, d.min_p05) == (0.45, 0.30) and d.source["min_mean"] == "defaults"
    # min_mean and min_p05 are merged independently
    pol = p({"defaults": {"gating": {"min_mean": 0.5, "min_p05": 0.4}}, "ranges": [
        {"layers": "0", "gating": {"min_p05": 0.1}}]})
    r = resolve(pol, 0, "ffn_up")
    assert (r.min_mean, r.min_p05) == (0.5, 0.1)
    assert (r.source["min_mean"], r.source["min_p05"]) == ("defaults", "ranges[0]")


def test_negative_threshold_switches_gating_off_and_requirements():
    pol = p({"defaults": {"enabled": True, "gating": {"metric": "cos_x_w", "min_p05": {"down": -1.0}}}})
    assert resolve(pol, 0, "ffn_gate").gating_enabled and resolve(pol, 0, "ffn_gate").require_imatrix
    down = resolve(pol, 0, "ffn_down")
    assert not down.gating_enabled and not down.require_eval_x and not down.require_imatrix
    # a policy that never mentions gating still gates with the baseline (§1.7)
    r = resolve(p({"defaults": {"enabled": True}}), 0, "ffn_down")
    assert r.gating_enabled and (r.metric, r.min_mean, r.min_p05) == ("cos_x_w", 0.25, 0.15)


def test_tensor_override_from_defaults_beats_layer_plain_field():
    pol = p({"defaults": {"tensors": {"ffn_up": {"enabled": False}}}, "layers": {"3": {"enabled": True}}})
    assert resolve(pol, 3, "ffn_up").enabled is False
    assert resolve(pol, 3, "ffn_gate").enabled is True
    # between tensor overrides the later source wins
    pol = p({"defaults": {"tensors": {"ffn_up": {"K": 7}}}, "ranges": [{"layers": "0-9", "tensors": {"ffn_up": {"K": 9}}}]})
    r = resolve(pol, 4, "ffn_up")
    assert r.K == 9 and r.source["K_up"] == "ranges[0].tensors.ffn_up"
    assert resolve(pol, 12, "ffn_up").K == 7


def test_ranges_apply_in_file_order_last_wins():
    pol = p({"ranges": [{"layers": "0-5", "block": 16}, {"layers": "4-8", "block": 64}, {"layers": "5", "block": 8}]})
    assert [resolve(pol, layer, "ffn_gate").block for layer in (0, 4, 5, 8, 9)] == [16, 64, 8, 64, 32]
    assert resolve(pol, 5, "ffn_gate").source["block"] == "ranges[2]"


def test_autotune_partial_replacement_fails_loudly():
    doc = {"defaults": {"autotune": {"enabled": True, "schedule_gate_up": [64, 128], "max_iters": 2}},
           "ranges": [{"layers": "2-3", "autotune": {"enabled": True}}]}
    pol = p(doc)
    assert resolve(pol, 0, "ffn_gate").k_schedule() == [64, 128]
    with pytest.raises(SeedDeltaError, match=r"ranges\[0\]\.autotune: replaces defaults\.autotune .*max_iters, "
                                             r"schedule_gate_up"):
        resolve(pol, 2, "ffn_gate")
    with pytest.raises(SeedDeltaError, match="replaces defaults.autotune"):
        check_policy(pol)  # `policy check` finds it without a model
    # switching autotune off needs nothing else; a complete object replaces the earlier one
    doc["ranges"][0]["autotune"] = {"enabled": False}
    r = resolve(p(doc), 2, "ffn_gate")
    assert not r.autotune.enabled and r.k_schedule() == [32]
    doc["ranges"][0]["autotune"] = {"enabled": True, "schedule_gate_up": [8, 8, 16, 4], "schedule_down": [],
                                    "max_iters": 0}
    r = resolve(p(doc), 2, "ffn_up")
    assert r.k_schedule() == [8, 16, 4]  # duplicates dropped, order kept
    assert resolve(p(doc), 2, "ffn_down").k_schedule() == [32]  # empty schedule: the single K


def test_version_2_keys_only_under_version_2():
    v1 = {"version": 1, "defaults": {"row_scale": True}}
    pol = p(v1, strict=False)
    assert "declare \"version\": 2" in pol.warnings[0]
    assert resolve(pol, 0, "ffn_gate").row_scale is False  # unknown under version 1: no effect
    with pytest.raises(SeedDeltaError, match="unknown key in policy: row_scale"):
        p(v1)
    pol = p({"version": 2, "defaults": {"row_scale": True, "base": "xor_circulant"},
             "layers": {"1": {"tensors": {"ffn_down": {"delta_norm_clamp": 0.5}}}}})
    r = resolve(pol, 1, "ffn_down")
    assert (r.row_scale, r.base, r.delta_norm_clamp) == (True, "xor_circulant", 0.5)
    assert r.source["delta_norm_clamp"] == "layers.1.tensors.ffn_down"
    assert resolve(pol, 1, "ffn_up").delta_norm_clamp == 0.0


def test_unknown_keys_in_gating_autotune_and_top_level_warn():
    pol = p({"extra": 1, "defaults": {"gating": {"min_men": 0.2}, "autotune": {"enable": True}, "layers": "0"}},
            strict=False)
    joined = "\n".join(pol.warnings)
    assert "extra: unknown top-level key in policy: extra" in joined
    assert "defaults.gating: unknown key in policy: min_men" in joined
    assert "defaults.autotune: unknown key in policy: enable" in joined
    assert "defaults.layers: `layers` has no effect" in joined
    assert len(pol.warnings) == 4


@pytest.mark.parametrize("doc, place, needle", [
    ({"defaults": {"K": 64.0}}, "defaults.K", "must be an integer, got 64.0"),
    ({"defaults": {"K": {"gate": 0}}}, "defaults.K.gate", "must be >= 1, got 0"),
    ({"defaults": {"K": "64"}}, "defaults.K", "got string"),
    ({"defaults": {"K": {"gates": 4}}}, "defaults.K.gates", "unknown kind 'gates'"),
    ({"defaults": {"metric": "cos_xw"}}, "defaults.metric", "unknown gating metric 'cos_xw'"),
    ({"defaults": {"tensors": {"attn_q": {}}}}, "defaults.tensors.attn_q", "unknown kind 'attn_q'"),
    ({"defaults": {"tensors": {"ffn_up": {"tensors": {}}}}}, "defaults.tensors.ffn_up.tensors", "cannot hold"),
    ({"defaults": {"enabled": "yes"}}, "defaults.enabled", "must be true or false"),
    ({"defaults": {"block": 16.5}}, "defaults.block", "must be an integer"),
    ({"defaults": {"block": 0}}, "defaults.block", "must be in 1..4096"),
    ({"defaults": {"gating": {"min_mean": "high"}}}, "defaults.gating.min_mean", "must be a number or an object"),
    ({"defaults": {"gating": {"min_p05": {"down": 70}}}}, "defaults.gating.min_p05.down", "must be <= 1"),
    ({"defaults": {"autotune": {"schedule_down": [256, 0]}}}, "defaults.autotune.schedule_down[1]", ">= 1"),
    ({"defaults": {"autotune": {"max_iters": -1}}}, "defaults.autotune.max_iters", ">= 0"),
    ({"defaults": {"enabled": True, "enable": True}}, "defaults.enable", "both `enabled` and its alias"),
    ({"defaults": {"metric": "cos", "gating": {"metric": "cos"}}}, "defaults", "gating metric is given twice"),
    ({"ranges": [{"layers": ""}]}, "ranges[0].layers", "empty layer selector"),
    ({"ranges": [{"layers": "1,,2"}]}, "ranges[0].layers", "an empty item"),
    ({"ranges": [{"layers": 3}]}, "ranges[0].layers", "must be a selector string"),
    ({"ranges": [{"enabled": True}]}, "ranges[0]", "needs a \"layers\" selector"),
    ({"ranges": {"layers": "1"}}, "ranges", "must be an array"),
    ({"layers": {"x1": {}}}, "layers.x1", "decimal layer id"),
    ({"layers": {"2": {}, "02": {}}}, "layers.02", "given twice"),
    ({"defaults": []}, "defaults", "must be a rule object, got array"),
    ({"version": 3}, "version", "unsupported policy version 3"),
    ({"version": 2, "defaults": {"base": "lowrank"}}, "defaults.base", "unknown base kind 'lowrank'"),
    ({"version": 2, "defaults": {"delta_norm_clamp": -0.1}}, "defaults.delta_norm_clamp", "must be >= 0"),
])
def test_bad_values_name_their_json_path(doc, place, needle):
    with pytest.raises(SeedDeltaError) as info:
        p(doc, strict=False)
    message = str(info.value)
    assert message.startswith(f"<policy>: {place}: ") and needle in message, message


def test_duplicate_keys_and_non_finite_numbers_are_refused():
    with pytest.raises(SeedDeltaError, match=r"defaults\.K: key given more than once"):
        parse_policy('{"defaults": {"K": 4, "K": 8}}')
    with pytest.raises(SeedDeltaError, match=r"defaults\.gating\.min_mean: must be a finite number, got NaN"):
        parse_policy('{"defaults": {"gating": {"min_mean": NaN}}}')
    with pytest.raises(SeedDeltaError, match=r"defaults\.gating\.min_p05: must be a finite number, got -1e999"):
        parse_policy('{"defaults": {"gating": {"min_p05": -1e999}}}')


def test_resolve_all_is_total_and_refuses_layers_beyond_the_model():
    pol = p({"ranges": [{"layers": "1-2", "enabled": False}]})
    rows = resolve_all(pol, 4)
    assert [(r.layer, r.kind) for r in rows] == [(layer, k) for layer in range(4) for k in KINDS]
    assert [r.enabled for r in rows if r.kind == "ffn_gate"] == [True, False, False, True]
    with pytest.raises(SeedDeltaError, match=r"ranges\[0\]\.layers: layer 2 of '1-2' is beyond the model \(layers 0-1\)"):
        resolve_all(pol, 2)
    with pytest.raises(SeedDeltaError, match=r"layers\.5: layer 5 is beyond"):
        resolve_all(p({"layers": {"5": {}}}), 5)


def test_baseline_is_the_start_with_provenance_baseline():
    b = Baseline(strip_dense=True, block=16, K={"ffn_gate": 5, "ffn_up": 6, "ffn_down": 7})
    r = resolve(p({}), 0, "ffn_up", b)
    assert (r.enabled, r.strip_dense, r.block, r.K, r.metric) == (True, True, 16, 6, "cos_x_w")
    assert set(r.source.values()) == {"baseline"}
