"""Scan, autogate and layer policies on the tiny model, the compressed weights in use.

* the scan ranks a tensor known to hurt (ffn_down of block 7, README's sweep) below one known to be
  harmless (block 3), and one unit's figures equal `build --policy` + `kld` of that unit;
* an interrupted scan resumes from its cache, computing only what is missing;
* autogate rejects a poisoned layer (K = 1 on every tensor, which a doctored scan claims harmless)
  with its reason recorded, and its policy meets its own limits when re-measured from scratch in a
  fresh process (build + kld + greedy as subprocesses);
* a parametrized set of policies (single layers, bands, gate-only, with and without down, the
  autogate's output) each meets the PPL/KLD/greedy bounds declared in seeddelta/testing/thresholds.py.

Windows, greedy prompts and bounds: seeddelta.testing.thresholds (one declared place).
Run: .venv/bin/python -m pytest tests/tiny/test_autogate.py
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from seeddelta.assets import TINY_MODEL, TINY_TEST_PACK, TINY_VAL_TEXT, sha256_file
from seeddelta.builder.options import BuildOptions
from seeddelta.cli import main
from seeddelta.evaluation import sweep
from seeddelta.evaluation.greedy import load_pack
from seeddelta.evaluation.memory import load
from seeddelta.evaluation.pack import limit_per_task
from seeddelta.evaluation.sweep import GreedySettings, UnitMeasure
from seeddelta.evaluation.windows import text_windows
from seeddelta.testing import thresholds as T

MODEL = str(TINY_MODEL)
WINDOWS = ["-c", str(T.CTX), "--chunks", str(T.CHUNKS)]
ONE_THREAD = ["-t", "1"]  # see seeddelta/testing/thresholds.py: the figures do not depend on it
SCAN = ["--layers", "3,7", "--kinds", "gate,down", *T.ENCODING_FLAGS, *WINDOWS, *ONE_THREAD]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("autogate")


@pytest.fixture(scope="module")
def scan(work) -> dict:
    assert main(["scan", *SCAN, "--cache", str(work / "cache"), "--json", str(work / "scan.json")]) == 0
    return json.loads((work / "scan.json").read_text())


def _unit(scan: dict, layer: int, kind: str) -> dict:
    (row,) = [u for u in scan["units"] if (u["layer"], u["kind"]) == (layer, kind)]
    return row


def test_scan_ranks_a_tensor_known_to_hurt_below_one_known_to_be_harmless(scan):
    hurts, harmless = _unit(scan, 7, "ffn_down"), _unit(scan, 3, "ffn_gate")
    # separated by more than 3 standard errors of each: not noise of the windows
    gap = 3 * (hurts["delta_nll_se"] + harmless["delta_nll_se"])
    assert hurts["delta_nll"] - harmless["delta_nll"] > gap, (hurts["delta_nll"], harmless["delta_nll"], gap)
    assert hurts["kld_mean"] > harmless["kld_mean"]
    order = [(u["layer"], u["kind"]) for u in sorted(scan["units"], key=lambda u: u["delta_nll"])]
    assert order.index((3, "ffn_gate")) < order.index((7, "ffn_down"))
    # the original's layout is there too: layers."3".ffn_gate with its field names
    row = scan["layers"]["3"]["ffn_gate"]
    assert {"S_mean", "S_p95", "cos_mean", "cos_p05", "cos_mean_x_w", "cos_p05_x_w", "log_norm_ratio_mean",
            "ffn_proxy_available", "ffn_proxy_score", "raw"} <= set(row)
    assert row["S_mean"] == row["raw"]["rel_l2_mean"] and scan["meta"]["K_fixed"] == 32


def test_one_scan_unit_equals_build_and_kld_of_that_unit(scan, work, capsys):
    row = _unit(scan, 3, "ffn_down")
    policy = work / "one.json"
    policy.write_text(json.dumps({"version": 1, "defaults": {"enabled": False, "gating": {"min_mean": -1}},
                                  "layers": {"3": {"tensors": {"ffn_down": {"enabled": True, "strip_dense": True,
                                                                            "K": row["K"]}}}}}))
    out, rep, kld = work / "one.gguf", work / "one.report.json", work / "one.kld.json"
    assert main(["build", "-i", MODEL, "-o", str(out), "--policy", str(policy), *T.ENCODING_FLAGS, "--eval-cols", "64",
                 "--eval-x", "32", "--report-json", str(rep), "-q", *ONE_THREAD]) == 0
    assert main(["kld", "--base", MODEL, "-m", str(out), "--sparse", "--json", str(kld), *WINDOWS, *ONE_THREAD]) == 0
    k, (entry,) = json.loads(kld.read_text()), [w for w in json.loads(rep.read_text())["weights"] if w["emit"]]
    # the same deterministic computations by another route: equal to the last bit
    assert (row["delta_nll"], row["delta_nll_se"], row["kld_mean"], row["same_top_p"]) == \
        (k["delta_nll"]["mean"], k["delta_nll"]["se"], k["kld"]["mean"], k["same_top_p"]["mean"])
    assert row["bytes_saved"] == entry["bytes_dense"] - entry["bytes_seeddelta"]
    assert (row["cos_mean"], row["S_mean"], row["K_eff"]) == (entry["cos_mean"], entry["rel_l2_mean"], entry["K"])
    capsys.readouterr()


def test_an_interrupted_scan_resumes_from_its_cache(scan, work, monkeypatch, capsys):
    import shutil

    cache = work / "cache_resume"
    shutil.copytree(work / "cache", cache)
    entries = sorted(cache.rglob("*.json"))
    assert len(entries) == len(scan["units"])
    entries[-1].unlink()  # as if the scan had been stopped before its last unit
    real_run, computed = sweep.UnitMeasure.run, []

    def interrupted(self, ks, name):
        raise KeyboardInterrupt

    monkeypatch.setattr(sweep.UnitMeasure, "run", interrupted)
    argv = ["scan", *SCAN, "--cache", str(cache), "--json", str(work / "resumed.json")]
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert "the same command resumes" in err and not (work / "resumed.json").exists()

    def counting(self, ks, name):
        computed.append(dict(ks))
        return real_run(self, ks, name)

    monkeypatch.setattr(sweep.UnitMeasure, "run", counting)
    assert main(argv) == 0
    assert len(computed) == 1, computed  # only the missing unit was measured
    resumed = json.loads((work / "resumed.json").read_text())
    assert resumed["units"] == scan["units"]
    assert "(cached)" in capsys.readouterr().err


POISONED_LAYER = 5


@pytest.fixture(scope="module")
def autogate(scan, work):
    """Autogate on the scan plus a poisoned layer: K = 1 on gate, up and down of one layer, which the
    doctored scan claims to be the safest candidates of all (ΔNLL −0.01, cosines 0.99)."""
    doc = dict(scan)
    template = _unit(scan, 3, "ffn_gate")
    poison = [{**template, "layer": POISONED_LAYER, "kind": kind, "K": 1, "K_eff": 1, "delta_nll": -0.01,
               "delta_nll_se": 0.0, "kld_mean": 0.0, "cos_mean": 0.99, "cos_p05": 0.99}
              for kind in ("ffn_gate", "ffn_up", "ffn_down")]
    doc["units"] = scan["units"] + poison
    (work / "doctored.json").write_text(json.dumps(doc))
    policy = work / "auto.json"
    argv = ["autogate", "--scan", str(work / "doctored.json"), "-o", str(policy), "--allow-up", "--enable-down",
            "--greedy-limit", str(T.GREEDY_LIMIT), "--max-delta-nll", str(T.AUTOGATE_MAX_DELTA_NLL),
            "--max-kld", str(T.AUTOGATE_MAX_KLD), "--cache", str(work / "cache"), *ONE_THREAD]
    assert main(argv) == 0
    return json.loads((work / "auto.autogate.json").read_text()), policy


def test_a_poisoned_layer_is_rejected_with_its_reason(autogate):
    record, _ = autogate
    poisoned = [s for s in record["steps"] if s["layer"] == POISONED_LAYER]
    assert [s["kind"] for s in poisoned] == ["ffn_gate", "ffn_up", "ffn_down"]  # claimed safest: tried first
    for step in poisoned:
        assert step["evaluated"] and not step["kept"]
        assert step["scan"]["delta_nll"] == -0.01  # the figures it read are recorded ...
        assert step["figures"]["delta_nll"] > T.AUTOGATE_MAX_DELTA_NLL  # ... next to the ones it measured
        assert f"> {T.AUTOGATE_MAX_DELTA_NLL:g}" in step["reason"]
    assert all(layer != POISONED_LAYER for layer, _, _ in record["selection"])
    refused = {(r["layer"], r["kind"]) for r in record["refused"]}
    assert (3, "ffn_down") in refused  # below the original's cosine thresholds at K 32 (recorded, not tried)
    kept = [s for s in record["steps"] if s["kept"]]
    assert kept and record["final"] == kept[-1]["figures"]


def test_the_autogate_policy_meets_its_limits_when_remeasured_in_a_fresh_process(autogate, work):
    record, policy = autogate
    assert main(["policy", "check", str(policy), "--policy-strict"]) == 0
    out = work / "fresh.gguf"
    build = [a if a != "OUT.gguf" else str(out) for a in record["build_command"][1:]] + ONE_THREAD  # no "seeddelta"
    script = (
        "import sys; from seeddelta.cli import main\n"
        f"assert main({build!r}) == 0\n"
        f"assert main(['kld', '--base', {MODEL!r}, '-m', {str(out)!r}, '--sparse', '--json', {str(work / 'fresh.kld.json')!r},"
        f" '-c', '{T.CTX}', '--chunks', '{T.CHUNKS}', '-t', '1']) == 0\n"
        f"sys.exit(main(['greedy', '-m', {str(out)!r}, '--base', {MODEL!r}, '--sparse', '--limit', '{T.GREEDY_LIMIT}',"
        f" '--json', {str(work / 'fresh.greedy.json')!r}, '-t', '1']))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    kld, greedy = json.loads((work / "fresh.kld.json").read_text()), json.loads((work / "fresh.greedy.json").read_text())
    final = record["final"]
    # its own limits hold ...
    assert kld["delta_nll"]["mean"] <= T.AUTOGATE_MAX_DELTA_NLL and kld["kld"]["mean"] <= T.AUTOGATE_MAX_KLD
    assert greedy["verdict"]["result"] == "PASS"
    # ... and are what autogate measured: the same deterministic computation, to the last bit
    assert (kld["delta_nll"]["mean"], kld["kld"]["mean"]) == (final["delta_nll"], final["kld_mean"])
    assert greedy["result"]["accuracy"] == final["greedy"]["accuracy"]
    assert out.stat().st_size == final["file_bytes"]


@pytest.fixture(scope="module")
def measure(work):
    base = load(TINY_MODEL, use_seeddelta=False)
    windows = text_windows(TINY_VAL_TEXT, T.CTX, T.CHUNKS, base.tokenizer).windows
    items = tuple(limit_per_task(load_pack(None), T.GREEDY_LIMIT))
    greedy = GreedySettings(items, sha256_file(TINY_TEST_PACK), T.GREEDY_TOLERANCE)
    encoding = BuildOptions(input="", output="", progress=False, **T.ENCODING)
    (work / "policies").mkdir(exist_ok=True)
    return UnitMeasure(TINY_MODEL, base, windows, encoding, work / "policies", greedy=greedy)


@pytest.mark.parametrize("name", [*T.POLICIES, "autogate"])
def test_policy_meets_its_declared_bounds(name, measure, work, request):
    if name == "autogate":
        _, path = request.getfixturevalue("autogate")
        bounds = T.autogate_bounds()
    else:
        path = work / f"{name}.json"
        path.write_text(json.dumps(T.policy_document(name)))
        bounds = T.bounds(name)
    fig = measure.run_policy(path, name)
    g = fig["greedy"]
    where = (name, fig["delta_nll"], fig["delta_nll_se"], fig["kld_mean"], g["result"], g["accuracy"])
    assert fig["delta_nll"] <= bounds.max_delta_nll, where
    if bounds.min_delta_nll is not None:  # the damage shows: the SeedΔ weights are in use
        assert fig["delta_nll"] >= bounds.min_delta_nll, where
    assert fig["kld_mean"] <= bounds.max_kld, where
    if bounds.greedy_pass:
        assert g["result"] == "PASS", where
    if bounds.max_accuracy is not None:
        assert g["accuracy"] <= bounds.max_accuracy, where
    assert fig["bytes_saved"] > 0 and fig["weights"], where
