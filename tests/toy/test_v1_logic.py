"""The v1 experiments' pure parts: llama.cpp's use_more_bits rule, the policies each setting builds,
the exit rules on both sides of their thresholds, and H2's leave-one-out prediction."""

from __future__ import annotations

import json

import pytest

from seeddelta.policy.load import parse_policy
from seeddelta.policy.resolve import resolve_all
from seeddelta.v1 import experiments as X
from seeddelta.v1 import mechanisms as M
from seeddelta.v1.policies import policy_text
from seeddelta.v1.profiles import Profile

P = Profile("t", 8, {"ffn_gate": 192, "ffn_up": 192, "ffn_down": 768}, (2, 4, 6), 64, (1,), (128, 256), 256,
            tuple(range(8)))


@pytest.mark.parametrize("n,protected", [
    # by hand from the rule: i < n/8, i >= 7n/8, (i - n/8) % 3 == 2 (C integer division)
    (8, {0, 3, 6, 7}),
    (30, {0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29}),
    (32, {0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31}),
])
def test_use_more_bits_matches_the_rule_worked_by_hand(n, protected):
    assert {i for i in range(n) if M.use_more_bits(i, n)} == protected


def test_policy_enables_exactly_the_named_tensors():
    text = policy_text(P, (2, 4), {4: {"K": 128, "delta_norm_clamp": 0.5}, 5: {"K": 256, "dense_rows": 0.25}},
                       gate_extra={"delta_norm_clamp": 0.9})
    on = {(r.layer, r.kind): r for r in resolve_all(parse_policy(text, strict=True), 8) if r.enabled}
    assert set(on) == {(2, "ffn_gate"), (4, "ffn_gate"), (4, "ffn_down"), (5, "ffn_down")}
    assert on[(2, "ffn_gate")].K == 64 and on[(2, "ffn_gate")].delta_norm_clamp == 0.9
    assert on[(4, "ffn_down")].K == 128 and on[(4, "ffn_down")].delta_norm_clamp == 0.5
    assert on[(5, "ffn_down")].dense_rows == 0.25 and on[(4, "ffn_down")].dense_rows == 0.0
    assert not any(r.gating_enabled for r in on.values())  # every enabled tensor is written
    assert json.loads(text)["version"] == 2


def _row(label, d2048_ref, rss_drop, mid=0.0):
    pct = {"pct": d2048_ref, "ci95": [d2048_ref - 0.1, d2048_ref + 0.1]}
    midc = {"pct": mid, "ci95": [mid - 0.1, mid + 0.1]}
    return {"label": label, "rss_drop_vs_reference": rss_drop, "bytes_saved": 10,
            "ctx": {"512": {"vs_reference": midc, "vs_original": midc},
                    "1024": {"vs_reference": midc, "vs_original": midc},
                    "2048": {"vs_reference": pct, "vs_original": pct}}}


def test_down_exit_rule_both_sides():
    mem = {"rss_spread_bytes": 10_000}
    need = X.rss_needed(mem)
    assert need == 20_000  # FIGURE_SPREAD_Z = 2 times the spread (above one page)
    rows = [_row("ok", 2.0, need + 1), _row("too costly", 2.01, need + 1), _row("no memory", 0.0, need)]
    v = X.down_exit_rule(rows, mem)
    assert v["keep"] and v["passing"] == ["ok"]
    assert not X.down_exit_rule(rows[1:], mem)["keep"]
    assert X.down_exit_rule(rows, mem)["best"] == "no memory"  # lowest ΔPPL at 2048


def test_m2_verdict_needs_an_interval_below_zero():
    assert M.m2_verdict([_row("a", -0.2, 0)])["keep"]
    assert not M.m2_verdict([_row("a", -0.05, 0)])["keep"]  # interval [-0.15, +0.05] crosses 0
    assert not M.m2_verdict([_row("a", -0.2, 0, mid=0.01)])["keep"]  # worse at 512/1024


def test_m5_sweet_spot_is_the_largest_budget_meeting_the_criteria():
    rows = [{**_row(f"top {n}", d, 0, mid=m), "budget": n} for n, d, m in ((1, 0.1, -0.01), (2, 0.5, 0.0),
                                                                            (4, 0.51, 0.0), (8, 0.2, 0.01))]
    v = M.m5_verdict(rows)
    assert v["keep"] and v["sweet_spot"] == 2 and len(v["curve"]) == 4
    assert M.budgets(8) == [1, 2, 4, 8] and M.budgets(11) == [1, 2, 4, 8, 11] and M.budgets(1) == [1]


def _unit(layer, d, cos, l2):
    return {"layer": layer, "delta_nll": d, "ci95": [d - 0.001, d + 0.001],
            "metrics": {"cos_p05_x_w": cos, "rel_l2_p95_x_w": l2, "cos_p05": cos, "rel_l2_p95": l2}}


def test_h2_separable_damage_is_predicted_and_calibration_uses_harmless_layers_only():
    # damage rises as cos falls and l2 rises: two harmful layers at the bad end
    units = [_unit(i, d, c, e) for i, (d, c, e) in enumerate([
        (0.001, 0.99, 0.10), (0.002, 0.98, 0.12), (0.001, 0.97, 0.14), (0.003, 0.96, 0.16), (0.002, 0.95, 0.18),
        (0.002, 0.94, 0.20), (0.04, 0.60, 0.80), (0.09, 0.50, 0.90)])]
    a = X.h2_analysis(units)
    assert a["harmful_layers"] == [6, 7]
    assert a["confusion"]["harmful_caught"] == 2 and a["confusion"]["harmful_missed"] == 0
    # thresholds from the six harmless layers only (quantiles 0.25 / 0.75 of their values)
    assert a["thresholds"]["cos_p05_x_w"] == pytest.approx(0.9525)
    assert a["thresholds"]["rel_l2_p95_x_w"] == pytest.approx(0.175)
    assert a["predicts_damage"]
    flat = [_unit(i, d, 0.9, 0.2) for i, d in enumerate([0.001, 0.04, 0.002, 0.05, 0.003])]
    assert not X.h2_analysis(flat)["predicts_damage"]  # constant metrics predict nothing


def test_band_agreement_counts_both_sides():
    a = M.band_agreement(8, harmful=[0, 2], measured=range(8))
    assert a["harmful_protected"] == [0] and a["harmful_unprotected"] == [2] and a["recall"] == 0.5
    assert a["protected_but_harmless"] == [3, 6, 7]


# ---------------------------------------------------------------------------------- autogate options
def _scan_unit(layer, s_p95, kind="ffn_gate"):
    return {"layer": layer, "kind": kind, "K": 32, "delta_nll": 0.0, "delta_nll_se": 0.001, "kld_mean": 0.0,
            "bytes_saved": 100, "cos_mean": 0.9, "cos_p05": 0.8, "cos_mean_x_w": 0.9, "cos_p05_x_w": 0.8,
            "S_p95": s_p95}


def test_error_quantile_filter_keeps_units_at_or_below_the_quantile_of_their_kind():
    from seeddelta.policy.autogate import Filters, rejection, with_error_limits

    units = [_scan_unit(i, v) for i, v in enumerate([0.1, 0.2, 0.3, 0.4, 0.5])] + [_scan_unit(0, 9.0, "ffn_up")]
    f = with_error_limits(Filters(allow_up=True, error_quantile=0.5), units)
    assert f.error_limits == {"ffn_gate": pytest.approx(0.3), "ffn_up": 9.0}  # median of each kind
    kept = [u["layer"] for u in units[:5] if rejection(u, f) == ""]
    assert kept == [0, 1, 2]  # at the limit: kept; just above: refused
    assert "tail error S_p95 0.4" in rejection(units[3], f)
    assert rejection(units[5], f) == ""  # its own kind's quantile
    off = with_error_limits(Filters(), units)
    assert off.error_limits == {} and all(rejection(u, off) == "" for u in units[:5])
    with pytest.raises(Exception, match="error-quantile"):
        with_error_limits(Filters(error_quantile=1.5), units)


def test_band_use_more_bits_admits_the_unprotected_layers():
    from seeddelta.policy.autogate import band_layers

    assert band_layers("use_more_bits", 8) == frozenset({1, 2, 4, 5})
    assert band_layers("use_more_bits", 30) == frozenset(range(30)) - {0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29}
