"""The v1 plan's builder options: partial strip of ffn_down (dense_rows/1, H3b), the gate delta-norm
clamp (mechanism 2), and the file-extension refusal.

Partial strip is checked against the independent oracle (testing.oracles) and the codec, on files
built from the command line: the kept rows are exactly the original rows (f16 input: bit for bit),
the others are SeedΔ's, the rows kept are the worst-fitted ones, and a file that uses the
extension is refused in one line by a reader that does not know it.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from gguf import GGUFReader

from seeddelta.cli import main
from seeddelta.codec.encode import EncodeConfig, encode
from seeddelta.codec.partial import choose_dense_rows, dense_row_count, row_errors
from seeddelta.errors import SeedDeltaError
from seeddelta.gguf_format.extensions import EXTENSIONS_KEY, check_extensions
from seeddelta.gguf_format.reader import GGUFModel, field_value
from seeddelta.runtime.projections import SparseSeedDeltaProjection, parse_payload
from seeddelta.testing.oracles import reference_apply, reference_dense
from seeddelta.testing.synthetic_gguf import make_llama_gguf
from seeddelta.testing.tolerances import U32


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_llama_gguf(tmp_path_factory.mktemp("v1") / "in.gguf", n_layer=2, n_embd=64, n_ff=96, seed=5)


def _build(capsys, m, out, *extra: str) -> tuple[int, str]:
    try:
        rc = main(["build", "-i", m.path, "-o", str(out), *extra])
    except SystemExit as exc:
        rc = int(exc.code)
    _, err = capsys.readouterr()
    return rc, err


def _tensors(path) -> dict[str, np.ndarray]:
    return {t.name: np.asarray(t.data) for t in GGUFReader(path).tensors}


@pytest.mark.parametrize("fraction,n_out,expected", [(0.0, 64, 0), (1e-9, 64, 1), (0.125, 64, 8), (0.13, 64, 9),
                                                     (1.0, 64, 64), (0.5, 7, 4)])
def test_dense_row_count_is_the_ceiling(fraction, n_out, expected):
    assert dense_row_count(fraction, n_out) == expected


@pytest.mark.parametrize("bad", [-0.01, 1.01, float("nan")])
def test_dense_row_fraction_outside_unit_interval_is_refused(bad):
    with pytest.raises(SeedDeltaError, match="dense-row fraction"):
        dense_row_count(bad, 10)


def test_chosen_rows_are_the_worst_fitted(seed):
    rng = np.random.default_rng(seed)
    W = rng.normal(0, 1, (40, 32))
    W[7] = 0.0  # an all-zero row is reconstructed exactly: never kept dense before a row with error
    sdw = encode(W, EncodeConfig(K=6))
    dr = choose_dense_rows(W, sdw.dense, 0.25)
    assert dr is not None and dr.rows.dtype == np.int32 and np.all(np.diff(dr.rows) > 0)
    err = row_errors(W, sdw.dense(np.arange(40)), np.arange(40), None)
    kept = set(dr.rows.tolist())
    assert len(kept) == 10 and 7 not in kept
    assert min(err[list(kept)]) >= max(err[[i for i in range(40) if i not in kept]])  # both sides of the cut
    assert np.array_equal(dr.values, W[dr.rows].astype(np.float16))


def test_partial_strip_build_matches_oracle_and_keeps_original_rows(tmp_path, model, capsys):
    out = tmp_path / "p.gguf"
    rc, err = _build(capsys, model, out, "--K", "16", "--base", "--row-scale", "--strip-dense", "--layers", "0",
                     "--dense-rows-down", "0.25", "--eval-cols", "64", "--eval-x", "4", "--report-json",
                     str(tmp_path / "r.json"), "-t", "1")
    assert rc == 0, err
    src, t = _tensors(model.path), _tensors(out)
    n_out, n_in = 64, 96  # ffn_down: n_embd × n_ff
    dr_idx, dr_val = t["blk.0.ffn_down.dr_idx"], t["blk.0.ffn_down.dr_val"]
    assert dr_idx.shape == (16,) and dr_val.shape == (16, n_in)  # ⌈0.25·64⌉
    assert "blk.0.ffn_gate.dr_idx" not in t and "blk.0.ffn_down.weight" not in t
    W = src["blk.0.ffn_down.weight"].astype(np.float64)
    assert np.array_equal(dr_val, W[dr_idx].astype(np.float16))  # the f16 original rows, bit for bit
    arrays = {k.rsplit(".", 1)[1]: v for k, v in t.items() if k.startswith("blk.0.ffn_down.")}
    oracle = reference_dense(arrays, n_in, n_out)
    assert np.array_equal(oracle[dr_idx], W[dr_idx])
    without = {k: v for k, v in arrays.items() if not k.startswith("dr_")}
    others = np.setdiff1d(np.arange(n_out), dr_idx)
    assert np.array_equal(oracle[others], reference_dense(without, n_in, n_out)[others])
    # the runtime's sparse projection against the oracle's float64 evaluation (float32 compute:
    # n_in-term dot products, within (n_in + 2·levels + 6)·u32 of Σ|terms|, as test_runtime_projection)
    payload = parse_payload("blk.0.ffn_down", arrays, n_in, n_out)
    assert payload is not None
    x = np.random.default_rng(1).normal(0, 1, (3, n_in)).astype(np.float32)
    y = SparseSeedDeltaProjection(payload)(torch.from_numpy(x)).numpy().astype(np.float64)
    ref = reference_apply(arrays, n_in, n_out, x)
    tol = 2 * (n_in + 2 * 7 + 6) * U32 * reference_apply(arrays, n_in, n_out, x, absolute=True) + 1e-30
    assert np.all(np.abs(y - ref) <= tol)
    np.testing.assert_array_equal(payload.dense()[dr_idx], W[dr_idx])
    # declared extension, report fields
    assert list(field_value(GGUFModel(out, require_llama=False).reader.fields[EXTENSIONS_KEY])) == ["dense_rows/1"]
    entries = {e["kind"]: e for e in json.loads((tmp_path / "r.json").read_text())["weights"] if e["layer"] == 0}
    assert entries["ffn_down"]["dense_rows"] == 16 and "dense_rows" not in entries["ffn_gate"]


def test_partial_strip_improves_the_metrics_it_ranks_by(tmp_path, model, capsys):
    reports = {}
    for f in ("0", "0.5"):
        rc, err = _build(capsys, model, tmp_path / f"{f}.gguf", "--K", "8", "--layers", "0", "--dense-rows-down", f,
                         "--eval-cols", "64", "--report-json", str(tmp_path / f"{f}.json"), "-t", "1")
        assert rc == 0, err
        reports[f] = {e["kind"]: e for e in json.loads((tmp_path / f"{f}.json").read_text())["weights"]
                      if e["layer"] == 0}
    # half the rows exact: the mean relative row error falls; gate is untouched
    assert reports["0.5"]["ffn_down"]["rel_l2_mean"] < reports["0"]["ffn_down"]["rel_l2_mean"]
    assert reports["0.5"]["ffn_gate"]["rel_l2_mean"] == reports["0"]["ffn_gate"]["rel_l2_mean"]
    assert "seeddelta.extensions" not in GGUFReader(tmp_path / "0.gguf").fields  # no extension when off


def test_file_using_an_unknown_extension_is_refused_in_one_line(tmp_path, model, capsys):
    out = tmp_path / "p.gguf"
    assert _build(capsys, model, out, "--K", "8", "--strip-dense", "--layers", "0", "--dense-rows-down", "0.1",
                  "-t", "1")[0] == 0
    gm = GGUFModel(out, require_llama=False)
    value = field_value(gm.reader.fields[EXTENSIONS_KEY])
    sufs = [n.rsplit(".", 1)[-1] for n in gm.tensors]
    assert check_extensions(value, sufs, "f") == ("dense_rows/1",)
    with pytest.raises(SeedDeltaError) as exc:  # a reader that knows no extension
        check_extensions(value, sufs, "f", known={})
    assert "'dense_rows/1'" in str(exc.value) and "\n" not in str(exc.value)
    with pytest.raises(SeedDeltaError, match="does not declare it"):  # tensors of an undeclared extension
        check_extensions(None, sufs, "f")
    with pytest.raises(SeedDeltaError, match="'future/3'"):
        check_extensions(["future/3"], [], "f")
    # the command line: `inspect` (a reader) runs on it; the runtime loads it
    assert main(["inspect", str(out)]) == 0
    capsys.readouterr()


def test_gate_clamp_bounds_the_gate_delta_norm_and_leaves_down(tmp_path, model, capsys):
    tau = 0.1
    rc, err = _build(capsys, model, tmp_path / "o.gguf", "--K", "48", "--delta-norm-clamp-gate", str(tau),
                     "--layers", "0", "-t", "1")
    assert rc == 0, err
    a, b = _tensors(model.path), _tensors(tmp_path / "o.gguf")
    for kind in ("ffn_gate", "ffn_down"):
        w_norm = np.linalg.norm(a[f"blk.0.{kind}.weight"].astype(np.float64))
        d_norm = np.linalg.norm(b[f"blk.0.{kind}.d_val"].astype(np.float64))
        if kind == "ffn_gate":
            # scaled to τ·‖W‖ before f16 storage: each value rounds by at most 2⁻¹¹ relative
            assert tau * w_norm * (1 - 2.0 ** -11) <= d_norm <= tau * w_norm * (1 + 2.0 ** -11)
        else:
            assert d_norm > 5 * tau * w_norm  # half of each row's largest entries: untouched
    assert "blk.0.ffn_gate.weight: delta norm clamp" in err


@pytest.mark.parametrize("flag,value", [("--dense-rows-down", "1.5"), ("--dense-rows-down", "-0.1"),
                                        ("--delta-norm-clamp-gate", "-1")])
def test_bad_v1_flags_are_refused_in_one_line(tmp_path, model, capsys, flag, value):
    rc, err = _build(capsys, model, tmp_path / "o.gguf", flag, value)
    assert rc == 2 and flag in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o.gguf").exists()


def test_exported_policy_rebuilds_a_partial_strip_byte_for_byte(tmp_path, model, capsys):
    policy = tmp_path / "p.json"
    policy.write_text(json.dumps({"version": 2, "defaults": {"enabled": False, "strip_dense": True,
                                                             "gating": {"min_mean": -1, "min_p05": -1}},
                                  "layers": {"1": {"enabled": True, "tensors": {
                                      "ffn_down": {"K": 12, "dense_rows": 0.3}}}}}))
    rc, err = _build(capsys, model, tmp_path / "a.gguf", "--policy", str(policy), "--policy-export",
                     str(tmp_path / "exported.json"), "-t", "1")
    assert rc == 0, err
    exported = json.loads((tmp_path / "exported.json").read_text())
    rule = exported["layers"]["1"]["tensors"]["ffn_down"]
    assert rule["dense_rows"] == 20 / 64  # ⌈0.3·64⌉ = 20 rows, written back as their share
    rc, err = _build(capsys, model, tmp_path / "b.gguf", "--policy", str(tmp_path / "exported.json"), "-t", "1")
    assert rc == 0, err
    assert (tmp_path / "a.gguf").read_bytes() == (tmp_path / "b.gguf").read_bytes()
