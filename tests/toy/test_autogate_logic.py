"""Autogate's logic without a model: the scan file's checks, the original's filters, the convex hull of
K options, the Lagrangian order under a byte budget, the incremental loop (kept / rejected / skipped
steps, the budget stop) and the run failing on a failed or incomplete evaluation.

The loop is driven by a fake measurement whose figures are a declared function of the selection
(additive ΔNLL per tensor plus an interaction term), so every expected decision is computed here
from that function, not read from the code under test.

Run: .venv/bin/python -m pytest tests/toy/test_autogate_logic.py
"""

from __future__ import annotations

import json
import math

import pytest

from seeddelta.errors import SeedDeltaError
from seeddelta.evaluation.autogate import Budget, Limits, judge, run_autogate
from seeddelta.policy import parse_policy, resolve_all
from seeddelta.policy.autogate import (
    Filters,
    MoveQueue,
    Scan,
    band_layers,
    hull_moves,
    lookup,
    policy_document,
    read_scan,
)

ENCODING = {"scheme": "coo", "block": 32, "K": [32], "K_gate": -1, "K_up": -1, "K_down": -1, "idx_type": "i16",
            "val_type": "f16", "row_scale": True, "imatrix": None, "imatrix_eps": 1e-8, "imatrix_power": 1.0,
            "base": True, "base_max_samples": 2048, "base_perm_trials": 1, "seed": 1234, "delta_norm_clamp_down": 0.0}


def unit(layer: int, kind: str, K: int, dnll: float, saved: int, *, cos: float = 0.9, p05: float = 0.8,
         se: float = 0.001) -> dict:
    return {"layer": layer, "kind": kind, "K": K, "delta_nll": dnll, "delta_nll_se": se, "kld_mean": max(dnll, 0.0),
            "bytes_saved": saved, "cos_mean": cos, "cos_p05": p05, "cos_mean_x_w": cos, "cos_p05_x_w": p05}


def scan_of(units: list[dict]) -> Scan:
    return Scan(path="scan.json", model_sha256="0" * 64, text="t", ctx=64, chunks=2, encoding=ENCODING,
                eval_cols=64, eval_x=32, units=tuple(units))


class FakeMeasure:
    """Figures of a selection: ΔNLL = Σ per-tensor cost + 0.5·(n_tensors − 1)·interaction (errors compound),
    bytes = Σ saved; greedy FAILs when ΔNLL > greedy_fail_above."""

    def __init__(self, cost: dict, saved: dict, *, interaction: float = 0.0, greedy_fail_above: float = math.inf,
                 input_bytes: int = 10_000_000, fail_at: int | None = None, nan_at: int | None = None) -> None:
        self.cost, self.saved, self.interaction = cost, saved, interaction
        self.greedy_fail_above, self.input_bytes = greedy_fail_above, input_bytes
        self.fail_at, self.nan_at, self.calls = fail_at, nan_at, []

    def delta(self, ks: dict) -> float:
        return sum(self.cost[(t, K)] for t, K in ks.items()) + 0.5 * (len(ks) - 1) * self.interaction

    def measure(self, ks: dict, name: str) -> dict:
        self.calls.append(dict(ks))
        if self.fail_at is not None and len(self.calls) == self.fail_at:
            raise SeedDeltaError("disk full")
        d = self.delta(ks)
        saved = sum(self.saved[(t, K)] for t, K in ks.items())
        greedy = {"result": "PASS" if d <= self.greedy_fail_above else "FAIL",
                  "reasons": [] if d <= self.greedy_fail_above else ["3 prompt(s) flagged"]}
        return {"delta_nll": math.nan if self.nan_at == len(self.calls) else d, "delta_nll_se": 0.001,
                "ppl_ratio": math.exp(d), "kld_mean": max(d, 0.0), "kld_se": 0.0001, "kld_p99": 2 * max(d, 0.0),
                "same_top_p": 0.9, "bytes_saved": saved, "input_bytes": self.input_bytes,
                "file_bytes": self.input_bytes - saved, "greedy": greedy, "cached": False}


def test_hull_keeps_the_lower_convex_chain_and_drops_dominated_options():
    # (bytes, ΔNLL): K=64 (100, 0.01), K=48 (150, 0.05) is above the chord 64→16, K=32 (200, 0.03) is below it,
    # K=24 (200, 0.04) saves the same as K=32 for more, K=16 (400, 0.20)
    options = [unit(1, "ffn_gate", K, d, b) for K, d, b in
               [(64, 0.01, 100), (48, 0.05, 150), (32, 0.03, 200), (24, 0.04, 200), (16, 0.20, 400)]]
    moves = hull_moves((1, "ffn_gate"), options)
    assert [(m.from_K, m.K) for m in moves] == [(None, 64), (64, 32), (32, 16)]
    assert [m.d_bytes for m in moves] == [100, 100, 200]
    slopes = [m.per_byte for m in moves]
    assert slopes == sorted(slopes)  # convex: marginal cost per byte never decreases along a tensor's moves
    assert slopes[0] == pytest.approx(0.01 / 100) and slopes[1] == pytest.approx(0.02 / 100)


def test_queue_orders_by_cost_per_byte_with_a_budget_and_by_delta_nll_without():
    a = hull_moves((1, "ffn_gate"), [unit(1, "ffn_gate", 32, 0.010, 1000)])  # 1e-5 per byte
    b = hull_moves((2, "ffn_gate"), [unit(2, "ffn_gate", 32, 0.005, 100)])   # 5e-5 per byte, smaller ΔNLL
    by_bytes = MoveQueue(by_bytes=True, moves={(1, "ffn_gate"): a, (2, "ffn_gate"): b})
    by_nll = MoveQueue(by_bytes=False, moves={(1, "ffn_gate"): a, (2, "ffn_gate"): b})
    assert [by_bytes.pop()[0].tensor[0] for _ in range(2)] == [1, 2]
    assert [by_nll.pop()[0].tensor[0] for _ in range(2)] == [2, 1]


def test_filters_are_the_original_defaults():
    f = Filters()
    assert (f.cos_threshold, f.cos_p05_threshold, f.min_gap, f.allow_up, f.enable_down) == (0.70, 0.50, 1, False, False)
    scan = scan_of([unit(0, "ffn_gate", 32, 0.0, 10, cos=0.70, p05=0.50),     # both exactly at the thresholds: in
                    unit(1, "ffn_gate", 32, 0.0, 10, cos=0.6999, p05=0.9),    # mean just below: out
                    unit(2, "ffn_gate", 32, 0.0, 10, cos=0.9, p05=0.4999),    # p05 just below: out
                    unit(3, "ffn_up", 32, 0.0, 10), unit(4, "ffn_down", 32, 0.0, 10),
                    unit(5, "ffn_gate", 32, 0.0, 0)])                         # saves nothing
    from seeddelta.policy.autogate import candidates

    moves, refused = candidates(scan, f)
    assert list(moves) == [(0, "ffn_gate")]
    reasons = {(r["layer"], r["kind"]): r["reason"] for r in refused}
    assert "cos_mean_x_w 0.6999 < 0.7" in reasons[(1, "ffn_gate")] and "cos_p05_x_w 0.4999 < 0.5" in reasons[(2, "ffn_gate")]
    assert "--allow-up" in reasons[(3, "ffn_up")] and "--enable-down" in reasons[(4, "ffn_down")]
    assert "saves no bytes" in reasons[(5, "ffn_gate")]
    moves, _ = candidates(scan, Filters(allow_up=True, enable_down=True))
    assert (3, "ffn_up") in moves and (4, "ffn_down") in moves


def test_metric_lookup_falls_back_when_the_imatrix_metric_is_zero_or_missing():
    assert lookup({"cos_mean_x_w": 0.0, "cos_mean": 0.8}, "cos_mean_x_w") == 0.8  # a scan without imatrix
    assert lookup({"cos_mean": 0.8}, "cos_mean_x_w") == 0.8
    assert lookup({"cos_mean_x_w": 0.6, "cos_mean": 0.8}, "cos_mean_x_w") == 0.6
    assert lookup({"cos_mean_x_w": 0.0, "cos_mean": 0.0}, "cos_mean_x_w") == 0.0


def test_band_core_leaf_and_explicit_and_the_extreme_score_outside():
    assert band_layers("core", 8) == frozenset(range(2, 6)) and band_layers("leaf", 8) == frozenset({0, 1, 6, 7})
    assert band_layers("all", 8) is None and band_layers("1-3,5", 8) == frozenset({1, 2, 3, 5})
    with pytest.raises(SeedDeltaError, match="--band: layer 9 is beyond"):
        band_layers("9", 8)
    with pytest.raises(SeedDeltaError, match="--band: expected core"):
        band_layers("middle", 8)
    from seeddelta.policy.autogate import candidates

    # outside the band: admitted only if ΔNLL + 2·se <= band_extreme (0): -0.003 + 2·0.001 = -0.001 in, 0 + 0.002 out
    scan = scan_of([unit(0, "ffn_gate", 32, -0.003, 10), unit(7, "ffn_gate", 32, 0.0, 10), unit(3, "ffn_gate", 32, 0.5, 10)])
    moves, refused = candidates(scan, Filters(band=band_layers("core", 8)))
    assert sorted(moves) == [(0, "ffn_gate"), (3, "ffn_gate")]
    assert [r["layer"] for r in refused] == [7] and "outside the band" in refused[0]["reason"]


def test_incremental_loop_keeps_rejects_and_skips_with_reasons():
    t = {L: (L, "ffn_gate") for L in range(6)}
    cost = {(t[0], 32): 0.001, (t[2], 32): 0.002, (t[3], 32): 0.0005, (t[5], 32): 0.009, (t[4], 32): 0.004}
    saved = {k: 100 for k in cost}
    scan = scan_of([unit(L, k, K, cost[(tt, K)], 100) for (tt, K) in cost for L, k in [tt]])
    fake = FakeMeasure(cost, saved, interaction=0.002)
    record = run_autogate(fake, scan, Filters(), Limits(max_delta_nll=0.01, greedy=True), Budget())
    # by scan ΔNLL: 3 (0.0005), 0 (0.001), 2 (0.002: adjacent to 3 → skipped), 4 (adjacent to 3 → skipped), 5 (0.009)
    steps = [(s["layer"], s["evaluated"], s["kept"]) for s in record["steps"]]
    assert steps == [(3, True, True), (0, True, True), (2, False, False), (4, False, False), (5, True, False)]
    d5 = fake.delta({t[3]: 32, t[0]: 32, t[5]: 32})
    assert record["steps"][4]["reason"] == f"ΔNLL {d5:+.5f} > 0.01"
    assert "--min-gap 1: layer 3 is selected" in record["steps"][2]["reason"]
    assert record["selection"] == [[0, "ffn_gate", 32], [3, "ffn_gate", 32]]
    assert record["final"]["delta_nll"] == pytest.approx(fake.delta({t[3]: 32, t[0]: 32}))
    assert record["steps"][0]["scan"]["delta_nll"] == 0.0005  # the figures each step read are recorded
    # every evaluated step re-measured the WHOLE selection, not the unit alone
    assert fake.calls == [{t[3]: 32}, {t[3]: 32, t[0]: 32}, {t[3]: 32, t[0]: 32, t[5]: 32}]


def test_limits_on_both_sides_of_each_boundary():
    base = {"delta_nll": 0.01, "delta_nll_se": 0.002, "kld_mean": 0.02, "greedy": {"result": "PASS", "reasons": []}}
    assert judge(base, Limits(max_delta_nll=0.01, max_kld=0.02)) == ""
    assert "ΔNLL +0.01000 > 0.0099" in judge(base, Limits(max_delta_nll=0.0099))
    assert "KLD mean 0.02000 > 0.0199" in judge(base, Limits(max_kld=0.0199))
    assert "ΔNLL + 1·se +0.01200 > 0.012" not in judge(base, Limits(max_delta_nll=0.012, se_margin=1))
    assert "ΔNLL + 1·se" in judge(base, Limits(max_delta_nll=0.0119, se_margin=1))
    failed = {**base, "greedy": {"result": "FAIL", "reasons": ["2 prompt(s) flagged"]}}
    assert judge(failed, Limits()) == "greedy FAIL: 2 prompt(s) flagged" and judge(failed, Limits(greedy=False)) == ""


def test_byte_budget_takes_cheapest_per_byte_moves_and_upgrades_then_stops():
    g, d = (1, "ffn_gate"), (3, "ffn_gate")
    cost = {(g, 64): 0.0001, (g, 32): 0.0011, (d, 64): 0.0004, (d, 32): 0.0020}
    saved = {(g, 64): 100, (g, 32): 300, (d, 64): 100, (d, 32): 200}
    units = [unit(t[0], t[1], K, cost[(t, K)], saved[(t, K)]) for (t, K) in cost]
    fake = FakeMeasure(cost, saved)
    record = run_autogate(fake, scan_of(units), Filters(), Limits(max_delta_nll=1.0, greedy=False),
                          Budget(target_bytes=350))
    # per byte: g@64 1e-6, d@64 4e-6, g 64→32 (0.001/200) 5e-6, d 64→32 (0.0016/100) 1.6e-5
    assert [(s["layer"], s["from_K"], s["K"]) for s in record["steps"]] == [(1, None, 64), (3, None, 64), (1, 64, 32)]
    assert record["budget_met"] and record["stopped"].startswith("byte target reached (400 >= 350")
    assert record["selection"] == [[1, "ffn_gate", 32], [3, "ffn_gate", 64]]


def test_max_tensors_and_a_budget_that_cannot_be_met():
    t = [(L, "ffn_gate") for L in (0, 2, 4)]
    cost, saved = {(x, 32): 0.001 for x in t}, {(x, 32): 100 for x in t}
    units = [unit(x[0], x[1], 32, 0.001, 100) for x in t]
    record = run_autogate(FakeMeasure(cost, saved), scan_of(units), Filters(), Limits(greedy=False),
                          Budget(max_tensors=2, target_bytes=10_000))
    assert len(record["selection"]) == 2 and record["budget_met"] is False
    assert record["steps"][2]["reason"] == "--max-tensors 2 reached" and not record["steps"][2]["evaluated"]


@pytest.mark.parametrize("how", ["raises", "nan"])
def test_a_failed_or_incomplete_evaluation_fails_the_run(how):
    t = [(L, "ffn_gate") for L in (0, 2)]
    cost, saved = {(x, 32): 0.001 for x in t}, {(x, 32): 100 for x in t}
    units = [unit(x[0], x[1], 32, 0.001, 100) for x in t]
    fake = FakeMeasure(cost, saved, **({"fail_at": 2} if how == "raises" else {"nan_at": 2}))
    with pytest.raises(SeedDeltaError) as err:
        run_autogate(fake, scan_of(units), Filters(), Limits(greedy=False), Budget())
    assert err.value.exit_code == 1 and "step 2 (ffn_gate of layer 2 at K=32)" in str(err.value)
    assert ("disk full" if how == "raises" else "delta_nll is nan") in str(err.value)


def test_policy_document_is_a_valid_policy_of_exactly_the_selection():
    sel = {(1, "ffn_gate"): 32, (3, "ffn_down"): 256, (3, "ffn_gate"): 48}
    doc = policy_document(sel, {**ENCODING, "delta_norm_clamp_down": 0.5})
    assert doc["version"] == 2 and doc["defaults"]["base"] == "xor_circulant" and doc["defaults"]["row_scale"] is True
    rows = resolve_all(parse_policy(json.dumps(doc), strict=True), 5)
    on = {(r.layer, r.kind): r for r in rows if r.enabled}
    assert {k: r.K for k, r in on.items()} == sel
    assert all(r.strip_dense and not r.gating_enabled for r in on.values())
    assert on[(3, "ffn_down")].delta_norm_clamp == 0.5 and on[(3, "ffn_gate")].delta_norm_clamp == 0.0
    plain = policy_document(sel, {**ENCODING, "base": False, "row_scale": False})
    assert plain["version"] == 1 and "base" not in plain["defaults"]  # readable by the original builder
    parse_policy(json.dumps(plain), strict=True)


def _scan_file(tmp_path, doc) -> str:
    path = tmp_path / "scan.json"
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return str(path)


def _good_scan() -> dict:
    return {"model_sha256": "0" * 64, "text": "t.txt", "ctx": 64, "chunks": 2, "eval_cols": 64, "eval_x": 32,
            "encoding": ENCODING, "units": [unit(0, "ffn_gate", 32, 0.001, 10)]}


@pytest.mark.parametrize("change, needle", [
    (lambda d: "{\n  \"units\": [1,]\n}", "scan.json:2:"),
    (lambda d: {k: v for k, v in d.items() if k != "units"}, "units: missing: no measured units"),
    (lambda d: {**d, "units": []}, "units: empty"),
    (lambda d: {**d, "units": [{**d["units"][0], "delta_nll": "small"}]}, "units[0].delta_nll: must be a finite number"),
    (lambda d: {**d, "units": [{**d["units"][0], "kind": "attn_q"}]}, "units[0].kind: unknown kind 'attn_q'"),
    (lambda d: {**d, "units": [{**d["units"][0], "K": 0}]}, "units[0].K: must be positive"),
    (lambda d: {**d, "units": [{**d["units"][0], "delta_nll_se": -1}]}, "units[0].delta_nll_se: must be >= 0"),
    (lambda d: {**d, "units": d["units"] * 2}, "units[1]: second unit for blk.0.ffn_gate K=32"),
    (lambda d: {**d, "encoding": {k: v for k, v in ENCODING.items() if k != "seed"}}, "encoding.seed: missing"),
    (lambda d: {**d, "ctx": 0}, "ctx: must be positive"),
    (lambda d: [d], "top level: a scan must be a JSON object"),
], ids=["json", "no-units", "empty", "type", "kind", "K0", "se", "duplicate", "encoding", "ctx", "array"])
def test_bad_scan_files_name_the_place(tmp_path, change, needle):
    with pytest.raises(SeedDeltaError) as err:
        read_scan(_scan_file(tmp_path, change(_good_scan())))
    assert needle in str(err.value) and str(err.value).startswith(str(tmp_path / "scan.json"))
    assert err.value.exit_code == 2
    read_scan(_scan_file(tmp_path, _good_scan()))  # and the unchanged file is fine


# ------------------------------------------------------------------ retention cap (v1 mechanisms 1 and 6)
def test_retention_cap_keeps_K_at_full_retention_and_half_at_none():
    from seeddelta.policy.autogate import retention_cap

    assert [retention_cap(64, r) for r in (1.0, 0.0, 0.5)] == [64, 32, 48]
    assert retention_cap(63, 0.0) == 32 and retention_cap(1, 0.0) == 1  # rounded up; never below one entry
    # both sides of a rounding boundary: ⌈64·1.25/2⌉ = 40 exactly, a hair above needs one more entry
    assert retention_cap(64, 0.25) == 40 and retention_cap(64, 0.25 + 1e-9) == 41


def test_retention_caps_read_the_chosen_field_and_refuse_a_scan_without_it():
    from seeddelta.policy.autogate import retention_caps

    units = [{**unit(0, "ffn_gate", 32, 0.001, 100), "retention": 1.0, "retention_replay": 0.0},
             {**unit(2, "ffn_gate", 32, 0.002, 100), "retention": 0.0, "retention_replay": 1.0}]
    assert retention_caps(scan_of(units), "proxy") == {(0, "ffn_gate", 32): 32, (2, "ffn_gate", 32): 16}
    assert retention_caps(scan_of(units), "replay") == {(0, "ffn_gate", 32): 16, (2, "ffn_gate", 32): 32}
    plain = [{k: v for k, v in u.items() if k != "retention_replay"} for u in units]
    with pytest.raises(SeedDeltaError, match=r"^scan.json: units\[0\]\.retention_replay: missing.*--replay PACK"):
        retention_caps(scan_of(plain), "replay")
    for bad in (1.5, -0.1, "high", True):
        with pytest.raises(SeedDeltaError, match=r"units\[1\]\.retention: must be a number in \[0, 1\]"):
            retention_caps(scan_of([units[0], {**units[1], "retention": bad}]), "proxy")


def test_capped_loop_measures_and_selects_the_capped_K_in_the_same_order():
    t = {L: (L, "ffn_gate") for L in range(6)}
    cost = {(t[0], 32): 0.001, (t[3], 32): 0.0005, (t[5], 32): 0.009}
    capped = {(t[0], 16): 0.0004, (t[3], 24): 0.0003, (t[5], 32): 0.009}  # the fake's figures at the built K
    ret = {0: 0.0, 3: 0.5, 5: 1.0}
    units = [{**unit(L, "ffn_gate", 32, cost[(t[L], 32)], 100), "retention": ret[L]} for L in (0, 3, 5)]
    from seeddelta.policy.autogate import retention_caps

    caps = retention_caps(scan_of(units), "proxy")
    assert caps == {(0, "ffn_gate", 32): 16, (3, "ffn_gate", 32): 24, (5, "ffn_gate", 32): 32}
    plain = run_autogate(FakeMeasure(cost, {k: 100 for k in cost}), scan_of(units), Filters(), Limits(greedy=False),
                         Budget())
    fake = FakeMeasure(capped, {k: 60 for k in capped})
    record = run_autogate(fake, scan_of(units), Filters(), Limits(greedy=False), Budget(), caps=caps)
    # the same candidates in the same order (the scan's figures at K), each built at its capped K
    assert [s["layer"] for s in record["steps"]] == [s["layer"] for s in plain["steps"]] == [3, 0, 5]
    assert [s["K_built"] for s in record["steps"]] == [24, 16, 32] and all(s["K"] == 32 for s in record["steps"])
    assert fake.calls == [{t[3]: 24}, {t[3]: 24, t[0]: 16}, {t[3]: 24, t[0]: 16, t[5]: 32}]
    assert record["selection"] == [[0, "ffn_gate", 16], [3, "ffn_gate", 24], [5, "ffn_gate", 32]]
    # uncapped, layer 5 takes ΔNLL to 0.0005 + 0.001 + 0.009 > 0.01 and is rejected; capped it fits (0.0097)
    assert plain["selection"] == [[0, "ffn_gate", 32], [3, "ffn_gate", 32]]
    assert "K_built" not in plain["steps"][0]  # off: today's record
