"""`seeddelta scan` and `seeddelta autogate` on bad input: one line naming the file and the place (or the
flag), exit status 2, no traceback, nothing written. On a synthetic model: no evaluation runs.

Run: .venv/bin/python -m pytest tests/toy/test_scan_autogate_cli.py
"""

from __future__ import annotations

import json
import os

import pytest

from seeddelta.assets import sha256_file
from seeddelta.cli import main
from seeddelta.testing.synthetic_gguf import make_llama_gguf

ENCODING = {"scheme": "coo", "block": 32, "K": [32], "K_gate": -1, "K_up": -1, "K_down": -1, "idx_type": "i16",
            "val_type": "f16", "row_scale": False, "imatrix": None, "imatrix_eps": 1e-8, "imatrix_power": 1.0,
            "base": False, "base_max_samples": 2048, "base_perm_trials": 1, "seed": 1234,
            "delta_norm_clamp_down": 0.0}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("scan_autogate_cli")
    model = make_llama_gguf(d / "m.gguf", n_layer=2, n_embd=32, n_ff=48, seed=4)
    other = make_llama_gguf(d / "other.gguf", n_layer=2, n_embd=32, n_ff=48, seed=5)
    (d / "text.txt").write_text("some text " * 200)
    unit = {"layer": 0, "kind": "ffn_gate", "K": 8, "delta_nll": 0.001, "delta_nll_se": 0.001, "kld_mean": 0.001,
            "bytes_saved": 100, "cos_mean": 0.9, "cos_p05": 0.8, "cos_mean_x_w": 0.9, "cos_p05_x_w": 0.8}
    scan = {"model_sha256": sha256_file(model.path), "text": str(d / "text.txt"), "ctx": 16, "chunks": 2,
            "eval_cols": 8, "eval_x": 4, "encoding": ENCODING, "units": [unit]}
    (d / "scan.json").write_text(json.dumps(scan))
    (d / "broken.json").write_text('{"units": [\n  {"layer": 0,}\n]}')
    (d / "im.json").write_text(json.dumps({**scan, "encoding": {**ENCODING, "imatrix": str(d / "gone.gguf")}}))
    return d, model.path, other.path


def _run(capsys, argv):
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse
        rc = int(exc.code)
    return rc, capsys.readouterr().err


def _autogate_cases(d, model, other):
    scan, out = str(d / "scan.json"), str(d / "out" / "p.json")
    os.makedirs(d / "out", exist_ok=True)
    ok = ["--scan", scan, "-m", model, "-o", out, "--no-cache"]
    return [
        ("json", ["--scan", str(d / "broken.json"), "-m", model, "-o", out], "broken.json:2:"),
        ("missing", ["--scan", str(d / "nope.json"), "-m", model, "-o", out], "scan file not found"),
        ("other-model", ["--scan", scan, "-m", other, "-o", out], "scan.json: model_sha256: the scan was made on another"),
        ("imatrix", ["--scan", str(d / "im.json"), "-m", model, "-o", out], "im.json: encoding.imatrix: "),
        ("saving-range", [*ok, "--target-saving", "150"], "--target-saving must be between 0 and 100"),
        ("saving-text", [*ok, "--target-saving", "lots"], "--target-saving: expected a percentage"),
        ("bytes", [*ok, "--target-bytes", "0"], "--target-bytes must be positive"),
        ("both-targets", [*ok, "--target-bytes", "10", "--target-saving", "5"], "not allowed with argument"),
        ("band", [*ok, "--band", "middle"], "--band: expected core, leaf, all or a layer list"),
        ("band-beyond", [*ok, "--band", "0-5"], "--band: layer 2 is beyond the model"),
        ("out-dir", ["--scan", scan, "-m", model, "-o", str(d / "no" / "p.json")], "does not exist"),
        ("report-is-policy", [*ok, "--report", out], "--report and -o both name " + out),
        ("out-is-scan", ["--scan", scan, "-m", model, "-o", scan], "is the input --scan"),
        ("max-tensors", [*ok, "--max-tensors", "0"], "--max-tensors: invalid value 0"),
        ("min-gap", [*ok, "--min-gap", "-1"], "--min-gap: invalid value -1"),
        ("retention-replay", [*ok, "--retention-cap", "--retention", "replay"],
         "scan.json: units[0].retention_replay: missing, so --retention replay has nothing to read"),
        ("retention-proxy", [*ok, "--retention-cap"], "scan.json: units[0].retention: missing"),
        ("retention-no-cap", [*ok, "--retention", "replay"], "--retention replay chooses the retention of "
                                                             "--retention-cap, which is off"),
        ("retention-bad", [*ok, "--retention", "both"], "argument --retention: invalid choice"),
    ]


def test_autogate_bad_input_is_one_line_exit_2_nothing_written(files, capsys):
    d, model, other = files
    before = {p: sha256_file(d / p) for p in ("scan.json", "m.gguf")}
    for label, argv, needle in _autogate_cases(d, model, other):
        rc, err = _run(capsys, ["autogate", *argv])
        lines = err.strip().splitlines()
        assert rc == 2, (label, err)
        assert len(lines) == 1 and needle in lines[0] and "Traceback" not in err, (label, err)
        assert not os.listdir(d / "out"), (label, os.listdir(d / "out"))
    assert {p: sha256_file(d / p) for p in before} == before  # inputs untouched


def test_scan_bad_input_is_one_line_exit_2_nothing_written(files, capsys):
    d, model, _ = files
    out = d / "scan_out.json"
    cases = [
        (["--kinds", "gate,bogus"], "--kinds"),
        (["--K", "8,0"], "argument --K: expected positive integers"),
        (["--K", "eight"], "argument --K: expected integers"),
        (["--eval-cols", "0"], "--eval-cols must be > 0"),
        (["--json", str(d / "no" / "s.json")], "does not exist"),
        (["-f", str(d / "nope.txt")], "text file not found"),
        (["--layers", "0-7"], "layer 7 is outside"),
        (["-m", str(d / "nope.gguf")], "not found"),
        (["--scheme", "block", "--block", "0"], "--block must be in 1..4096"),
    ]
    for extra, needle in cases:
        argv = ["scan", "-m", model, "-f", str(d / "text.txt"), "-c", "16", "--no-cache", "--json", str(out), *extra]
        rc, err = _run(capsys, argv)
        lines = err.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and needle in lines[0] and "Traceback" not in err, (extra, err)
        assert not out.exists(), extra
