"""sweep, scan and regress units in worker processes (`-j N`): the same output bytes as in one process,
and an interrupted sweep resumes from its unit cache without measuring a finished unit again."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from seeddelta.assets import TINY_MODEL, TINY_VAL_TEXT
from seeddelta.cli import main
from seeddelta.evaluation import sweep

SCAN = ["scan", "--layers", "1-2", "--kinds", "gate,down", "--chunks", "2", "-t", "1", "--no-cache"]
SWEEP = ["sweep", "--layers", "1,2,6", "--K", "24", "--chunks", "2", "-t", "1"]


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    status = main(argv)
    out, err = capsys.readouterr()
    return status, out, err


def test_scan_with_two_processes_writes_the_serial_bytes(tmp_path, capsys):
    outputs = {}
    for jobs in ("1", "2"):
        path = tmp_path / f"scan-j{jobs}.json"
        status, out, err = run_cli([*SCAN, "-j", jobs, "--json", str(path)], capsys)
        assert status == 0, err
        outputs[jobs] = (path.read_bytes(), out)
    assert "2 local processes" in err
    # the same computations in other processes: equal to the last byte, the printed table too
    assert outputs["2"] == outputs["1"]


def test_sweep_and_its_stack_with_two_processes_write_the_serial_bytes(tmp_path, capsys):
    outputs = {}
    for jobs in ("1", "2"):
        path = tmp_path / f"sweep-j{jobs}.json"
        status, out, err = run_cli([*SWEEP, "--stack", "--no-cache", "-j", jobs, "--json", str(path)], capsys)
        assert status == 0, err
        outputs[jobs] = (path.read_bytes(), out)
    assert outputs["2"] == outputs["1"]
    assert len(json.loads(outputs["1"][0])["stack"]) == 3


def test_an_interrupted_sweep_resumes_and_writes_the_same_table(tmp_path, capsys, monkeypatch):
    cache = tmp_path / "cache"
    reference = tmp_path / "reference.json"
    status, ref_out, err = run_cli([*SWEEP, "--cache", str(cache), "--json", str(reference)], capsys)
    assert status == 0, err
    for entry in cache.rglob("*.json"):  # the same cache directory, empty again: the JSON names it
        entry.unlink()

    real_run = sweep.UnitMeasure.run
    calls: list[str] = []

    def stopped_after_two(self, ks, name):
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C while the third unit is measured
        calls.append(name)
        return real_run(self, ks, name)

    monkeypatch.setattr(sweep.UnitMeasure, "run", stopped_after_two)
    resumed = tmp_path / "resumed.json"
    argv = [*SWEEP, "--cache", str(cache), "--json", str(resumed)]
    status, _, err = run_cli(argv, capsys)
    assert status == 130 and "the same command resumes" in err
    assert not resumed.exists()
    finished = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in cache.rglob("*.json")}
    assert len(finished) == 2, "each finished unit was cached as it finished"

    monkeypatch.setattr(sweep.UnitMeasure, "run", real_run)
    status, out, err = run_cli([*argv, "-j", "2"], capsys)  # resumed by two worker processes
    assert status == 0, err
    entries = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in cache.rglob("*.json")}
    assert len(entries) == 3
    assert {p: entries[p] for p in finished} == finished, "a finished unit was measured (and written) again"
    assert err.count("  cached") == 2
    assert resumed.read_bytes() == reference.read_bytes() and out == ref_out


def test_regress_measurements_in_two_processes_equal_the_serial_ones(tmp_path):
    from seeddelta.evaluation.result_cache import ResultCache
    from seeddelta.evaluation.workers import Pool
    from seeddelta.regress.measure import Evaluator, Spec, run_specs

    specs = [Spec(f"u{i}", {"K_gate": 64, "K_up": 64, "K_down": 256, "base": True, "row_scale": True}, pairs=pairs,
                  evals=((512, 1),)) for i, pairs in enumerate([((1, "ffn_gate"),), ((2, "ffn_down"), (5, "ffn_up"))])]

    def measured(jobs: int, work: str) -> str:
        ev = Evaluator(TINY_MODEL, TINY_VAL_TEXT, None, [], tmp_path / work, threads=1)
        cache = ResultCache(tmp_path / f"cache-{jobs}-{work}", {}, enabled=False)
        results = run_specs(ev, specs, cache, "units", pool=Pool(jobs=jobs, threads=1))
        return json.dumps([{k: v for k, v in r.items() if k != "seconds"} for r in results], sort_keys=True)

    serial = measured(1, "serial")  # computes the original's logits and leaves them in its work directory
    assert measured(2, "parallel") == serial  # each worker process computes its own
    assert list((tmp_path / "serial").glob("original-*/logits-*.npy")), "the original's logits were not shared"
    assert measured(2, "serial") == serial  # the worker processes read the serial run's files instead


def test_without_dask_a_scheduler_is_one_line_naming_the_install(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)  # as if the extra were not installed
    status, out, err = run_cli([*SCAN, "--scheduler", "tcp://127.0.0.1:8786"], capsys)
    assert status == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "pip install 'seeddelta[cluster]'" in lines[0], lines


def test_jobs_and_scheduler_exclude_each_other(capsys):
    status, _, err = run_cli([*SCAN, "-j", "2", "--scheduler", "tcp://127.0.0.1:8786"], capsys)
    assert status == 2 and "not allowed with" in err


def test_worker_threads_never_oversubscribe(monkeypatch):
    import os

    from seeddelta.evaluation.workers import Pool, worker_threads

    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert worker_threads(Pool(jobs=1)) == 0  # one process: torch's default, every core
    assert worker_threads(Pool(jobs=2)) == 1  # 2 processes x 1 thread = 2 cores
    assert worker_threads(Pool(jobs=3)) == 1  # at least one each
    assert worker_threads(Pool(jobs=2, threads=3)) == 3  # -t decides when given
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert worker_threads(Pool(jobs=3)) == 2
    assert worker_threads(Pool(scheduler="tcp://h:8786")) == 0  # decided on each worker's machine:


def test_a_cluster_task_shares_its_machine_among_the_task_slots():
    from seeddelta.evaluation.workers import host_threads

    assert host_threads(cores=8, slots=1) == 8  # `dask worker --nthreads 1`, one per machine: every core
    assert host_threads(cores=8, slots=3) == 2  # three slots: 3 x 2 <= 8
    assert host_threads(cores=2, slots=4) == 1  # more slots than cores: one thread each, never 0
    assert host_threads(cores=2, slots=0) == 2  # an unknown host counts as one slot


def test_a_worker_refuses_another_model_under_the_same_path(tmp_path):
    import shutil

    from seeddelta.errors import SeedDeltaError
    from seeddelta.evaluation.sweep import UnitTask, UnitWorker
    from seeddelta.evaluation.windows import make_windows

    model = tmp_path / "model.gguf"
    shutil.copy(TINY_MODEL, model)
    windows = make_windows(list(range(1, 9)), 4)
    from seeddelta.builder.options import BuildOptions

    worker = UnitWorker(model, "0" * 64, windows, BuildOptions(input="", output=""), None, "torch", 1, None)
    with pytest.raises(SeedDeltaError, match="not the model being measured"):
        worker(UnitTask((((1, "ffn_gate"), 32),), "u"))
    missing = UnitWorker(Path(tmp_path / "absent.gguf"), "0" * 64, windows, BuildOptions(input="", output=""), None,
                         "torch", 1, None)
    with pytest.raises(SeedDeltaError, match="same absolute paths"):
        missing(UnitTask((((1, "ffn_gate"), 32),), "u"))
