"""The builder's trial workers: processes (forked, parking their own tensors in the spill file),
threads, or none (-t 1) give the same GGUF and report byte for byte; a worker's error reaches the
user as the same one line; Ctrl-C leaves no process and no file behind."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from seeddelta.builder import workers
from seeddelta.builder.encode import run_trial
from seeddelta.builder.options import BuildOptions, baseline_resolver
from seeddelta.builder.spill import Parked, SpillFile
from seeddelta.cli import main
from seeddelta.gguf_format.reader import GGUFModel
from seeddelta.testing.synthetic_gguf import make_imatrix, make_llama_gguf

MODES = [("t1", "never", "1"), ("threads", "never", "2"), ("processes", "always", "2"), ("processes3", "always", "3")]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _builds(tmp_path: Path, monkeypatch, capsys, model: str, flags: list[str]) -> dict[str, tuple[str, str]]:
    out = {}
    for label, mode, threads in MODES:
        d = tmp_path / label
        d.mkdir()
        monkeypatch.chdir(d)  # the report names the output as given: the same relative name in each run
        monkeypatch.setattr(workers, "PROCESS_WORKERS", mode)
        assert main(["build", "-i", model, "-o", "o.gguf", "--report-json", "r.json", "--deterministic-report",
                     "-q", "-t", threads, *flags]) == 0, label
        capsys.readouterr()
        assert sorted(os.listdir(d)) == ["o.gguf", "r.json"], label  # no spill file left behind
        out[label] = (_sha(d / "o.gguf"), _sha(d / "r.json"))
    return out


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> tuple[str, str]:
    d = tmp_path_factory.mktemp("workers")
    m = make_llama_gguf(d / "in.gguf", n_layer=3, n_embd=64, n_ff=96, ffn_dtype="Q4_1", seed=11)
    make_imatrix(d / "im.gguf", m, seed=2)
    return m.path, str(d / "im.gguf")


CASES = {
    "base": ["--K", "12", "--base", "--row-scale", "--eval-cols", "16", "--eval-x", "8", "--strip-dense"],
    # coo without base, eval-x: the FFN proxy, computed in the worker from the arrays it then parks
    "proxy": ["--K", "6", "--eval-cols", "16", "--eval-x", "8", "--dense-rows-down", "0.25",
              "--delta-regime-gate", "rms:0.5:"],
    "sdq": ["--variant", "sdq", "--quant-base", "Q8_0", "--K", "2", "--strip-dense"],  # RawTensor bases
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_processes_threads_and_one_worker_write_the_same_bytes(tmp_path, monkeypatch, capsys, model, case):
    got = _builds(tmp_path, monkeypatch, capsys, model[0], CASES[case])
    assert len(set(got.values())) == 1, got


def test_policy_with_autotune_is_the_same_in_every_worker_mode(tmp_path, monkeypatch, capsys, model):
    """Autotune tries further K on demand (outside the prefetch), gate/up never pass (keep dense after
    the whole schedule), down passes at once; the stack guard and cost cap see the same order."""
    doc = {"version": 2, "defaults": {
        "enabled": True, "strip_dense": True, "K": {"gate": 4, "up": 8, "down": 4},
        "gating": {"metric": "cos", "min_mean": 0.0, "min_p05": 0.0},
        "autotune": {"enabled": True, "schedule_gate_up": [2, 4, 8], "schedule_down": [4, 16], "max_iters": 0}},
        "ranges": [{"layers": "0-1", "tensors": {"ffn_gate": {"gating": {"min_mean": 1.0}},
                                                  "ffn_up": {"gating": {"min_mean": 1.0}, "base": "xor_circulant"}}}]}
    policy = tmp_path / "p.json"
    policy.write_text(json.dumps(doc))
    got = _builds(tmp_path, monkeypatch, capsys, model[0],
                  ["--policy", str(policy), "--imatrix", model[1], "--eval-cols", "16", "--eval-x", "8"])
    assert len(set(got.values())) == 1, got
    report = json.loads((tmp_path / "processes" / "r.json").read_text())
    decisions = {(w["layer"], w["kind"]): w["decision"] for w in report["weights"]}
    assert decisions[(0, "ffn_gate")] == "autotune_failed_keep_dense"
    assert len(next(w for w in report["weights"] if (w["layer"], w["kind"]) == (0, "ffn_gate"))["autotune_attempts"]) == 3
    assert decisions[(2, "ffn_gate")] == decisions[(0, "ffn_down")] == "pass_gating"


def test_a_workers_parked_references_read_back_the_arrays(tmp_path, monkeypatch, model):
    """A trial from a worker process holds no arrays, only `Parked` references into the shared spill
    file; read back in the parent they are the arrays the codec gives (deterministic) byte for byte."""
    monkeypatch.setattr(workers, "PROCESS_WORKERS", "always")
    gm = GGUFModel(model[0])
    opts = BuildOptions(input=model[0], output="", K=12, base=True, row_scale=True, eval_cols=16, eval_x=8,
                        progress=False)
    resolve = baseline_resolver(opts)
    spill = SpillFile(str(tmp_path))
    pool = workers.TrialPool(gm, opts, None, 2, spill)
    try:
        assert pool.processes
        keys = [(layer, kind) for layer in range(3) for kind in ("ffn_gate", "ffn_up", "ffn_down")]
        for layer, kind in keys:
            pool.prefetch(layer, kind, resolve(layer, kind), 12)
        n = 0
        for layer, kind in keys:
            trial = pool.get(layer, kind, resolve(layer, kind), 12)
            assert trial.sdw is None and trial.proxy is not None
            mine = run_trial(gm, opts, layer, kind, resolve(layer, kind), 12, None)
            assert repr((trial.metrics, trial.cost)) == repr((mine.metrics, mine.cost))  # NaN-safe, exact
            assert mine.sdw is not None
            want = mine.sdw.tensors()
            assert [name.rsplit(".", 1)[1] for name, _ in trial.facts.tensors] == list(want)
            for name, ref in trial.facts.tensors:
                assert isinstance(ref, Parked)
                arr = want[name.rsplit(".", 1)[1]]
                back = spill.park(name, ref).produce()
                assert back.dtype == arr.dtype and back.shape == arr.shape, name
                assert back.tobytes() == np.ascontiguousarray(arr).tobytes(), name
                n += 1
        assert n == 9 * 7  # d_idx, d_val, d_row_scale and 4 base tensors per weight
    finally:
        pool.close()
        spill.close()
    assert os.listdir(tmp_path) == []


def _build_cmd(model: str, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "seeddelta", "build", "-i", model, "-o", str(out), "--K", "8", "--base",
            "--eval-cols", "16", "--eval-x", "4", "-q", "-t", "2", *extra]


def test_an_error_in_a_worker_process_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    m = make_llama_gguf(tmp_path / "nan.gguf", n_layer=3, nan_in=["blk.1.ffn_up.weight"], seed=1)
    want = f"seeddelta build: error: {m.path}: tensor blk.1.ffn_up.weight contains 1 NaN/Inf value(s)"
    monkeypatch.setattr(workers, "PROCESS_WORKERS", "always")
    assert main(["build", "-i", m.path, "-o", str(tmp_path / "o.gguf"), "-q", "-t", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(want), err
    # a fresh interpreter (no other thread: processes by default), as a user runs it
    proc = subprocess.run(_build_cmd(m.path, tmp_path / "o.gguf"), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(want), proc.stderr
    assert sorted(os.listdir(tmp_path)) == ["nan.gguf"]  # nothing written, no spill file left


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            return [int(p) for p in fh.read().split()]
    except OSError:
        return []


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="needs Linux /proc to see the workers")
def test_ctrl_c_during_a_build_leaves_no_process_and_no_file(tmp_path):
    """SIGINT to the whole process group (what a terminal's Ctrl-C does) once the worker processes
    exist: exit 130 with one line, every worker gone, the output directory as before."""
    m = make_llama_gguf(tmp_path / "in.gguf", n_layer=24, n_embd=256, n_ff=512, ffn_dtype="Q4_1", seed=3)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = subprocess.Popen(_build_cmd(m.path, out_dir / "o.gguf"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    kids: list[int] = []
    deadline = time.monotonic() + 60
    while len(kids) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
        kids = _children(proc.pid)
    assert len(kids) >= 2, "the build never started its worker processes"
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.strip().splitlines() == ["seeddelta: interrupted"], err
    for pid in kids:  # reaped by the build: no such process any more
        assert not os.path.exists(f"/proc/{pid}"), f"worker {pid} outlived the build"
    with pytest.raises(ProcessLookupError):
        os.killpg(proc.pid, 0)  # nothing left in the build's process group
    assert os.listdir(out_dir) == []


def test_without_a_spill_file_the_workers_are_threads(tmp_path, monkeypatch, model):
    """Without a spill file (library callers of decide_all) there is nowhere to park: threads."""
    from seeddelta.builder.decide import decide_all

    monkeypatch.setattr(workers, "PROCESS_WORKERS", "always")
    opts = BuildOptions(input=model[0], output="", K=8, threads=2, progress=False)
    resolve = baseline_resolver(opts)
    tasks = [(layer, kind, resolve(layer, kind)) for layer in range(3) for kind in ("ffn_gate", "ffn_up", "ffn_down")]
    decided = decide_all(GGUFModel(model[0]), opts, tasks, None, io.StringIO())
    assert all(isinstance(t, tuple) and isinstance(t[1], np.ndarray) for r in decided.values() for t in r.tensors)
