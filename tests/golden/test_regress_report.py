"""Golden snapshots of the CI regress run's report.json and report.md (normalised): any change to a
figure, a verdict or the report's text is a readable diff. The numeric contracts are tested in
tests/tiny/test_regress.py and tests/toy/test_regress_logic.py; these snapshots catch drift.
Update deliberately with `make golden-update`."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest

from seeddelta.testing.golden import NOISE_KEYS, normalize
from seeddelta.testing.regress_ci import ci_report

# Measured on the machine, not computed from the model: wall-clock speeds, resident memory, paths.
# The spread of three fresh-process loads (and the drop it requires) is a machine measurement too.
MACHINE_KEYS = NOISE_KEYS | {"timing", "prompt_tok_per_s", "decode", "throughput", "rss_anon_load_delta_bytes",
                             "rss_bytes", "weights_bytes", "rss_spread_bytes", "rss_drop_needed", "path", "text",
                             "calibration", "code_fingerprint", "plots", "window_delta_nll"}
MD_MACHINE = [
    (re.compile(r"[-+]?\d+\.\d+ MiB"), "<MiB>"),  # resident memory
    (re.compile(r"^(\| \d+ \|.*\| )\d+ \|$", re.M), r"\1<tok/s> |"),  # B1 table: prompt tok/s column
    (re.compile(r"decode: .*"), "decode: <tok/s>"),
    (re.compile(r"## Timing\n\n.*", re.S), "## Timing\n\n<machine>\n"),
    # The memory_drop verdict compares a resident-memory drop with twice the spread of three loads, both
    # machine measurements: a preset saving 85 kB passes on an idle machine and not on a loaded one.
    (re.compile(r"(<MiB>, <MiB>\**) (ok|NO)"), r"\1 <machine>"),
    (re.compile(r"memory_drop[: ](ok|NO)"), "memory_drop <machine>"),
]


def _mask_memory_verdicts(obj: Any) -> Any:
    """The memory_drop rows' verdict and reason are machine measurements (see MD_MACHINE)."""
    if isinstance(obj, dict):
        if obj.get("criterion") == "memory_drop":
            return {k: ("<machine>" if k in ("pass", "why") else v) for k, v in obj.items()}
        return {k: _mask_memory_verdicts(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_mask_memory_verdicts(v) for v in obj]
    return obj


def _base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def test_regress_report_json(tmp_path_factory, snapshot_json):
    report = json.loads(ci_report(_base(tmp_path_factory))[3])
    assert _mask_memory_verdicts(normalize(report, MACHINE_KEYS)) == snapshot_json


def test_regress_report_md(tmp_path_factory, snapshot):
    md = ci_report(_base(tmp_path_factory))[4]
    for pattern, repl in MD_MACHINE:
        md = pattern.sub(repl, md)
    assert md == snapshot
