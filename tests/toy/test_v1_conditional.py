"""Conditional Δ (v1 mechanism 3, extension delta_regime/1): Δ only for the tokens whose input
statistic lies in a weight's regime, the base alone (s ⊙ W0·x, dense rows kept) for the others.

Checked against independent references: plain SeedΔ (an always-open regime changes nothing, bit for
bit), the float64 oracle of testing.oracles with the residual removed (a never-open regime), the
bounds on both sides (inclusive), the compute-saved count against a count taken outside the runtime,
and the one-line refusals (policy values, undeclared extension, materialize).
"""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from gguf import GGUFReader

from seeddelta.cli import main
from seeddelta.codec.regime import DeltaRegime, parse_regime
from seeddelta.errors import SeedDeltaError
from seeddelta.gguf_format.extensions import EXTENSIONS_KEY, check_extensions
from seeddelta.gguf_format.reader import GGUFModel, field_value
from seeddelta.policy.load import parse_policy
from seeddelta.runtime.model import load_model
from seeddelta.runtime.projections import (
    MaterializedSeedDeltaProjection,
    SeedDeltaPayload,
    SparseSeedDeltaProjection,
    parse_payload,
)
from seeddelta.testing.oracles import reference_apply
from seeddelta.testing.synthetic_gguf import make_llama_gguf
from seeddelta.testing.tolerances import U32

N_EMBD, N_FF = 64, 96
FLAGS = ("--K", "16", "--base", "--row-scale", "--strip-dense", "-t", "1", "-q")
TOKENS = (np.arange(1, 40) * 7) % 50


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_llama_gguf(tmp_path_factory.mktemp("m3") / "in.gguf", n_layer=2, n_embd=N_EMBD, n_ff=N_FF, seed=5)


def _build(capsys, m, out, *extra: str) -> tuple[int, str]:
    try:
        rc = main(["build", "-i", m.path, "-o", str(out), *FLAGS, *extra])
    except SystemExit as exc:
        rc = int(exc.code)
    _, err = capsys.readouterr()
    return rc, err


def _arrays(path, name: str) -> dict[str, np.ndarray]:
    return {t.name.rsplit(".", 1)[1]: np.asarray(t.data) for t in GGUFReader(path).tensors
            if t.name.startswith(name + ".")}


def _policy(tmp_path, kind: str, rule: dict) -> str:
    p = tmp_path / "policy.json"
    p.write_text(json.dumps({"version": 2, "defaults": {"enabled": True, "gating": {"min_mean": -1, "min_p05": -1}},
                             "layers": {"0": {"tensors": {kind: rule}}}}))
    return str(p)


def _tol(arrays, n_in, n_out, x):
    # float32 compute against the float64 oracle: n_in-term dot products plus the FWHT chain, within
    # (n_in + 2·levels + 6)·u32 of Σ|terms| (as test_v1_options' partial-strip check), doubled for the
    # row scale's and the base/residual sum's roundings
    return 2 * (n_in + 2 * 7 + 6) * U32 * reference_apply(arrays, n_in, n_out, x, absolute=True) + 1e-30


def _base_only(arrays):
    """The oracle's input for the base alone: the residual values set to 0 (W0, s and dense rows kept)."""
    return {k: (np.zeros_like(v) if k in ("d_val", "b_val") else v) for k, v in arrays.items()}


@pytest.mark.parametrize("mode", ["sparse", "materialized"])
def test_always_open_regime_gives_plain_seeddelta_logits_bit_for_bit(tmp_path, model, capsys, mode):
    assert _build(capsys, model, tmp_path / "plain.gguf")[0] == 0
    assert _build(capsys, model, tmp_path / "open.gguf", "--delta-regime-gate", "rms:0:")[0] == 0  # rms ≥ 0 always
    plain = load_model(tmp_path / "plain.gguf", mode=mode)
    opened = load_model(tmp_path / "open.gguf", mode=mode)
    assert torch.equal(plain(TOKENS), opened(TOKENS))
    saved = opened.conditional_delta()
    assert saved is not None and saved["pairs"] == 2 * len(TOKENS) and saved["pairs_skipped"] == 0
    assert plain.conditional_delta() is None


@pytest.mark.parametrize("mode", ["sparse", "materialized"])
def test_never_open_regime_is_the_base_alone_with_dense_rows(tmp_path, model, capsys, mode):
    # ffn_down with a quarter of its rows dense and a regime no token reaches (rms ≤ −1)
    pol = _policy(tmp_path, "ffn_down", {"dense_rows": 0.25, "delta_regime": {"statistic": "rms", "max": -1}})
    rc, err = _build(capsys, model, tmp_path / "never.gguf", "--policy", pol, "--layers", "0")
    assert rc == 0, err
    arrays = _arrays(tmp_path / "never.gguf", "blk.0.ffn_down")
    assert {"rg_stat", "rg_lim", "dr_idx", "d_val"} <= set(arrays)
    n_in, n_out = N_FF, N_EMBD
    payload = parse_payload("blk.0.ffn_down", arrays, n_in, n_out)
    assert isinstance(payload, SeedDeltaPayload) and payload.regime == DeltaRegime("rms", -math.inf, -1.0)
    proj = SparseSeedDeltaProjection(payload) if mode == "sparse" else MaterializedSeedDeltaProjection(payload)
    x = np.random.default_rng(2).normal(0, 1, (9, n_in)).astype(np.float32)
    y = proj(torch.from_numpy(x)).numpy().astype(np.float64)
    base = _base_only(arrays)
    ref = reference_apply(base, n_in, n_out, x)
    assert np.all(np.abs(y - ref) <= _tol(base, n_in, n_out, x))
    full = reference_apply(arrays, n_in, n_out, x)
    others = np.setdiff1d(np.arange(n_out), arrays["dr_idx"])
    assert np.abs(full[:, others] - ref[:, others]).max() > 100 * _tol(arrays, n_in, n_out, x).max()  # Δ mattered
    assert proj.gate is not None and proj.gate.skipped == 9


def _gate_payload(tmp_path, model, capsys) -> tuple[SeedDeltaPayload, dict[str, np.ndarray]]:
    assert _build(capsys, model, tmp_path / "g.gguf", "--layers", "0")[0] == 0
    arrays = _arrays(tmp_path / "g.gguf", "blk.0.ffn_gate")
    payload = parse_payload("blk.0.ffn_gate", arrays, N_EMBD, N_FF)
    assert isinstance(payload, SeedDeltaPayload)
    return payload, arrays


@pytest.mark.parametrize("mode", ["sparse", "materialized"])
@pytest.mark.parametrize("statistic", ["rms", "max_abs"])
def test_bounds_are_inclusive_on_both_sides(tmp_path, model, capsys, mode, statistic):
    payload, arrays = _gate_payload(tmp_path, model, capsys)
    # rows of constant magnitude 0.5: rms and max |x| are 0.5 exactly in float32 (0.25·n and 0.25·n / n exact)
    x = np.full((2, N_EMBD), 0.5, dtype=np.float32)
    x[1, ::2] = -0.5
    up, down = float(np.nextafter(np.float32(0.5), np.float32(1))), float(np.nextafter(np.float32(0.5), np.float32(0)))
    full = reference_apply(arrays, N_EMBD, N_FF, x)
    base = reference_apply(_base_only(arrays), N_EMBD, N_FF, x)
    tol = _tol(arrays, N_EMBD, N_FF, x)
    assert np.abs(full - base).max() > 100 * tol.max()  # the two outcomes are told apart
    cases = [((0.5, math.inf), True), ((up, math.inf), False),  # min: on it → Δ; one float32 above it → no Δ
             ((-math.inf, 0.5), True), ((-math.inf, down), False)]  # max: on it → Δ; one below → no Δ
    for (lo, hi), applied in cases:
        p = replace(payload, regime=DeltaRegime(statistic, lo, hi))
        proj = SparseSeedDeltaProjection(p) if mode == "sparse" else MaterializedSeedDeltaProjection(p)
        y = proj(torch.from_numpy(x)).numpy().astype(np.float64)
        assert np.all(np.abs(y - (full if applied else base)) <= tol), (lo, hi)
        assert proj.gate is not None and proj.gate.skipped == (0 if applied else 2)


@pytest.mark.parametrize("mode", ["sparse", "materialized"])
def test_mixed_tokens_follow_the_oracle_per_token(tmp_path, model, capsys, mode):
    payload, arrays = _gate_payload(tmp_path, model, capsys)
    rng = np.random.default_rng(3)
    x = (rng.normal(0, 1, (31, N_EMBD)) * rng.uniform(0.1, 3.0, (31, 1))).astype(np.float32)
    rms = np.sqrt((x.astype(np.float64) ** 2).mean(axis=1))
    s = np.sort(rms)
    lo, hi = float((s[8] + s[9]) / 2), float((s[22] + s[23]) / 2)  # between tokens: far from float32 rounding
    proj_payload = replace(payload, regime=DeltaRegime("rms", lo, hi))
    proj = SparseSeedDeltaProjection(proj_payload) if mode == "sparse" else MaterializedSeedDeltaProjection(proj_payload)
    y = proj(torch.from_numpy(x)).numpy().astype(np.float64)
    inside = (rms >= lo) & (rms <= hi)
    assert 0 < inside.sum() < 31
    ref = np.where(inside[:, None], reference_apply(arrays, N_EMBD, N_FF, x),
                   reference_apply(_base_only(arrays), N_EMBD, N_FF, x))
    assert np.all(np.abs(y - ref) <= _tol(arrays, N_EMBD, N_FF, x))
    assert proj.gate is not None and proj.gate.skipped == int((~inside).sum())


def test_compute_saved_equals_a_count_taken_outside_the_runtime(tmp_path, model, capsys):
    assert _build(capsys, model, tmp_path / "half.gguf", "--delta-regime-gate", "max_abs:2.2:")[0] == 0
    m = load_model(tmp_path / "half.gguf", mode="sparse")
    skipped = {0: 0, 1: 0}

    def observe(layer: int, kind: str, x: torch.Tensor) -> None:  # the gate's input, counted in float64
        if kind == "ffn_gate":
            stat = np.abs(x.numpy().astype(np.float64)).max(axis=1)
            skipped[layer] += sum(1 for v in stat if not v >= np.float32(2.2))  # one token at a time

    m.ffn_observer = observe
    m(TOKENS)
    m(TOKENS[:11])
    saved = m.conditional_delta()
    assert saved is not None
    n = len(TOKENS) + 11
    assert saved["tokens"] == n and saved["pairs"] == 2 * n
    assert saved["pairs_skipped"] == skipped[0] + skipped[1] and 0 < saved["pairs_skipped"] < 2 * n
    K = _arrays(tmp_path / "half.gguf", "blk.0.ffn_gate")["d_idx"].shape[1]
    assert saved["delta_flops_skipped"] == saved["pairs_skipped"] * 2 * N_FF * K
    assert saved["ffn_dense_flops"] == n * 2 * 3 * 2 * N_EMBD * N_FF  # 2 layers × 3 weights × 2·n_in·n_out
    assert saved["ffn_flops_skipped_fraction"] == saved["delta_flops_skipped"] / saved["ffn_dense_flops"]
    m.reset_conditional_delta()
    assert m.conditional_delta()["pairs"] == 0


def test_file_declares_the_extension_and_readers_refuse_it_undeclared_or_unknown(tmp_path, model, capsys):
    assert _build(capsys, model, tmp_path / "r.gguf", "--delta-regime-gate", "rms:0.5:")[0] == 0
    gm = GGUFModel(tmp_path / "r.gguf", require_llama=False)
    value = field_value(gm.reader.fields[EXTENSIONS_KEY])
    assert list(value) == ["delta_regime/1"]
    sufs = [n.rsplit(".", 1)[-1] for n in gm.tensors]
    assert "rg_lim" in sufs and check_extensions(value, sufs, "f") == ("delta_regime/1",)
    with pytest.raises(SeedDeltaError, match="does not declare it") as exc:
        check_extensions(None, sufs, "f")
    assert "\n" not in str(exc.value)
    with pytest.raises(SeedDeltaError, match="'delta_regime/1'") as exc:
        check_extensions(value, sufs, "f", known={"dense_rows/1": ("dr_idx", "dr_val")})
    assert "\n" not in str(exc.value)
    lim = _arrays(tmp_path / "r.gguf", "blk.0.ffn_gate")["rg_lim"]
    assert lim.dtype == np.float32 and lim[0] == np.float32(0.5) and lim[1] == np.inf


def test_materialize_refuses_a_regime_file_in_one_line(tmp_path, model, capsys):
    assert _build(capsys, model, tmp_path / "r.gguf", "--delta-regime-gate", "rms:0.5:")[0] == 0
    out = tmp_path / "dense.gguf"
    try:
        rc = main(["materialize", str(tmp_path / "r.gguf"), "-o", str(out)])
    except SystemExit as exc:
        rc = int(exc.code)
    _, err = capsys.readouterr()
    assert rc == 2 and "delta_regime/1" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize("regime,where,what", [
    ({"statistic": "rms", "min": 2, "max": 1}, "delta_regime", "min 2 > max 1"),
    ({"statistic": "mean", "min": 1}, "delta_regime.statistic", "unknown statistic"),
    ({"statistic": "rms", "min": "NaN"}, "delta_regime.min", "finite number"),
    ({"statistic": "rms", "max": "-Infinity"}, "delta_regime.max", "finite number"),
    ({"min": 1}, "delta_regime.statistic", "missing"),
    ({"statistic": "rms", "low": 1}, "delta_regime.low", "unknown delta_regime key"),
    ({"statistic": "rms", "min": True}, "delta_regime.min", "must be a number"),
])
def test_bad_policy_regime_is_one_line_naming_the_json_path(regime, where, what):
    text = json.dumps({"version": 2, "layers": {"3": {"tensors": {"ffn_gate": {"delta_regime": regime}}}}})
    text = text.replace('"NaN"', "NaN").replace('"-Infinity"', "-Infinity")  # JSON literals, not strings
    with pytest.raises(SeedDeltaError) as exc:
        parse_policy(text)
    msg = str(exc.value)
    assert f"layers.3.tensors.ffn_gate.{where}:" in msg and what in msg and "\n" not in msg


def test_regime_is_a_version_2_key():
    with pytest.raises(SeedDeltaError, match="delta_regime"):
        parse_policy(json.dumps({"version": 1, "layers": {"0": {"delta_regime": {"statistic": "rms"}}}}), strict=True)


@pytest.mark.parametrize("value,what", [("rms:2:1", "min 2 > max 1"), ("l2:0:", "unknown statistic"),
                                        ("rms:nan:", "finite"), ("rms:0.5", "STAT:MIN:MAX"), ("rms:x:", "not a number")])
def test_bad_regime_flag_is_refused_in_one_line_and_writes_nothing(tmp_path, model, capsys, value, what):
    rc, err = _build(capsys, model, tmp_path / "o.gguf", "--delta-regime-gate", value)
    assert rc == 2 and "--delta-regime-gate" in err and what in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o.gguf").exists()
    with pytest.raises(SeedDeltaError):
        parse_regime(value, "--delta-regime-gate")


def test_exported_policy_rebuilds_a_regime_file_byte_for_byte(tmp_path, model, capsys):
    pol = _policy(tmp_path, "ffn_gate", {"delta_regime": {"statistic": "max_abs", "min": 0.1, "max": 3.3}})
    rc, err = _build(capsys, model, tmp_path / "a.gguf", "--policy", pol, "--policy-export", str(tmp_path / "e.json"))
    assert rc == 0, err
    exported = json.loads((tmp_path / "e.json").read_text())
    rule = exported["layers"]["0"]["tensors"]["ffn_gate"]
    assert rule["delta_regime"] == {"statistic": "max_abs", "min": float(np.float32(0.1)), "max": float(np.float32(3.3))}
    rc, err = _build(capsys, model, tmp_path / "b.gguf", "--policy", str(tmp_path / "e.json"))
    assert rc == 0, err
    assert (tmp_path / "a.gguf").read_bytes() == (tmp_path / "b.gguf").read_bytes()


# ------------------------------------------------------------------ inspect shows the extensions
def _inspect_json(capsys, path) -> dict:
    capsys.readouterr()
    assert main(["inspect", str(path), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("spec,direction", [("rms:0.3:", "above"), ("max_abs::1.7", "below"),
                                            ("rms:0.1:0.3", "between"), ("rms::", "always")])
def test_inspect_shows_each_weights_regime_as_stored(tmp_path, model, capsys, spec, direction):
    out = tmp_path / "r.gguf"
    rc, err = _build(capsys, model, out, "--delta-regime-gate", spec)
    assert rc == 0, err
    info = _inspect_json(capsys, out)
    assert info["extensions"] == ["delta_regime/1"]
    stat = spec.split(":")[0]
    for w in info["weights"]:
        if w["kind"] != "ffn_gate":
            assert w["extensions"] == {}  # the regime flag is ffn_gate's only
            continue
        lim = _arrays(out, f"blk.{w['layer']}.ffn_gate")["rg_lim"]  # read independently of inspect
        want_lo = None if math.isinf(lim[0]) else float(lim[0])
        want_hi = None if math.isinf(lim[1]) else float(lim[1])
        assert w["extensions"] == {"delta_regime/1": {"statistic": stat, "min": want_lo, "max": want_hi,
                                                      "direction": direction}}
        for given, got in zip(spec.split(":")[1:], (want_lo, want_hi), strict=True):  # the flag's numbers, in float32
            assert got == (float(np.float32(given)) if given else None)
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.count("delta_regime/1 Δ when") == 2 and f"({direction})" in text


def test_inspect_shows_the_dense_row_count(tmp_path, model, capsys):
    out = tmp_path / "d.gguf"
    rc, err = _build(capsys, model, out, "--dense-rows-down", "0.25")
    assert rc == 0, err
    info = _inspect_json(capsys, out)
    assert info["extensions"] == ["dense_rows/1"]
    downs = [w for w in info["weights"] if w["kind"] == "ffn_down"]
    assert len(downs) == 2
    for w in downs:
        rows = _arrays(out, f"blk.{w['layer']}.ffn_down")["dr_idx"].size
        assert rows == math.ceil(0.25 * N_EMBD)  # ffn_down has n_embd output rows
        assert w["extensions"] == {"dense_rows/1": {"rows": rows, "of": N_EMBD}}
    assert all(w["extensions"] == {} for w in info["weights"] if w["kind"] != "ffn_down")
    assert main(["inspect", str(out)]) == 0
    assert capsys.readouterr().out.count(f"dense_rows/1 {math.ceil(0.25 * N_EMBD)} of {N_EMBD} rows dense") == 2


def test_inspect_of_a_plain_file_lists_no_extension(tmp_path, model, capsys):
    assert _build(capsys, model, tmp_path / "p.gguf")[0] == 0
    info = _inspect_json(capsys, tmp_path / "p.gguf")
    assert info["extensions"] == [] and all(w["extensions"] == {} for w in info["weights"])
    assert main(["inspect", str(tmp_path / "p.gguf")]) == 0
    assert "delta_regime/1" not in capsys.readouterr().out


# ------------------------------------------------------------------ quantile bounds calibrated by build
@pytest.mark.parametrize("extra,what", [
    (("--delta-regime-gate", "rms:q0.1:"), "need a calibration text (--calibration TEXT)"),
    (("--calibration", "CAL"), "--calibration is only used by quantile bounds"),
    (("--delta-regime-gate", "rms:0.5:", "--calibration", "CAL"), "--calibration is only used by quantile bounds"),
    (("--delta-regime-gate", "rms:q0.1:2", "--calibration", "CAL"), "both bounds as quantiles (qP) or both as numbers"),
    (("--delta-regime-gate", "rms:q1.5:", "--calibration", "CAL"), "MIN quantile must be in [0, 1]"),
    (("--delta-regime-gate", "rms::q-0.1", "--calibration", "CAL"), "MAX quantile must be in [0, 1]"),
    (("--delta-regime-gate", "rms:qx:", "--calibration", "CAL"), "is not a quantile qP"),
    (("--delta-regime-gate", "rms:q0.9:q0.1", "--calibration", "CAL"), "quantile min 0.9 > quantile max 0.1"),
    (("--delta-regime-gate", "mean:q0.1:", "--calibration", "CAL"), "unknown statistic 'mean'"),
])
def test_bad_quantile_regime_is_one_line_and_writes_nothing(tmp_path, model, capsys, extra, what):
    cal = tmp_path / "cal.txt"
    cal.write_text("some calibration text " * 50, encoding="utf-8")
    out = tmp_path / "o.gguf"
    rc, err = _build(capsys, model, out, *(str(cal) if x == "CAL" else x for x in extra))
    assert rc == 2 and what in err and err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()


def test_quantile_regime_with_a_bad_output_fails_before_the_calibration(tmp_path, model, capsys):
    cal = tmp_path / "cal.txt"
    cal.write_text("x " * 10, encoding="utf-8")  # far too short to calibrate: the -o error must come first
    rc, err = _build(capsys, model, model.path, "--delta-regime-gate", "rms:q0.1:", "--calibration", str(cal))
    assert rc == 2 and "calibrat" not in err.lower() and err.count("\n") == 1
