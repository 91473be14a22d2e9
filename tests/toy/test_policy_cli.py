"""`seeddelta policy check|resolve|export` through the real CLI: outputs, and every bad input as
one line naming the file and the place, exit status 2, no traceback, nothing written.

Run: .venv/bin/python -m pytest tests/toy/test_policy_cli.py
"""

from __future__ import annotations

import json
import os

import pytest

from seeddelta.cli import main
from seeddelta.testing.synthetic_gguf import make_llama_gguf


@pytest.fixture(scope="module")
def model4(tmp_path_factory):
    return make_llama_gguf(tmp_path_factory.mktemp("policy_cli") / "m4.gguf", n_layer=4, n_embd=32, n_ff=48, seed=3)


def run(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        rc = main(["policy", *argv])
    except SystemExit as exc:  # argparse usage errors
        rc = int(exc.code or 0)
    out, err = capsys.readouterr()
    return rc, out, err


def write(path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_check_ok_prints_summary_and_hash(tmp_path, capsys):
    f = write(tmp_path / "p.json", '{"version": 1, "ranges": [{"layers": "1-2,5", "enabled": false}]}')
    rc, out, err = run(capsys, "check", f, "--policy-strict")
    assert rc == 0 and err == ""
    assert out.startswith(f"{f}: ok (version 1, no defaults, 1 range(s), 0 layer entries, layers named: 1-2,5)")
    assert "fnv1a64:" in out


def test_check_lenient_warns_strict_fails(tmp_path, capsys):
    f = write(tmp_path / "p.json", '{"version":1,"defaults":{"enabled":true,"unknown_key":123}}')
    rc, out, err = run(capsys, "check", f)
    assert rc == 0 and "1 warning(s)" in out
    assert err == f"seeddelta policy: warning: {f}: defaults: unknown key in policy: unknown_key\n"
    rc, out, err = run(capsys, "check", f, "--policy-strict")
    assert rc == 2 and out == ""
    assert err == f"seeddelta policy: error: {f}: defaults: unknown key in policy: unknown_key (--policy-strict)\n"


def test_resolve_prints_every_layer_and_kind_with_sources(tmp_path, capsys, model4):
    f = write(tmp_path / "p.json", json.dumps({
        "defaults": {"enabled": False, "gating": {"min_mean": -1}},
        "ranges": [{"layers": "1-2", "enabled": True, "K": {"down": 64}}],
        "layers": {"2": {"tensors": {"ffn_down": {"K": 16}}}}}))
    out_json = tmp_path / "r.json"
    rc, out, err = run(capsys, "resolve", f, "-m", model4.path, "--json", str(out_json), "--K", "8")
    assert rc == 0, err
    lines = out.splitlines()
    assert len(lines) == 1 + 4 * 3
    assert lines[0].endswith(f"on {model4.path}: 4 layers x 3 kinds")
    down2 = next(line for line in lines if line.startswith("blk.2.ffn_down "))
    assert "enabled=yes[ranges[0]]" in down2 and "K=16[layers.2.tensors.ffn_down]" in down2
    assert "gating=off" in down2 and "min_mean=-1.000[defaults]" in down2
    doc = json.loads(out_json.read_text())
    assert doc["n_layer"] == 4 and len(doc["tensors"]) == 12 and doc["baseline"]["K"]["ffn_gate"] == 8
    row = {(t["layer"], t["kind"]): t for t in doc["tensors"]}
    assert row[(1, "ffn_down")]["K"] == 64 and row[(1, "ffn_down")]["source"]["K"] == "ranges[0]"
    assert row[(0, "ffn_gate")]["K"] == 8 and row[(0, "ffn_gate")]["source"]["K"] == "baseline"
    assert row[(3, "ffn_up")]["enabled"] is False and row[(3, "ffn_up")]["source"]["enabled"] == "defaults"


def test_resolve_defaults_to_the_tiny_model(tmp_path, capsys):
    f = write(tmp_path / "p.json", '{"layers": {"7": {"enabled": false}}}')
    rc, out, err = run(capsys, "resolve", f)
    assert rc == 0, err
    assert len(out.splitlines()) == 1 + 8 * 3 and "blk.7.ffn_up enabled=no[layers.7]" in out


def test_export_cli_writes_the_canonical_policy(tmp_path, capsys):
    report = {"weights": [
        {"layer": 0, "kind": "ffn_gate", "emit": True, "strip_dense": True, "block": 32, "K_budget": 48},
        {"layer": 0, "kind": "ffn_up", "emit": False, "strip_dense": False, "block": 0, "K_budget": 0}]}
    r = write(tmp_path / "report.json", json.dumps(report))
    o = tmp_path / "policy.json"
    rc, out, err = run(capsys, "export", r, "-o", str(o))
    assert rc == 0, err
    assert out == f"wrote {o}: 2 tensor rule(s), 1 emitted\n"
    doc = json.loads(o.read_text())
    assert doc["layers"]["0"]["tensors"] == {
        "ffn_gate": {"enabled": True, "strip_dense": True, "block": 32, "K": 48},
        "ffn_up": {"enabled": False, "strip_dense": False}}
    rc, out, err = run(capsys, "check", str(o), "--policy-strict")
    assert rc == 0, err


def _bad_cases(tmp_path, model4):
    """(label, argv, expected error line after `seeddelta policy: error: `)."""
    def f(name: str, text: str | bytes) -> str:
        path = tmp_path / name
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        return str(path)

    out = str(tmp_path / "out.json")
    malformed = f("malformed.json", '{\n  "defaults": {\n    "enabled": true,\n  }\n}\n')
    beyond = f("beyond.json", '{"ranges": [{"layers": "2-6", "enabled": true}]}')
    report_bad = f("report_bad.json", '{"weights": {}}')
    report_kind = f("report_kind.json", '{"weights": [{"layer": 0, "kind": "attn_q", "emit": true}]}')
    return [
        ("malformed", ["check", malformed], f"{malformed}:4:3: malformed JSON: "),
        ("missing", ["check", str(tmp_path / "nope.json")], f"policy file not found: {tmp_path / 'nope.json'}"),
        ("not_utf8", ["check", f("latin.json", b'{"defaults": {"metric": "\xe9"}}')], "is not UTF-8"),
        ("top_array", ["check", f("arr.json", "[]")], "top level: must be a JSON object (a policy), got array"),
        ("K0", ["check", f("k0.json", '{"defaults": {"K": 0}}')], "defaults.K: must be >= 1, got 0"),
        ("Kfloat", ["check", f("kf.json", '{"ranges": [{"layers": "1", "K": {"up": 64.0}}]}')],
         "ranges[0].K.up: must be an integer, got 64.0"),
        ("empty_selector", ["check", f("es.json", '{"ranges": [{"layers": " "}]}')],
         "ranges[0].layers: empty layer selector"),
        ("unknown_kind", ["check", f("uk.json", '{"layers": {"3": {"tensors": {"ffn_gate_up": {}}}}}')],
         "layers.3.tensors.ffn_gate_up: unknown kind 'ffn_gate_up'"),
        ("unknown_metric", ["check", f("um.json", '{"defaults": {"gating": {"metric": "l2"}}}')],
         "defaults.gating.metric: unknown gating metric 'l2'"),
        ("strict", ["check", f("st.json", '{"defaults": {"K": 8, "Kdown": 4}}'), "--policy-strict"],
         "defaults: unknown key in policy: Kdown (--policy-strict)"),
        ("autotune", ["check", f("at.json", '{"defaults": {"autotune": {"enabled": true, "schedule_down": [64]}},'
                                            ' "layers": {"1": {"autotune": {"enabled": true}}}}')],
         "layers.1.autotune: replaces defaults.autotune as a whole and would drop its schedule_down"),
        ("beyond_model", ["resolve", beyond, "-m", model4.path, "--json", out],
         f"ranges[0].layers: layer 6 of '2-6' is beyond model {model4.path} (layers 0-3)"),
        ("resolve_K", ["resolve", beyond, "-m", model4.path, "--K", "0", "--json", out], "--K must be a positive integer"),
        ("resolve_model", ["resolve", beyond, "-m", str(tmp_path / "none.gguf"), "--json", out], "model file not found"),
        ("json_dir", ["resolve", f("ok.json", "{}"), "-m", model4.path, "--json", str(tmp_path / "no" / "r.json")],
         "does not exist"),
        ("report_list", ["export", report_bad, "-o", out], "weights: report.weights is not a list (object)"),
        ("report_kind", ["export", report_kind, "-o", out], "weights[0].kind: unknown kind 'attn_q'"),
        ("report_self", ["export", report_bad, "-o", report_bad], "is the input REPORT.json"),
        ("report_missing", ["export", str(tmp_path / "r.json"), "-o", out], "report file not found"),
    ]


def test_bad_input_one_line_exit_2_nothing_written(tmp_path, capsys, model4):
    for label, argv, needle in _bad_cases(tmp_path, model4):
        before = sorted(os.listdir(tmp_path))
        rc, out, err = run(capsys, *argv)
        assert rc == 2, (label, rc, err)
        lines = err.splitlines()
        assert len(lines) == 1, (label, err)
        assert lines[0].startswith("seeddelta policy: error: ") and needle in lines[0], (label, err)
        assert "Traceback" not in err and out == "", label
        assert sorted(os.listdir(tmp_path)) == before, label  # nothing written (no temp file left either)


def test_usage_errors_are_one_line_exit_2(capsys):
    rc, out, err = run(capsys, "resolve")
    assert rc == 2 and len(err.splitlines()) == 1 and "required" in err


def test_a_real_process_exits_2_with_one_line(tmp_path):
    import subprocess
    import sys

    f = write(tmp_path / "bad.json", '{"defaults": {"K": {"gate": 1.5}}}')
    proc = subprocess.run([sys.executable, "-m", "seeddelta", "policy", "check", f], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == f"seeddelta policy: error: {f}: defaults.K.gate: must be an integer, got 1.5 " \
                          "(the original silently ignored a K that is not an integer)\n"
