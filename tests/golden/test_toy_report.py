"""Golden snapshot of harness A's normalised report (`seeddelta toy --json`): guards against drift
in cases, oracles and measured values. Correctness is proven by tests/toy; this only shows change.
Update deliberately with `make golden-update`.   Run: pytest tests/golden/test_toy_report.py"""

from __future__ import annotations

import json

from seeddelta.cli import main
from seeddelta.testing.golden import normalize


def test_toy_grid_report(tmp_path, snapshot_json):
    path = tmp_path / "toy.json"
    assert main(["toy", "--json", str(path)]) == 0
    report = json.loads(path.read_text())
    assert report["all_passed"] and report["n_cases"] == report["n_passed"] >= 200
    assert normalize(report) == snapshot_json
