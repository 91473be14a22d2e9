"""`seeddelta build --policy`: gating on the named metric, autotune over K schedules, the stack guard,
the stack-cost cap without the original's poisoning, version-2 encoding keys, and the round trip
report → `policy export` → build giving the same GGUF byte for byte.

Oracles: the metrics of every (layer, kind, K) come from separate plain CLI builds (no policy);
the expected decisions are recomputed here from those numbers by a literal reading of the spec
(spec-policy-eval §1.8, spec-builder-runtime Appendix A.3–A.4), not by the code under test.

Run: .venv/bin/python -m pytest tests/toy/test_build_policy.py
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from seeddelta.cli import main
from seeddelta.gguf_format.reader import GGUFModel
from seeddelta.testing.synthetic_gguf import make_imatrix, make_llama_gguf

KINDS = ("ffn_gate", "ffn_up", "ffn_down")
N_LAYER = 4
SCHEDULE = (2, 4, 8, 16)
# every row (exact weight-space metrics), 8 random inputs for the functional ones, an imatrix for the _w ones
EVAL = ["--eval-cols", "1000", "--eval-x", "8", "--seed", "5", "-t", "1", "-q", "--deterministic-report"]
GROUP = {"cos": "", "cos_w": "_w", "cos_x": "_x", "cos_x_w": "_x_w"}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("policy_build")
    m = make_llama_gguf(d / "in.gguf", n_layer=N_LAYER, n_embd=32, n_ff=48, seed=11)
    make_imatrix(d / "imatrix.gguf", m, seed=11)
    m.imatrix = str(d / "imatrix.gguf")
    return m


def _build(tmp: Path, model, name: str, *extra: str) -> dict:
    out, rep = tmp / f"{name}.gguf", tmp / f"{name}.json"
    assert main(["build", "-i", model.path, "-o", str(out), "--report-json", str(rep), "--imatrix", model.imatrix,
                 *EVAL, *extra]) == 0
    return json.loads(rep.read_text())


@pytest.fixture(scope="module")
def metrics(model, tmp_path_factory):
    """Every (layer, kind) at every K of the schedule: its report entry from a plain CLI build."""
    d = tmp_path_factory.mktemp("reference")
    return {(w["layer"], w["kind"], K): w for K in SCHEDULE for w in _build(d, model, f"k{K}", "--K", str(K))["weights"]}


@pytest.fixture(scope="module")
def reference(metrics):
    """(cos_mean, cos_p05) of the weight-space metric `cos` per (layer, kind, K)."""
    return {key: (w["cos_mean"], w["cos_p05"]) for key, w in metrics.items()}


def _policy(tmp: Path, doc: dict, name: str = "p.json") -> str:
    path = tmp / name
    path.write_text(json.dumps(doc))
    return str(path)


def _guard(n: int, kind: str, mean: float, p05: float) -> tuple[float, float]:
    """Appendix A.4, literally."""
    if n >= 8:
        floor = (0.35, 0.25) if kind == "ffn_down" else (0.60, 0.45)
        return max(mean, floor[0]), max(p05, floor[1])
    if n >= 3:
        return mean + 0.05, p05 + 0.05
    return mean, p05


@pytest.mark.parametrize("metric", list(GROUP))
def test_gating_autotune_and_stack_guard_follow_the_spec(tmp_path, model, metrics, metric):
    g = GROUP[metric]
    reference = {key: (w[f"cos_mean{g}"], w[f"cos_p05{g}"]) for key, w in metrics.items()}
    # thresholds in the middle of the measured range, so that some K pass and some fail
    means = sorted(v[0] for v in reference.values())
    thr_mean, thr_p05 = means[len(means) // 2], 0.0
    schedule = {"schedule_gate_up": [16, 2, 4, 8, 2], "schedule_down": [4, 8, 16]}  # order kept, duplicate dropped
    doc = {"version": 1, "defaults": {
        "enabled": True, "K": 4, "gating": {"metric": metric, "min_mean": thr_mean, "min_p05": thr_p05},
        "autotune": {"enabled": True, **schedule, "max_iters": 3}},
        "layers": {"3": {"autotune": {"enabled": False}}}}  # layer 3: the single K 4, no autotune
    report = _build(tmp_path, model, "gated", "--policy", _policy(tmp_path, doc))
    got = {(w["layer"], w["kind"]): w for w in report["weights"]}

    counts = {"gate_up": 0, "down": 0}
    for layer in range(N_LAYER):
        for kind in KINDS:
            group = "down" if kind == "ffn_down" else "gate_up"
            tau = _guard(counts[group], kind, thr_mean, thr_p05)
            if layer == 3:
                tries = [4]
            else:
                tries = list(dict.fromkeys(schedule["schedule_down" if kind == "ffn_down" else "schedule_gate_up"]))[:3]
            passing = [K for K in tries if reference[(layer, kind, K)][0] >= tau[0] and reference[(layer, kind, K)][1] >= tau[1]]
            w = got[(layer, kind)]
            assert (w["gating_min_mean"], w["gating_min_p05"]) == pytest.approx(tau), (layer, kind)
            assert w["gating_metric"] == metric  # the named metric, never silently ffn_score
            if layer != 3:
                assert [a["K_budget"] for a in w["autotune_attempts"]] == tries[: tries.index(passing[0]) + 1] \
                    if passing else tries, (layer, kind)
                assert w["autotune_enabled"]
            if passing:
                assert (w["emit"], w["K_budget"], w["decision"]) == (True, passing[0], "pass_gating"), (layer, kind)
                counts[group] += 1
            else:
                best = max(tries, key=lambda K: reference[(layer, kind, K)][0])
                want = "autotune_failed_keep_dense" if layer != 3 else "gating_fail"
                assert (w["emit"], w["K_budget"], w["decision"]) == (False, best, want), (layer, kind)
                assert w[f"cos_mean{g}"] == reference[(layer, kind, best)][0]  # the best trial is reported
    assert (report["stack_pass_gate_up"], report["stack_pass_down"]) == (counts["gate_up"], counts["down"])
    assert 0 < sum(counts.values()) < N_LAYER * 3, "the thresholds must both pass and reject something"
    assert report["policy_version"] == 1 and report["policy_hash"].startswith("fnv1a64:")


def _costs_in_build_order(metrics, K: int, tau_mean: float) -> list[tuple[tuple[int, str], float]]:
    """With gating off the value is the one the original reports (spec §1.8 step 8): ffn_score for gate and
    up when functional metrics exist, else the named metric (cos: cos_mean)."""
    def value(w: dict) -> float:
        return w["ffn_score"] if w["kind"] != "ffn_down" else w["cos_mean"]
    return [((layer, kind), max(0.0, tau_mean - value(metrics[(layer, kind, K)])))
            for layer in range(N_LAYER) for kind in KINDS]


def _capped(costs, cap: float, *, poison: bool) -> dict[tuple[int, str], bool]:
    """Which tensors are written under the cap: ours (a rejected cost is not counted) or the original's."""
    total, out = 0.0, {}
    for key, c in costs:
        ok = total + c <= cap
        if ok or poison:
            total += c
        out[key] = ok
    return out


def test_stack_cost_cap_rejects_without_poisoning_the_total(tmp_path, model, metrics):
    K, tau_mean = 4, 0.99  # gating off through a negative p05; cost = max(0, 0.99 - value) (+ 0 for p05)
    costs = _costs_in_build_order(metrics, K, tau_mean)
    # the smallest cap at which the original's rule and ours decide differently (so the test can tell them apart)
    caps = sorted({sum(c for _, c in costs[:i]) + c for i in range(len(costs)) for _, c in costs[i:]})
    cap = next(c for c in caps if _capped(costs, c, poison=False) != _capped(costs, c, poison=True))
    cap += 1e-9  # strictly above the sum it was made from: no float tie decides
    doc = {"version": 1, "defaults": {"K": K, "gating": {"metric": "cos", "min_mean": tau_mean, "min_p05": -1}}}
    report = _build(tmp_path, model, "capped", "--policy", _policy(tmp_path, doc), "--stack-cost-cap", repr(cap))
    want = _capped(costs, cap, poison=False)
    total = 0.0
    for w in report["weights"]:
        key = (w["layer"], w["kind"])
        assert w["emit"] == want[key], key
        assert w["decision"] == ("no_gating" if want[key] else "stack_cost_cap"), key
        total += w["stack_cost_delta"] if w["emit"] else 0.0
        assert w["stack_cost_total"] == pytest.approx(total, abs=1e-12), key
    assert any(not v for v in want.values()) and total <= cap
    # a rejected tensor is not written and keeps its dense weight
    out = GGUFModel(str(tmp_path / "capped.gguf"))
    for (layer, kind), ok in want.items():
        assert out.has(f"blk.{layer}.{kind}.d_idx") == ok and out.has(f"blk.{layer}.{kind}.weight")


def _round_trip(tmp_path: Path, model, name: str, *flags: str) -> None:
    """report → `policy export` → build with that policy (same flags) → the same GGUF, byte for byte."""
    first = tmp_path / f"{name}.gguf"
    exported = tmp_path / f"{name}.exported.json"
    assert main(["policy", "export", str(tmp_path / f"{name}.json"), "-o", str(exported)]) == 0
    again = _build(tmp_path, model, f"{name}.again", "--policy", str(exported), "--policy-strict", *flags)
    assert (tmp_path / f"{name}.again.gguf").read_bytes() == first.read_bytes(), name
    assert again["policy_version"] == json.loads(exported.read_text())["version"]


def test_exported_policy_rebuilds_the_same_file_byte_for_byte(tmp_path, model, reference, capsys):
    means = sorted(v[0] for v in reference.values())
    doc = {"version": 2, "defaults": {
        "enabled": True, "strip_dense": True, "K": {"gate": 4, "up": 8, "down": 4},
        "gating": {"metric": "cos", "min_mean": means[2 * len(means) // 3], "min_p05": 0.0},
        "autotune": {"enabled": True, "schedule_gate_up": [2, 8], "schedule_down": [4, 16], "max_iters": 0}},
        "ranges": [{"layers": "1-2", "base": "xor_circulant", "row_scale": True,
                    "tensors": {"ffn_down": {"delta_norm_clamp": 0.25, "strip_dense": False}}}],
        "layers": {"0": {"tensors": {"ffn_up": {"enabled": False}}}}}
    flags = ["--K", "6", "--stack-cost-cap", "1.5"]
    report = _build(tmp_path, model, "mixed", "--policy", _policy(tmp_path, doc), *flags,
                    "--policy-export", str(tmp_path / "mixed.flag-export.json"))
    decisions = {w["decision"] for w in report["weights"]}
    assert {"pass_gating", "autotune_failed_keep_dense", "disabled"} <= decisions, decisions
    assert any(w["emit"] and w["base_kind"] == "xor_circulant" for w in report["weights"])
    _round_trip(tmp_path, model, "mixed", *flags)
    # --policy-export writes what `policy export` makes of the report
    assert (tmp_path / "mixed.flag-export.json").read_text() == (tmp_path / "mixed.exported.json").read_text()
    exported = json.loads((tmp_path / "mixed.exported.json").read_text())
    assert exported["version"] == 2
    # the CLI-only build too: its policy export rebuilds it
    _build(tmp_path, model, "plain", "--K", "5", "--base", "--row-scale", "--strip-dense")
    _round_trip(tmp_path, model, "plain", "--K", "5", "--base", "--row-scale", "--strip-dense")
    capsys.readouterr()


def test_a_policy_equal_to_the_command_line_gives_the_same_file(tmp_path, model):
    flags = ["--K", "6", "--K-down", "12", "--base", "--row-scale", "--strip-dense"]
    _build(tmp_path, model, "cli", *flags)
    doc = {"version": 1, "defaults": {"gating": {"min_mean": -1}}}  # everything else from the command line
    report = _build(tmp_path, model, "pol", *flags, "--policy", _policy(tmp_path, doc))
    assert (tmp_path / "pol.gguf").read_bytes() == (tmp_path / "cli.gguf").read_bytes()
    assert {w["decision"] for w in report["weights"]} == {"no_gating"}


def test_version_2_keys_set_the_encoding_per_tensor(tmp_path, model):
    doc = {"version": 2, "defaults": {"K": 4, "gating": {"min_mean": -1}, "enabled": False},
           "layers": {"1": {"enabled": True, "base": "xor_circulant", "row_scale": True},
                      "2": {"enabled": True, "tensors": {"ffn_down": {"delta_norm_clamp": 0.1}}}}}
    report = _build(tmp_path, model, "v2", "--policy", _policy(tmp_path, doc))
    out = GGUFModel(str(tmp_path / "v2.gguf"))
    for kind in KINDS:
        assert out.has(f"blk.1.{kind}.base_d1") and out.has(f"blk.1.{kind}.d_row_scale")
        assert not out.has(f"blk.2.{kind}.base_d1") and not out.has(f"blk.2.{kind}.d_row_scale")
    # the clamp, read back from the file: ||d_val|| <= τ·||W||_F (f16 rounding of the values: 1e-3 relative)
    w = out.dense("blk.2.ffn_down.weight").astype(np.float64)
    val = np.asarray(out.array("blk.2.ffn_down.d_val"), dtype=np.float64)
    assert np.linalg.norm(val) <= 0.1 * np.linalg.norm(w) * (1 + 1e-3)
    unclamped = np.asarray(out.array("blk.2.ffn_gate.d_val"), dtype=np.float64)
    assert np.linalg.norm(unclamped) > 0.1 * np.linalg.norm(out.dense("blk.2.ffn_gate.weight"))
    entries = {(w["layer"], w["kind"]): w for w in report["weights"]}
    assert entries[(1, "ffn_up")]["base_kind"] == "xor_circulant" and entries[(1, "ffn_up")]["row_scale"]
    assert entries[(2, "ffn_down")]["delta_norm_clamp"] == 0.1 and entries[(2, "ffn_gate")]["delta_norm_clamp"] == 0
    keys = {k: out.get(k) for k in ("seeddelta.base.enabled", "seeddelta.row_scale")}
    assert keys == {"seeddelta.base.enabled": True, "seeddelta.row_scale": True}  # a written tensor uses them


def test_unknown_keys_warn_or_fail_with_policy_strict(tmp_path, model, capsys):
    path = _policy(tmp_path, {"version": 1, "defaults": {"enabled": True, "gating": {"min_mean": -1}, "colour": 1}})
    out = str(tmp_path / "o.gguf")
    assert main(["build", "-i", model.path, "-o", out, "--policy", path, "--layers", "0", "-q"]) == 0
    err = capsys.readouterr().err
    assert "warning: policy: " in err and "colour" in err
    Path(out).unlink()
    assert main(["build", "-i", model.path, "-o", out, "--policy", path, "--policy-strict", "-q"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "p.json: defaults: unknown key in policy: colour" in lines[0], lines
    assert not Path(out).exists()
