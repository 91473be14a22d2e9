"""The builder's side of policies: `policy_resolver` maps resolved settings onto the builder's
TensorConfig, a policy equivalent to the CLI reproduces `baseline_resolver`, and an exported
policy reproduces the decisions of the report it came from (spec §1.10, §3 round trip).

Run: .venv/bin/python -m pytest tests/toy/test_policy_builder.py
"""

from __future__ import annotations

import dataclasses
import json

import pytest

from seeddelta.builder.options import BuildOptions, TensorConfig, baseline_resolver
from seeddelta.errors import SeedDeltaError
from seeddelta.policy import export_policy, export_text, parse_policy, policy_resolver, resolve_all

KINDS = ("ffn_gate", "ffn_up", "ffn_down")
N_LAYER = 5


@pytest.mark.parametrize("flags", [
    {},
    {"K": 48, "K_down": 96, "block": 16, "strip_dense": True},
    {"K": 7, "K_gate": 3, "K_up": 5},
], ids=["defaults", "per-kind-strip", "gate-up"])
def test_policy_equivalent_to_the_cli_gives_the_baseline_tensor_config(flags):
    opts = BuildOptions(input="in.gguf", output="out.gguf", **flags)
    K = {"gate": opts.kind_K("ffn_gate"), "up": opts.kind_K("ffn_up"), "down": opts.kind_K("ffn_down")}
    policy = parse_policy(json.dumps({"version": 1, "defaults": {
        "enabled": True, "strip_dense": opts.strip_dense, "block": opts.block, "K": K}}), strict=True)
    from_policy, from_cli = policy_resolver(policy, opts, N_LAYER), baseline_resolver(opts)
    for layer in range(N_LAYER):
        for kind in KINDS:
            got, want = from_policy(layer, kind), from_cli(layer, kind)
            assert isinstance(got, TensorConfig)
            # With a policy loaded, the baseline thresholds gate (§1.7); without one nothing gates.
            assert got.gating_enabled and not want.gating_enabled
            assert dataclasses.replace(got, gating_enabled=False) == want, (layer, kind)
    # Even a policy of nothing resolves to the CLI's values.
    empty = policy_resolver(parse_policy("{}"), opts)
    assert all(dataclasses.replace(empty(layer, k), gating_enabled=False) == from_cli(layer, k)
               for layer in range(N_LAYER) for k in KINDS)


def test_policy_resolver_maps_each_field():
    policy = parse_policy(json.dumps({"defaults": {"enabled": False}, "layers": {"2": {
        "enabled": True, "strip": True, "block": 8, "K": {"gate": 11, "up": 22, "down": 33},
        "gating": {"metric": "cos-w", "min_mean": {"down": -1.0}, "min_p05": 0.2}}}}))
    resolve = policy_resolver(policy, BuildOptions(input="", output=""))
    assert resolve(2, "ffn_up") == TensorConfig(enabled=True, strip_dense=True, K=22, block=8, metric="cos_w",
                                                gating_enabled=True, min_mean=0.45, min_p05=0.2)
    down = resolve(2, "ffn_down")
    assert (down.K, down.gating_enabled, down.require_imatrix) == (33, False, False)
    assert resolve(1, "ffn_gate").enabled is False


def test_policy_resolver_with_n_layer_refuses_layers_beyond_the_model():
    policy = parse_policy('{"layers": {"9": {"enabled": false}}}')
    with pytest.raises(SeedDeltaError, match=r"layers\.9: layer 9 is beyond"):
        policy_resolver(policy, BuildOptions(input="", output=""), n_layer=4)


def test_export_round_trip_reproduces_decisions():
    # A report's decisions, as the builder writes them: emitted, gating-failed (block kept),
    # disabled (block 0), stripped or not, with K budgets.
    weights = [
        {"layer": 0, "kind": "ffn_gate", "emit": True, "strip_dense": True, "block": 32, "K_budget": 64},
        {"layer": 0, "kind": "ffn_up", "emit": False, "strip_dense": False, "block": 32, "K_budget": 64},
        {"layer": 0, "kind": "ffn_down", "emit": False, "strip_dense": False, "block": 0, "K_budget": 0},
        {"layer": 2, "kind": "ffn_down", "emit": True, "strip_dense": False, "block": 16, "K_budget": 128},
        {"layer": -1, "kind": "ffn_up", "emit": True, "strip_dense": True, "block": 32, "K_budget": 64},
    ]
    text = export_text(export_policy({"weights": weights}))
    doc = json.loads(text)
    assert list(doc) == ["version", "defaults", "layers"]
    assert list(doc["defaults"]) == ["enabled", "strip_dense", "gating", "autotune"]
    assert doc["layers"]["0"]["tensors"]["ffn_gate"] == {"enabled": True, "strip_dense": True, "block": 32, "K": 64}
    assert doc["layers"]["0"]["tensors"]["ffn_up"] == {"enabled": False, "strip_dense": False, "block": 32}
    assert text.endswith("}\n") and '\n  "defaults": {\n    "enabled": false,' in text
    rows = {(r.layer, r.kind): r for r in resolve_all(parse_policy(text, strict=True), 3)}
    for w in weights:
        if w["layer"] < 0:
            continue
        got = rows[(w["layer"], w["kind"])]
        assert not got.gating_enabled  # the exported defaults switch gating off
        assert (got.enabled, got.strip_dense and got.enabled) == (w["emit"], w["strip_dense"])
        if w["emit"]:
            assert (got.K, got.block) == (w["K_budget"], w["block"])
    assert not rows[(1, "ffn_gate")].enabled  # not in the report: off by the exported defaults
    only = json.loads(export_text(export_policy({"weights": weights}, emit_only=True)))
    assert {layer: list(v["tensors"]) for layer, v in only["layers"].items()} == {"0": ["ffn_gate"], "2": ["ffn_down"]}


def test_export_refuses_duplicate_entries():
    w = {"layer": 1, "kind": "ffn_up", "emit": True, "strip_dense": False, "block": 32, "K_budget": 8}
    with pytest.raises(SeedDeltaError, match=r"weights\[1\]: second entry for blk\.1\.ffn_up \(the first is weights\[0\]\)"):
        export_policy({"weights": [w, dict(w)]})


def test_export_of_a_real_build_report_reproduces_its_decisions(tmp_path, capsys):
    from seeddelta.builder.pipeline import run_build
    from seeddelta.cli import main
    from seeddelta.testing.synthetic_gguf import make_llama_gguf

    model = make_llama_gguf(tmp_path / "in.gguf", n_layer=3, n_embd=32, n_ff=48, seed=9)
    opts = BuildOptions(input=model.path, output=str(tmp_path / "out.gguf"), layers="1", K=5, K_down=9,
                        strip_dense=True, report_json=str(tmp_path / "report.json"), progress=False, threads=1)
    report = run_build(opts).report
    assert main(["policy", "export", str(tmp_path / "report.json"), "-o", str(tmp_path / "p.json")]) == 0
    capsys.readouterr()
    policy = parse_policy((tmp_path / "p.json").read_text(), strict=True)
    resolver = policy_resolver(policy, BuildOptions(input="", output=""), n_layer=3)
    entries = {(w["layer"], w["kind"]): w for w in report["weights"]}
    assert sorted(entries) == [(1, k) for k in sorted(KINDS)]
    for layer in range(3):
        for kind in KINDS:
            cfg = resolver(layer, kind)
            w = entries.get((layer, kind))
            assert cfg.enabled == (w is not None and w["emit"])
            if w is not None:
                assert (cfg.strip_dense, cfg.K, cfg.block) == (w["strip_dense"], w["K_budget"], w["block"])
                assert cfg.K == (9 if kind == "ffn_down" else 5)
