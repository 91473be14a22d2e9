"""`seeddelta regress` on the tiny model at the settings CI affords (seeddelta.testing.regress_ci):
the shipped presets meet what they declare, every step is in the report with its plots, a second run
is read from the cache, and a preset that declares a criterion it misses fails the run."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from seeddelta.cli import main
from seeddelta.regress.criteria import B5_CRITERIA, CTXS, V1_CRITERIA
from seeddelta.regress.presets import load_preset, shipped_presets
from seeddelta.testing.regress_ci import CI_ARGS, ci_lock, ci_report


def _shared_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # one run for all xdist workers


@pytest.fixture(scope="module")
def ci(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, Path, str, dict, str]:
    status, out, stdout, report, md = ci_report(_shared_base(tmp_path_factory))
    return status, out, stdout, json.loads(report), md


def test_the_shipped_presets_meet_what_they_declare(ci):
    status, _, stdout, report, _ = ci
    assert report["verdict"] == {**report["verdict"], "result": "PASS", "failures": []}, stdout
    assert status == 0
    judged = report["b5"] + report["presets"]
    assert sorted(j["preset"] for j in judged) == sorted(["autogate-defaults", *(p.stem for p in shipped_presets())])
    for j in judged:
        declared = {r["criterion"]: r for r in j["criteria"] if r["declared"]}
        want = B5_CRITERIA if j["preset"] == "autogate-defaults" else \
            load_preset(next(p for p in shipped_presets() if p.stem == j["preset"])).criteria
        assert set(declared) == set(want)
        assert all(r["pass"] for r in declared.values()), j
        assert {r["criterion"] for r in j["criteria"]} == {c.name for c in V1_CRITERIA}  # all measured, shown


def test_every_step_is_reported_with_its_plots(ci):
    _, out, stdout, report, md = ci
    for key in ("b1", "b2", "b3", "b4", "b5", "presets", "equal_bytes", "fragile_layers", "recommended_thresholds"):
        assert key in report, key
    assert (out / "b5" / "policy.json").is_file() and (out / "b5" / "scan.json").is_file()
    for title in ("## The v1 success criteria, per preset", "## B1", "## B2", "## B3", "## B4",
                  "## Fragile layers", "## Equal bytes"):
        assert title in md
    for png in ("b2_heatmap.png", "b2_error_vs_k.png", "b4_stacks.png", "equal_bytes.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
        assert f"]({png})" in md
    assert stdout.startswith("regress PASS")


def test_b1_is_deterministic_and_measures_its_spread(ci):
    b1 = ci[3]["b1"]
    assert sorted(int(c) for c in b1["ppl"]) == list(CTXS)
    for p in b1["ppl"].values():
        assert p["deterministic"] is True
        assert p["windows"] == 2 and p["ln_ppl_bootstrap_sd"] > 0
        lo, hi = p["ln_ppl_ci95"]
        assert lo < hi
    assert b1["greedy"]["n"] == 30 and b1["greedy"]["flagged"] == 0  # 10 prompts of each of three tasks


def test_units_and_stacks_cover_the_requested_layers(ci):
    report = ci[3]
    units = report["b2"]["units"]
    assert sorted({(u["layer"], u["kind"], u["base"]) for u in units}) == sorted(
        (layer, k, b) for layer in (1, 5) for k in ("ffn_gate", "ffn_up", "ffn_down") for b in (True, False))
    assert [x["layer"] for x in report["b2"]["layers"]] == [1, 5]
    assert [s["layers"] for s in report["b3"]] == [[1, 5]]
    b4 = report["b4"]
    for order, steps in b4["steps"].items():
        assert [s["step"] for s in steps] == list(range(1, len(steps) + 1))
        cliff = b4["cliffs"][order]
        # a stack stops at its first cliff, or when every layer is in
        assert (cliff is not None and cliff["step"] == len(steps)) or len(steps) == 2


def test_equal_bytes_points_count_their_bytes(ci):
    rows = {r["label"]: r for r in ci[3]["equal_bytes"]["rows"]}
    assert rows["original"]["kld_mean"] == 0.0 and rows["original"]["bits_per_weight"] == 16.0
    # COO pruning at density 1/4 keeps 48 of 192 and 192 of 768 per row: 4 bytes each = 32·(1/4) bits a weight
    assert rows["magnitude d=1/4 coo"]["bits_per_weight"] == 8.0
    assert rows["magnitude d=1/4 dense"]["bits_per_weight"] == 16.0  # zeros stored: nothing saved
    # variant sdq: Q4_0 is 18 bytes per 32 weights; +1 % c8 adds per row 2 bytes per entry (K = round(n_in/100):
    # 2 of 192, 8 of 768) + one count byte per 256 columns + a 2-byte step
    assert rows["sdq Q4_0"]["bits_per_weight"] == 4.5
    gate_up = 2 * 768 * (2 * 2 + 1 + 2)  # ffn_gate and ffn_up: 768 rows of 192 inputs
    down = 192 * (2 * 8 + 3 + 2)  # ffn_down: 192 rows of 768 inputs
    per_layer_weights = 3 * 192 * 768
    assert rows["sdq Q4_0 +1% c8 refit"]["bits_per_weight"] == 4.5 + 8 * (gate_up + down) / per_layer_weights
    assert rows["sdq Q4_0 +1% c8 refit"]["kld_mean"] < rows["sdq Q4_0"]["kld_mean"]
    assert ci[3]["equal_bytes"]["skipped"] == []


def test_a_second_run_is_read_from_the_cache(ci, tmp_path_factory):
    first = ci[3]
    status, _, _, text, _ = ci_report(_shared_base(tmp_path_factory))
    again = json.loads(text)
    assert status == 0
    assert again["timing"]["cache"]["misses"] == 0 and again["timing"]["cache"]["hits"] > 0
    for key in ("b1", "b2", "b3", "b4", "b5", "presets", "equal_bytes", "verdict"):
        assert again[key] == first[key], key


def test_a_preset_that_misses_a_declared_criterion_fails_the_run(ci, tmp_path, capsys):
    """The full-budget preset loses quality; declaring ΔPPL ≤ 0 % at ctx 512 for it must fail (exit 1)."""
    src = next(p for p in shipped_presets() if p.stem == "tiny-all-layers")
    doc = json.loads(src.read_text(encoding="utf-8"))
    doc["regress"]["criteria"] = ["ppl_ctx512"]
    bad = tmp_path / "tiny-all-layers-claims-ppl.json"
    bad.write_text(json.dumps(doc), encoding="utf-8")
    out = ci[1]  # same cache: the preset's build and measurements are served from it
    with ci_lock(out.parent):
        status = main(["regress", "--out", str(out), *CI_ARGS, "--steps", "presets", "--preset", str(bad)])
    text = capsys.readouterr().out
    assert status == 1
    assert "FAIL tiny-all-layers-claims-ppl: ppl_ctx512 declared but not met" in text


@pytest.mark.parametrize("argv,message", [
    (["--densities", "0"], "--densities: every density must be in (0, 1]"),
    (["--eq-densities", "x"], "--eq-densities: expected fractions"),
    (["--quant-types", "Q3_X"], "--quant-types: unknown type 'Q3_X'"),
    (["--steps", "b9"], "--steps: unknown step 'b9'"),
    (["--chunks", "0"], "--chunks: 0 would score nothing"),
    (["-m", "/nonexistent.gguf"], "model not found"),
])
def test_bad_arguments_are_one_line_errors(argv, message, tmp_path, capsys):
    status = main(["regress", "--out", str(tmp_path / "o"), *argv])
    err = capsys.readouterr().err
    assert status == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o" / "report.json").exists()
