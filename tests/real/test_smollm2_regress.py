"""`seeddelta regress -m SmolLM2` at a budget of about 15 minutes on 2 cores (opt-in: `real` and `slow`):
four layers spread over the 30, one budget with and without base, 2 windows per context, the
equal-bytes comparison at two densities. Evaluation text GPL-3; calibration (imatrix) Apache-2.0 and
MPL-2.0, disjoint from it. No greedy pack: the tiny model's task prompts are not SmolLM2's tasks.

Checks the report's contracts (the original measures 0, bytes as stored, every requested point
present or skipped with its reason); the measured tables are recorded in the README."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from seeddelta.cli import main
from seeddelta.testing.models import GPL3, SMOLLM2_INSTALL, smollm2_path

LICENSES = Path("/usr/share/common-licenses")
BUDGET = ("--layers", "0,10,20,29", "--densities", "1/3", "--chunks", "2", "--unit-chunks", "2",
          "--eq-densities", "1/8,1/4", "--jobs", "2")


@pytest.mark.slow
def test_smollm2_regress_report(tmp_path: Path) -> None:
    model = smollm2_path()
    if model is None:
        pytest.skip(SMOLLM2_INSTALL)
    parts = [LICENSES / "Apache-2.0", LICENSES / "MPL-2.0"]
    if not GPL3.is_file() or not all(p.is_file() for p in parts):
        pytest.skip("the license texts of /usr/share/common-licenses are not present")
    calibration = tmp_path / "calibration.txt"
    calibration.write_text("\n".join(p.read_text(encoding="utf-8") for p in parts), encoding="utf-8")
    out = tmp_path / "regress"
    status = main(["regress", "-m", str(model), "-f", str(GPL3), "--calibration", str(calibration),
                   "--out", str(out), *BUDGET])
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    # the tiny presets are not for this model; B5's autogate policy is judged but declares nothing, since
    # without a greedy pack its greedy criterion cannot be measured
    assert status == 0 and report["presets"] == [] and len(report["presets_skipped"]) > 0
    assert [(p["preset"], p["criteria_declared"]) for p in report["b5"]] == [("autogate-defaults", [])]
    b1 = report["b1"]
    assert all(p["deterministic"] for p in b1["ppl"].values())
    rows = {r["label"]: r for r in report["equal_bytes"]["rows"]}
    assert rows["original"]["kld_mean"] == 0.0
    # SmolLM2's FFN weights are Q4_1: 20 bytes per 32 weights = 5 bits
    assert rows["original"]["bits_per_weight"] == 5.0
    llama = [r for r in report["equal_bytes"]["rows"] if r["family"] == "llama.cpp"]
    skipped = report["equal_bytes"]["skipped"]
    assert len(llama) == 7 or any("llama.cpp quantization points skipped" in s for s in skipped)
    for r in report["equal_bytes"]["rows"]:
        assert r["kld_mean"] >= 0.0 and r["bits_per_weight"] > 0
    assert (out / "equal_bytes.png").is_file()
