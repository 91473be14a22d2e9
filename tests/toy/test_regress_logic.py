"""The regress suite's logic without a model: bootstrap and Spearman against closed forms, the v1
criteria at their boundaries (both sides), presets and their errors, figures against the spread,
B3/B4 planning, cliff detection and the thresholds derived from measurements."""

from __future__ import annotations

import json
import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from seeddelta.errors import SeedDeltaError
from seeddelta.regress import criteria as C
from seeddelta.regress import units as U
from seeddelta.regress.presets import (
    criterion_result,
    figure_checks,
    judge,
    load_preset,
    no_saving_preset_meets_ppl,
    shipped_presets,
)
from seeddelta.regress.stats import bootstrap_windows, pct_from_nll, ranks, spearman


# ---------------------------------------------------------------------------------- statistics
def test_bootstrap_of_constant_windows_has_no_spread():
    b = bootstrap_windows([0.25] * 7)
    assert (b["mean"], b["sd"], b["lo95"], b["hi95"]) == (0.25, 0.0, 0.25, 0.25)


def test_bootstrap_sd_matches_the_standard_error_of_iid_windows():
    x = np.random.default_rng(3).normal(0.0, 1.0, size=400)
    b = bootstrap_windows(x)
    se = x.std(ddof=1) / math.sqrt(x.size)
    # the bootstrap sd estimates se with relative error ~ 1/sqrt(2·draws) + 1/sqrt(2n) ≈ 5 %; 15 % is 3 of those
    assert b["sd"] == pytest.approx(se, rel=0.15)
    assert b["lo95"] < x.mean() < b["hi95"]
    assert bootstrap_windows(x) == b  # seeded


def test_ranks_share_ties():
    assert ranks([10, 20, 20, 30]).tolist() == [1.0, 2.5, 2.5, 4.0]


def test_spearman_against_the_closed_form_without_ties():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=30), rng.normal(size=30)
    d = ranks(x) - ranks(y)
    n = 30
    assert spearman(x, y)["rho"] == pytest.approx(1 - 6 * (d * d).sum() / (n * (n * n - 1)), abs=1e-12)


def test_spearman_of_monotone_reversed_and_constant_data():
    x = np.arange(12.0)
    assert spearman(x, np.exp(x))["rho"] == pytest.approx(1.0)
    s = spearman(x, -x ** 3)
    assert s["rho"] == pytest.approx(-1.0)
    assert s["p"] < 0.01  # 12 points in perfect order: a shuffle does that about 2/12! of the time
    assert math.isnan(spearman(x, np.ones(12))["rho"])


def test_pct_from_nll():
    assert pct_from_nll(math.log(1.005)) == pytest.approx(0.5)
    assert pct_from_nll(0.0) == 0.0


# ---------------------------------------------------------------------------------- criteria
def _row(d: float, windows: int = 4) -> dict:
    return {"delta_nll": d, "delta_nll_se": 0.0, "kld_mean": 0.0, "same_top_p": 1.0, "window_delta_nll": [d] * windows}


def _result(d512=0.0, d1024=0.0, d2048=0.0, greedy="PASS", flagged=0, file_bytes=90, rss=80_000, emitted=3):
    return {"ctx512": _row(d512), "ctx1024": _row(d1024), "ctx2048": _row(d2048),
            "greedy": {"verdict": greedy, "flagged": flagged, "n": 300, "accuracy": 0.9, "reasons": []},
            "memory": {"file_bytes": file_bytes, "rss_anon_load_delta_bytes": rss},
            "build": {"emitted": emitted, "file_bytes": file_bytes, "input_bytes": 100}}


BASE = {"memory": {"file_bytes": 100, "rss_anon_load_delta_bytes": 100_000, "rss_spread_bytes": 5_000}}
NEEDED = C.FIGURE_SPREAD_Z * 5_000  # the drop resident memory must exceed: twice the spread of the measurement
TINY_STEP = 1e-9  # a ΔNLL of 1e-9 is ΔPPL ≈ 1e-7 %: just past a threshold, far above float rounding of exp


@pytest.mark.parametrize("name,ctx,threshold", [("ppl_ctx512", 512, 0.0), ("ppl_ctx1024", 1024, 0.0),
                                                ("ppl_ctx2048", 2048, 0.5)])
def test_ppl_criteria_at_their_threshold_and_just_past_it(name, ctx, threshold):
    at = math.log1p(threshold / 100)
    ok = criterion_result(name, _result(**{f"d{ctx}": at}), BASE)
    assert ok["pass"] and ok["value"] == pytest.approx(threshold, abs=1e-12)
    bad = criterion_result(name, _result(**{f"d{ctx}": at + TINY_STEP}), BASE)
    assert not bad["pass"]
    assert bad["ci95"][0] <= bad["value"] <= bad["ci95"][1]


def test_greedy_criterion():
    assert criterion_result("greedy_pass", _result(), BASE)["pass"]
    assert not criterion_result("greedy_pass", _result(greedy="FAIL", flagged=2), BASE)["pass"]
    no_pack = _result()
    del no_pack["greedy"]
    assert not criterion_result("greedy_pass", no_pack, BASE)["pass"]


@pytest.mark.parametrize("file_bytes,rss,emitted,ok", [
    (90, 100_000 - NEEDED - 1, 3, True),  # just beyond the spread
    (90, 100_000 - NEEDED, 3, False),  # a drop of exactly the allowed noise is not a drop
    (90, 99_000, 3, False),  # inside the spread
    (100, 80_000, 3, False),  # the file did not shrink
    (90, 110_000, 3, False),
    (90, 80_000, 0, False),  # nothing stripped
])
def test_memory_drop_needs_file_and_resident_memory_to_drop_together(file_bytes, rss, emitted, ok):
    r = criterion_result("memory_drop", _result(file_bytes=file_bytes, rss=rss, emitted=emitted), BASE)
    assert r["pass"] is ok


def test_memory_spread_is_at_least_a_page():
    base = {"memory": {**BASE["memory"], "rss_spread_bytes": 0}}
    r = criterion_result("memory_drop", _result(rss=100_000 - C.PAGE_BYTES), base)
    assert not r["pass"] and "within the measurement's spread" in r["why"]


def _preset(tmp_path: Path, block: dict, name: str = "p") -> Path:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({"version": 1, "defaults": {"enabled": False}, "regress": block}))
    return path


def test_only_declared_criteria_gate(tmp_path):
    p = load_preset(_preset(tmp_path, {"criteria": ["greedy_pass", "ppl_ctx2048"]}))
    j = judge(p, _result(d512=0.01), BASE, {"chunks": -1, "greedy_limit": 0})
    assert j["result"] == "PASS" and not j["meets_ppl"]  # ctx 512 fails, but is not declared
    j = judge(p, _result(d2048=0.01), BASE, {"chunks": -1, "greedy_limit": 0})
    assert j["result"] == "FAIL" and j["failures"] == ["p: ppl_ctx2048 declared but not met"]


@pytest.mark.parametrize("block,where", [
    ({"criteria": ["ppl_ctx4096"]}, "regress.criteria"),
    ({"criteria": "greedy_pass"}, "regress.criteria"),
    ({"encoding": {"K": 3}}, "regress.encoding"),
    ({"oops": 1}, "regress.oops"),
])
def test_bad_presets_are_one_line_errors_naming_the_key(tmp_path, block, where):
    with pytest.raises(SeedDeltaError, match=f"p.json: {where}"):
        load_preset(_preset(tmp_path, block))


def test_a_policy_without_a_regress_block_is_not_a_preset(tmp_path):
    path = tmp_path / "plain.json"
    path.write_text('{"version": 1}')
    with pytest.raises(SeedDeltaError, match="regress"):
        load_preset(path)


def test_figures_within_the_spread_pass_and_beyond_it_fail(tmp_path):
    settings = {"chunks": -1, "greedy_limit": 0}
    fig = {"settings": settings, "ctx512": {"delta_nll": 0.010}, "file_bytes": 90, "greedy_accuracy": 0.9}
    p = load_preset(_preset(tmp_path, {"figures": fig}))
    r = _result(d512=0.010)
    r["ctx512"]["window_delta_nll"] = [0.0, 0.02, 0.0, 0.02]
    allowed = figure_checks(p, r, settings)[0]["allowed_increase"]
    # the bootstrap sd of a mean of 4 windows is σ/√4 with σ = 0.01 (plug-in): 0.005; allowed = 2 sd = 0.01,
    # give or take the bootstrap's own noise (2000 draws: a few per cent)
    assert allowed == pytest.approx(0.01, rel=0.1)
    for d, status in ((0.010 + 0.9 * allowed, "ok"), (0.010 + 1.1 * allowed, "worse")):
        r["ctx512"]["delta_nll"] = d
        assert figure_checks(p, r, settings)[0]["status"] == status
    r["ctx512"]["delta_nll"] = 0.0
    r["build"]["file_bytes"] = 91  # bytes are exact: one more is worse
    checks = {c["figure"]: c["status"] for c in figure_checks(p, r, settings)}
    assert checks == {"ctx512 ΔNLL": "ok", "file bytes": "worse", "greedy accuracy": "ok"}
    assert figure_checks(p, r, {"chunks": 4, "greedy_limit": 0})[0]["status"] == "not comparable"


def test_a_figure_measured_as_zero_does_not_fail_on_float_noise(tmp_path):
    settings = {"chunks": -1, "greedy_limit": 0}
    p = load_preset(_preset(tmp_path, {"figures": {"settings": settings, "ctx512": {"delta_nll": 0.0}}}))
    r = _result(d512=C.FIGURE_FLOOR / 2)
    assert figure_checks(p, r, settings)[0]["status"] == "ok"
    r["ctx512"]["delta_nll"] = r["ctx512"]["window_delta_nll"][0] = 2 * C.FIGURE_FLOOR
    r["ctx512"]["window_delta_nll"] = [2 * C.FIGURE_FLOOR] * 4
    assert figure_checks(p, r, settings)[0]["status"] == "worse"


def test_no_saving_preset_meets_ppl():
    assert no_saving_preset_meets_ppl([{"saves_bytes": True, "meets_ppl": False}, {"saves_bytes": False, "meets_ppl": True}])
    assert not no_saving_preset_meets_ppl([{"saves_bytes": True, "meets_ppl": True}])


def test_shipped_presets_load_and_are_valid_policies():
    from seeddelta.policy.load import parse_policy

    for path in shipped_presets():
        p = load_preset(path)
        assert p.criteria, f"{p.name} declares no criterion"
        policy = parse_policy(p.policy_text, source=p.name, strict=True)  # the builder's view: no unknown key
        assert policy.version in (1, 2)


# ---------------------------------------------------------------------------------- B3 / B4 planning
def test_separated_sets_never_hold_adjacent_layers():
    sets = U.separated_sets(range(8))
    assert sets == [(0, 4), (1, 5), (0, 2, 4), (1, 3, 5), (0, 2, 4, 6), (1, 3, 5, 7)]
    assert U.separated_sets([1, 5]) == [(1, 5)]
    assert U.separated_sets([0, 1, 2]) == []  # any two of three adjacent layers touch, or there is no room
    for s in U.separated_sets(range(30)):
        assert all(b - a >= 2 for a, b in zip(s, s[1:], strict=False))


def test_orders():
    layers = [{"layer": x, "delta_nll": d} for x, d in [(0, 0.3), (1, 0.1), (2, 0.1), (3, -0.2)]]
    o = U.orders(range(4), layers)
    assert o == {"contiguous": [0, 1, 2, 3], "interleaved": [0, 2, 1, 3], "safest-first": [3, 1, 2, 0]}


@pytest.mark.parametrize("dnll,kld,greedy,n_reasons", [
    (C.CLIFF_DELTA_NLL, C.CLIFF_KLD, "PASS", 0),  # at the limits: not past them
    (C.CLIFF_DELTA_NLL * 1.001, 0.0, "PASS", 1),
    (0.0, C.CLIFF_KLD * 1.001, "PASS", 1),
    (0.0, 0.0, "FAIL", 1),
    (1.0, 1.0, "FAIL", 3),
])
def test_cliff_reasons(dnll, kld, greedy, n_reasons):
    g = {"verdict": greedy, "reasons": ["1 prompt(s) flagged"] if greedy == "FAIL" else []}
    assert len(U.cliff_reasons({"delta_nll": dnll, "kld_mean": kld}, g)) == n_reasons


def _fake_result(layers: list[int], effect: dict[int, float], windows: int = 4) -> dict:
    d = sum(effect[x] for x in layers) * (1 + 0.5 * (len(layers) - 1))  # superadditive: errors compound
    return {"ctx512": {"delta_nll": d, "delta_nll_se": 0.0, "kld_mean": d, "same_top_p": 1.0,
                       "window_delta_nll": [d] * windows}, "build": {"bytes_saved": 10 * len(layers)}}


def test_b4_stops_each_order_at_its_first_cliff_and_b3_measures_the_excess():
    effect = {0: 0.02, 1: 0.001, 2: 0.001, 3: 0.001, 4: 0.001, 5: 0.03}
    calls = []

    def run(specs, step):
        calls.append(step)
        return [_fake_result(sorted({x for x, _ in s.pairs}), effect) for s in specs]

    dims = {"ffn_gate": 64, "ffn_up": 64, "ffn_down": 96}
    cfg = U.Config(Fraction(1, 3), True)
    singles = [{"layer": x, "delta_nll": e, "window_delta_nll": [e] * 4} for x, e in effect.items()]
    b4 = U.b4(run, range(6), singles, cfg, dims, 4, None)
    # contiguous 0,1,2: (0.02+0.001+0.001)·2 = 0.044 ≤ 0.05; adding 3: 0.023·2.5 = 0.0575 > 0.05 → cliff at step 4
    assert b4["cliffs"]["contiguous"]["step"] == 4 and b4["cliffs"]["contiguous"]["added"] == 3
    assert len(b4["steps"]["contiguous"]) == 4
    # safest-first 1,2,3,4 (0.001 each) then 0: (0.004+0.02)·3 = 0.072 → cliff at step 5 adding layer 0
    assert b4["cliffs"]["safest-first"] == {"step": 5, "added": 0, "why": [
        f"ΔNLL +0.0720 > {C.CLIFF_DELTA_NLL}", f"KLD 0.0720 > {C.CLIFF_KLD}"], "layers_before": 4}
    assert calls[0] == "B4 stacks, 1 layer(s)"
    b3 = U.b3(run, singles, cfg, dims, 4)
    first = b3[0]
    assert first["layers"] == [0, 3]
    assert first["sum_of_singles"] == pytest.approx(0.021)
    assert first["joint_delta_nll"] == pytest.approx(0.021 * 1.5)
    assert first["excess"] == pytest.approx(0.021 * 0.5) and first["ratio"] == pytest.approx(1.5)


def test_recommended_gate_is_the_lowest_value_above_which_every_unit_is_safe():
    units = []
    for i, cos in enumerate(np.linspace(0.5, 0.95, 10)):
        damage = 0.02 if cos < 0.7 else 0.001  # low similarity hurts
        for kind in ("ffn_gate", "ffn_up", "ffn_down"):
            units.append({"kind": kind, "delta_nll": damage + 1e-4 * i, "metrics": {"cos_mean_x_w": float(cos)}})
    corr = U.correlations(units)
    t = U.recommended_thresholds(units, {"a": None}, corr)
    g = t["gate_metric"]
    assert g["metric"] == "cos_mean_x_w" and g["spearman_rho"] < 0
    first_safe = float(np.linspace(0.5, 0.95, 10)[np.linspace(0.5, 0.95, 10) >= 0.7][0])
    assert g["per_kind"]["gate"] == {"min": first_safe, "units_passing": 6, "units": 10}
    assert t["max_layers_before_cliff"] is None and t["orders_without_cliff"] == ["a"]
    # damage that rises with similarity is no reason to gate on it
    flipped = [{**u, "delta_nll": 0.03 - u["delta_nll"]} for u in units]
    t = U.recommended_thresholds(flipped, {}, U.correlations(flipped))
    assert t["gate_metric"] is None and "none predicts" in t["gate_metric_why"]


def test_b5_declares_the_greedy_criterion_only_when_a_greedy_pack_can_measure_it():
    assert C.b5_criteria(True) == ("greedy_pass",) == C.B5_CRITERIA
    assert C.b5_criteria(False) == ()  # e.g. SmolLM2: no pack, so nothing B5 could fail on unmeasured
