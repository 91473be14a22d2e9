"""sweep, scan and regress units on a Dask cluster (`--scheduler`): a local cluster of two worker
processes started here gives the serial run's output bytes; a scheduler that cannot be reached is
one line, exit status 2.

Needs the `cluster` extra (dask[distributed]); the `test` extra installs it, so CI runs these.
"""

from __future__ import annotations

import json

import pytest

try:
    import distributed
except ImportError as exc:  # absent, or present with a missing dependency: say which
    pytest.skip(f"dask.distributed not importable ({exc}); optional extra: pip install 'seeddelta[cluster]'",
                allow_module_level=True)

from seeddelta.assets import TINY_MODEL, TINY_VAL_TEXT
from seeddelta.cli import main

SCAN = ["scan", "--layers", "1-2", "--kinds", "gate,down", "--chunks", "2", "-t", "1", "--no-cache"]


@pytest.fixture(scope="module")
def scheduler():
    # the same environment as the test process (OMP_WAIT_POLICY set by conftest before torch loaded)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") \
            as cluster:
        yield cluster.scheduler_address


def test_a_scan_on_two_dask_workers_writes_the_serial_bytes(scheduler, tmp_path, capsys):
    outputs = {}
    for name, where in (("serial", []), ("cluster", ["--scheduler", scheduler])):
        path = tmp_path / f"{name}.json"
        assert main([*SCAN, *where, "--json", str(path)]) == 0
        out, err = capsys.readouterr()
        outputs[name] = (path.read_bytes(), out)
    assert "Dask scheduler" in err
    assert outputs["cluster"] == outputs["serial"]


def test_a_sweep_on_dask_fills_the_cache_the_next_run_reads(scheduler, tmp_path, capsys):
    cache = tmp_path / "cache"
    # no -t: each worker takes its machine's cores shared among its task slots (1 each here)
    argv = ["sweep", "--layers", "1,6", "--K", "24", "--chunks", "2", "--cache", str(cache)]
    assert main([*argv, "--scheduler", scheduler, "--json", str(tmp_path / "cluster.json")]) == 0
    capsys.readouterr()
    assert len(list(cache.rglob("*.json"))) == 2  # the workers' results, cached by this process
    assert main([*argv, "--json", str(tmp_path / "serial.json")]) == 0
    assert capsys.readouterr().err.count("  cached") == 2  # reused: nothing measured again
    assert (tmp_path / "serial.json").read_bytes() == (tmp_path / "cluster.json").read_bytes()


def test_regress_measurements_on_dask_equal_the_serial_ones(scheduler, tmp_path):
    from seeddelta.evaluation.result_cache import ResultCache
    from seeddelta.evaluation.workers import Pool
    from seeddelta.regress.measure import Evaluator, Spec, run_specs

    specs = [Spec(f"u{i}", {"K_gate": 64, "K_up": 64, "K_down": 256, "base": True}, pairs=pairs, evals=((512, 1),))
             for i, pairs in enumerate([((1, "ffn_gate"),), ((2, "ffn_down"),)])]

    def measured(pool: Pool) -> str:
        ev = Evaluator(TINY_MODEL, TINY_VAL_TEXT, None, [], tmp_path / "work", threads=1)
        results = run_specs(ev, specs, ResultCache(tmp_path / "cache", {}, enabled=False), "units", pool=pool)
        return json.dumps([{k: v for k, v in r.items() if k != "seconds"} for r in results], sort_keys=True)

    assert measured(Pool(scheduler=scheduler, threads=1)) == measured(Pool())


def test_the_task_slots_per_host_are_what_the_cluster_offers(scheduler):
    from seeddelta.evaluation.workers import _slots_per_host, dask_client

    client = dask_client(scheduler)
    try:
        assert _slots_per_host(client) == {"127.0.0.1": 2}  # two workers of one thread on this machine
    finally:
        client.close()


def test_a_scheduler_without_workers_is_one_line(tmp_path, capsys, monkeypatch):
    from seeddelta.evaluation import workers

    monkeypatch.setattr(workers, "WAIT_FOR_WORKER_S", 1)
    with distributed.LocalCluster(n_workers=0, processes=True, dashboard_address=":0") as empty:
        status = main([*SCAN, "--scheduler", empty.scheduler_address, "--json", str(tmp_path / "s.json")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and not (tmp_path / "s.json").exists()
    assert "no worker joined" in lines[-1] and "dask worker" in lines[-1], lines


@pytest.mark.parametrize("address", ["tcp://127.0.0.1:1", "not an address::", "foo://host:8786"])
def test_a_scheduler_that_cannot_be_reached_is_one_line_exit_2(address, tmp_path, capsys):
    status = main([*SCAN, "--scheduler", address, "--json", str(tmp_path / "s.json")])
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert status == 2 and out == "" and not (tmp_path / "s.json").exists()
    assert len(lines) == 1 and "--scheduler" in lines[0] and "cannot reach a Dask scheduler" in lines[0], lines
