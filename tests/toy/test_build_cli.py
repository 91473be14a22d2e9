"""`seeddelta build` from the command line: bad input, determinism, --overwrite-existing, layers,
quantized inputs, the i16 → i32 index switch."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader
from gguf.constants import GGMLQuantizationType as Q

from seeddelta.cli import main
from seeddelta.testing.files import file_fingerprint
from seeddelta.testing.synthetic_gguf import make_imatrix, make_llama_gguf
from seeddelta.testing.tolerances import F64_REORDER


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    return make_llama_gguf(d / "in.gguf", n_layer=2, n_embd=64, n_ff=96, seed=21)


def _run(capsys, *args: str) -> tuple[int, str, str]:
    try:
        rc = main(["build", *args])
    except SystemExit as exc:  # argparse errors
        rc = int(exc.code)
    out, err = capsys.readouterr()
    return rc, out, err


def _bad_cases(tmp_path, m):
    """(label, argv, expected text in the error line)."""
    d = tmp_path
    (d / "text.gguf").write_text("not a model")
    with open(m.path, "rb") as fh:
        (d / "cut.gguf").write_bytes(fh.read()[: os.path.getsize(m.path) - 200])
    gpt2 = make_llama_gguf(d / "gpt2.gguf", arch="gpt2", n_layer=1, seed=1)
    nan = make_llama_gguf(d / "nan.gguf", n_layer=2, nan_in=["blk.1.ffn_down.weight"], seed=1)
    make_imatrix(d / "im_missing.gguf", m, skip=["blk.1.ffn_up.weight"])
    make_imatrix(d / "im_wrong.gguf", m, wrong_length=["blk.0.ffn_down.weight"])
    os.symlink(m.path, d / "link.gguf")
    (d / "metric.json").write_text('{"version": 1, "defaults": {"gating": {"metric": "cosine"}}}')
    (d / "beyond.json").write_text('{"version": 1, "layers": {"5": {"enabled": true}}}')
    (d / "gated.json").write_text('{"version": 1, "defaults": {"gating": {"metric": "cos", "min_mean": 0.5, "min_p05": 0.1}}}')
    (d / "broken.json").write_text('{"version": 1,\n  "defaults": {"enabled": tru}}')
    o = str(d / "out.gguf")
    return [
        ("missing", ["-i", str(d / "nope.gguf"), "-o", o], "not found"),
        ("not_gguf", ["-i", str(d / "text.gguf"), "-o", o], "not a GGUF"),
        ("truncated", ["-i", str(d / "cut.gguf"), "-o", o], "truncated"),
        ("arch", ["-i", gpt2.path, "-o", o], "unsupported architecture 'gpt2'"),
        ("layers", ["-i", m.path, "-o", o, "--layers", "1-5"], "layer 5 is outside the model (layers 0-1)"),
        ("layers_list", ["-i", m.path, "-o", o, "--layers", "0,7"], "layer 7 is outside"),
        ("layers_junk", ["-i", m.path, "-o", o, "--layers", "a-b"], "cannot parse"),
        ("K0", ["-i", m.path, "-o", o, "--K", "0"], "--K must be a positive integer"),
        ("Kneg", ["-i", m.path, "-o", o, "--K", "-4"], "--K must be a positive integer"),
        ("Kdown0", ["-i", m.path, "-o", o, "--K-down", "0"], "--K-down must be a positive integer"),
        ("nan", ["-i", nan.path, "-o", o], "blk.1.ffn_down.weight contains 1 NaN/Inf"),
        ("im_missing", ["-i", m.path, "-o", o, "--imatrix", str(d / "im_missing.gguf")],
         "no entry for blk.1.ffn_up.weight"),
        ("im_wrong", ["-i", m.path, "-o", o, "--imatrix", str(d / "im_wrong.gguf")],
         "blk.0.ffn_down.weight has 97 values but the weight has 96 inputs"),
        ("same", ["-i", m.path, "-o", m.path], "is the input -i"),
        ("symlink", ["-i", m.path, "-o", str(d / "link.gguf")], "is the input -i"),
        ("policy_missing", ["-i", m.path, "-o", o, "--policy", str(d / "p.json")], "p.json"),
        ("policy_metric", ["-i", m.path, "-o", o, "--policy", str(d / "metric.json")],
         "metric.json: defaults.gating.metric"),
        ("policy_json", ["-i", m.path, "-o", o, "--policy", str(d / "broken.json")], "broken.json:2:"),
        ("policy_beyond", ["-i", m.path, "-o", o, "--policy", str(d / "beyond.json")],
         "beyond.json: layers.5: layer 5 is beyond"),
        ("policy_gated_no_eval", ["-i", m.path, "-o", o, "--policy", str(d / "gated.json")],
         "blk.0.ffn_gate.weight (policy"),
        ("policy_export_is_policy", ["-i", m.path, "-o", o, "--policy", str(d / "gated.json"), "--eval-cols", "8",
                                     "--policy-export", str(d / "gated.json")], "inputs are never overwritten"),
        ("stack_cap_negative", ["-i", m.path, "-o", o, "--stack-cost-cap", "-1"], "--stack-cost-cap must be"),
        ("block0", ["-i", m.path, "-o", o, "--scheme", "block", "--block", "0"], "--block must be in 1..4096"),
    ]


def test_bad_input_one_line_nonzero_exit_input_untouched(tmp_path, model, capsys):
    for label, argv, needle in _bad_cases(tmp_path, model):
        inputs = [a for a in argv[1::2] if os.path.isfile(a)]
        before = {p: (file_fingerprint(p), Path(p).read_bytes()) for p in inputs}
        rc, out, err = _run(capsys, *argv, "-q", "-t", "1")
        assert rc != 0, label
        lines = err.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0], (label, err)
        assert lines[0].startswith("seeddelta build: error: "), label
        assert "Traceback" not in err, label
        assert not os.path.exists(tmp_path / "out.gguf"), label
        for p, (fp, data) in before.items():
            assert file_fingerprint(p) == fp and Path(p).read_bytes() == data, (label, p)
        assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")], label


def _build(capsys, m, out, *extra: str) -> str:
    rc, _, err = _run(capsys, "-i", m.path, "-o", str(out), *extra)
    assert rc == 0, err
    return err


def test_same_seed_gives_byte_identical_gguf_and_report(tmp_path, model, capsys):
    common = ["--K", "6", "--base", "--base-max-samples", "40", "--base-perm-trials", "3", "--row-scale",
              "--eval-cols", "50", "--eval-x", "3", "--report-json", str(tmp_path / "r.json"), "--seed", "7"]
    _build(capsys, model, tmp_path / "o.gguf", *common, "-t", "1", "--deterministic-report")
    first = ((tmp_path / "o.gguf").read_bytes(), (tmp_path / "r.json").read_bytes())
    _build(capsys, model, tmp_path / "o.gguf", *common, "-t", "2", "--deterministic-report")  # thread count irrelevant
    assert (tmp_path / "o.gguf").read_bytes() == first[0]
    assert (tmp_path / "r.json").read_bytes() == first[1]
    _build(capsys, model, tmp_path / "o.gguf", *common, "-t", "1")  # with timing: equal apart from `timing`
    with_timing = json.loads((tmp_path / "r.json").read_text())
    assert "timing" in with_timing and "timing" not in json.loads(first[1])
    with_timing.pop("timing")
    assert json.dumps(with_timing) == json.dumps(json.loads(first[1]))
    # another seed changes the sampled base rows / permutations, hence the file
    _build(capsys, model, tmp_path / "o2.gguf", *common[:-1], "8", "-t", "1")
    assert (tmp_path / "o2.gguf").read_bytes() != first[0]


def test_eval_cols_at_least_n_out_uses_every_row_whatever_the_seed(tmp_path, model, capsys):
    # no base: the encoding itself does not depend on the seed, so with every row evaluated the
    # weight-space metrics must not depend on it either (a sampled subset would)
    reports = []
    for seed in ("1", "2"):
        _build(capsys, model, tmp_path / f"o{seed}.gguf", "--K", "5", "--eval-cols", "96", "--seed", seed,
               "--report-json", str(tmp_path / f"r{seed}.json"), "-t", "1")
        reports.append(json.loads((tmp_path / f"r{seed}.json").read_text()))
    assert (tmp_path / "o1.gguf").read_bytes() == (tmp_path / "o2.gguf").read_bytes()
    for a, b in zip(reports[0]["weights"], reports[1]["weights"], strict=True):
        assert a["rel_l2_mean"] == b["rel_l2_mean"] and a["cos_p05"] == b["cos_p05"]
    _build(capsys, model, tmp_path / "o3.gguf", "--K", "5", "--eval-cols", "10", "--seed", "1",
           "--report-json", str(tmp_path / "r3.json"), "-t", "1")
    sampled = json.loads((tmp_path / "r3.json").read_text())
    assert any(a["rel_l2_mean"] != b["rel_l2_mean"] for a, b in zip(sampled["weights"], reports[0]["weights"],
                                                                     strict=True))


def test_existing_seeddelta_input_is_refused_and_overwrite_really_replaces(tmp_path, model, capsys):
    first = tmp_path / "k4.gguf"
    _build(capsys, model, first, "--K", "4", "--strip-dense", "--layers", "1")
    rc, _, err = _run(capsys, "-i", str(first), "-o", str(tmp_path / "x.gguf"))
    assert rc == 2 and "already holds SeedΔ tensors" in err and "--overwrite-existing" in err
    # re-encode layer 1 (stripped: kept as it is, with a warning) and layer 0 at K=8
    second = tmp_path / "k8.gguf"
    err = _build(capsys, type(model)(**{**model.__dict__, "path": str(first)}), second, "--K", "8",
                 "--overwrite-existing", "--layers", "0-1")
    assert "blk.1.ffn_gate: dense weight is absent" in err
    out = GGUFReader(second)
    names = [t.name for t in out.tensors]
    assert len(names) == len(set(names))
    t = {x.name: x for x in out.tensors}
    assert [int(v) for v in t["blk.0.ffn_gate.d_idx"].shape] == [8, 96]
    assert [int(v) for v in t["blk.1.ffn_gate.d_idx"].shape] == [4, 96]  # unchanged, bytes too
    old = {x.name: x for x in GGUFReader(first).tensors}
    assert t["blk.1.ffn_gate.d_val"].data.tobytes() == old["blk.1.ffn_gate.d_val"].data.tobytes()
    assert out.fields["seeddelta.blk.0.ffn_gate.K"].contents() == 8
    assert out.fields["seeddelta.blk.1.ffn_gate.K"].contents() == 4
    assert out.fields["seeddelta.strip_dense"].contents() is True  # layer 1 is still stripped
    # now re-encode an unstripped weight that already has SeedΔ tensors: old ones must go
    third = tmp_path / "k3.gguf"
    _build(capsys, type(model)(**{**model.__dict__, "path": str(second)}), third, "--K", "3",
           "--overwrite-existing", "--layers", "0", "--report-json", str(tmp_path / "r3.json"))
    replaced = sum(int(x.n_bytes) for x in GGUFReader(second).tensors
                   if x.name.startswith("blk.0.") and not x.name.endswith(".weight") and "ffn_" in x.name)
    r3 = json.loads((tmp_path / "r3.json").read_text())
    assert r3["bytes_replaced"] == replaced > 0
    t3 = {x.name: x for x in GGUFReader(third).tensors}
    assert [int(v) for v in t3["blk.0.ffn_down.d_idx"].shape] == [3, 64]
    assert len(t3) == len(GGUFReader(third).tensors)
    assert GGUFReader(third).fields["seeddelta.blk.0.ffn_down.K"].contents() == 3


def test_layer_list_selects_exactly_those_layers(tmp_path, capsys):
    m = make_llama_gguf(tmp_path / "in.gguf", n_layer=4, n_embd=32, n_head=2, n_head_kv=1, n_ff=64, seed=3)
    _build(capsys, m, tmp_path / "o.gguf", "--layers", "3,1-1", "--K", "2", "--strip-dense",
           "--report-json", str(tmp_path / "r.json"))
    report = json.loads((tmp_path / "r.json").read_text())
    assert [(e["layer"], e["kind"]) for e in report["weights"]] == [
        (1, "ffn_gate"), (1, "ffn_up"), (1, "ffn_down"), (3, "ffn_gate"), (3, "ffn_up"), (3, "ffn_down")]
    names = {t.name for t in GGUFReader(tmp_path / "o.gguf").tensors}
    assert "blk.0.ffn_up.weight" in names and "blk.2.ffn_up.weight" in names
    assert "blk.1.ffn_up.weight" not in names and "blk.1.ffn_up.d_idx" in names


@pytest.mark.parametrize("dtype,n_embd,n_ff", [("Q8_0", 64, 96), ("Q4_K", 256, 512), ("BF16", 64, 96)])
def test_quantized_inputs_keep_untouched_tensors_in_their_type(tmp_path, capsys, dtype, n_embd, n_ff):
    m = make_llama_gguf(tmp_path / "in.gguf", n_layer=1, n_embd=n_embd, n_ff=n_ff, dtype=dtype, seed=4)
    _build(capsys, m, tmp_path / "o.gguf", "--K", "4", "--eval-cols", "100000",
           "--report-json", str(tmp_path / "r.json"), "--layers", "0", "-t", "1")
    a = {t.name: t for t in GGUFReader(m.path).tensors}
    b = {t.name: t for t in GGUFReader(tmp_path / "o.gguf").tensors}
    for name, t in a.items():  # nothing stripped: every input tensor copied byte-for-byte in its type
        assert b[name].tensor_type == t.tensor_type and b[name].data.tobytes() == t.data.tobytes(), name
    assert a["blk.0.ffn_gate.weight"].tensor_type == Q[dtype]
    report = json.loads((tmp_path / "r.json").read_text())
    for e in report["weights"]:
        assert e["dense_type"] == dtype and e["bytes_dense"] == int(a[f"blk.0.{e['kind']}.weight"].n_bytes)
        # top-K truncation without base or row scale keeps exact entries: the error can only shrink
        # the row (rel_l2 <= 1) and the kept part is parallel-ish to w (cos > 0)
        assert 0 < e["rel_l2_mean"] <= 1.0 and e["cos_mean"] > 0


def test_indices_that_do_not_fit_i16_switch_to_i32_with_a_warning(tmp_path, capsys):
    n_ff = 32832  # > 32767 inputs for ffn_down
    m = make_llama_gguf(tmp_path / "in.gguf", n_layer=1, n_embd=32, n_head=2, n_head_kv=1, n_ff=n_ff, vocab=32,
                        seed=6, tokenizer=False)
    err = _build(capsys, m, tmp_path / "o.gguf", "--K", "2", "-t", "1")
    assert "warning: blk.0.ffn_down.weight:" in err and "i32" in err
    t = {x.name: x for x in GGUFReader(tmp_path / "o.gguf").tensors}
    assert t["blk.0.ffn_down.d_idx"].tensor_type == Q.I32
    assert t["blk.0.ffn_gate.d_idx"].tensor_type == Q.I16
    idx = np.asarray(t["blk.0.ffn_down.d_idx"].data)
    assert idx.min() >= 0 and idx.max() < n_ff
    # the indices really address the largest entries (no -1 placeholders): check one row
    W = np.asarray(next(x for x in GGUFReader(m.path).tensors if x.name == "blk.0.ffn_down.weight").data,
                   dtype=np.float64)
    top = np.argsort(-np.abs(W[0]), kind="stable")[:2]
    assert set(idx[0].tolist()) == set(top.tolist())


def test_delta_norm_clamp_applies_to_ffn_down_only(tmp_path, model, capsys):
    tau = 0.1
    err = _build(capsys, model, tmp_path / "o.gguf", "--K", "48", "--delta-norm-clamp-down", str(tau), "--layers", "0",
                 "-t", "1")
    a = {t.name: t for t in GGUFReader(model.path).tensors}
    b = {t.name: t for t in GGUFReader(tmp_path / "o.gguf").tensors}
    for kind in ("ffn_gate", "ffn_down"):
        w_norm = np.linalg.norm(np.asarray(a[f"blk.0.{kind}.weight"].data, dtype=np.float64))
        d_norm = np.linalg.norm(np.asarray(b[f"blk.0.{kind}.d_val"].data, dtype=np.float64))
        if kind == "ffn_down":
            # scaled to tau·||W|| before f16 storage: each value rounds by at most 2^-11 relative
            assert d_norm <= tau * w_norm * (1 + 2.0 ** -11)
            assert d_norm >= tau * w_norm * (1 - 2.0 ** -11)  # it was larger, so it sits on the bound
        else:
            assert d_norm > 5 * tau * w_norm  # top half of a Gaussian row: most of the norm, untouched
    assert "blk.0.ffn_down.weight: delta norm clamp" in err


def test_ffn_proxy_is_exact_at_full_budget_and_reports_why_it_is_unavailable(tmp_path, model, capsys):
    def run(name: str, *extra: str) -> list[dict]:
        _build(capsys, model, tmp_path / f"{name}.gguf", "--layers", "1", "--eval-cols", "1000", "-t", "1",
               "--report-json", str(tmp_path / f"{name}.json"), *extra)
        return json.loads((tmp_path / f"{name}.json").read_text())["weights"]

    # K = n_in keeps every entry of the (F16-exact) row, no row scale: the replaced FFN is the FFN
    full = {e["kind"]: e for e in run("full", "--K", "64", "--eval-x", "5")}
    g = full["ffn_gate"]
    assert g["ffn_proxy_available"] and g["ffn_proxy_reason"] == "" and g["ffn_proxy_eval_x"] == 5
    assert g["ffn_proxy_scope"] == "replace_only_current_tensor" and g["ffn_proxy_eval_out"] == 64
    assert g["ffn_proxy_seed"] == 1234 + 101 * 1 + 1 and full["ffn_up"]["ffn_proxy_seed"] == 1234 + 101 + 2
    # identical inputs give identical float64 sums: cos is 1 up to rounding of the division (F64_REORDER)
    assert g["ffn_proxy_cos_p05"] == pytest.approx(1.0, abs=F64_REORDER) and g["ffn_proxy_l2_mean"] == 0.0
    assert full["ffn_down"]["ffn_proxy_reason"] == "proxy_kind_not_supported"
    small = {e["kind"]: e for e in run("small", "--K", "4", "--eval-x", "5")}
    assert small["ffn_up"]["ffn_proxy_available"] and small["ffn_up"]["ffn_proxy_cos_mean"] < 0.99
    assert small["ffn_up"]["ffn_proxy_l2_mean"] > 0
    assert run("nox", "--K", "4")[0]["ffn_proxy_reason"] == "proxy_requires_eval_x"
    assert run("base", "--K", "4", "--eval-x", "2", "--base")[0]["ffn_proxy_reason"] == "proxy_requires_coo"


def test_size_warnings_say_when_seeddelta_costs_more_bytes_than_it_strips(tmp_path, model, capsys):
    # F16 dense row: 2·n_in B; COO row: K·(2 B i16 index + 2 B f16 value) = 4·K B.
    # So SeedΔ is larger exactly when K > n_in/2: n_in is 64 (gate/up) and 96 (down).
    def build(name: str, *flags: str) -> str:
        rc, _, err = _run(capsys, "-i", str(model.path), "-o", str(tmp_path / name), "-q", *flags)
        assert rc == 0, err
        return err

    assert "take more bytes" not in build("small.gguf", "--K", "31", "--strip-dense")  # 124 B < 128 B per row
    err = build("large.gguf", "--K", "40", "--strip-dense")  # gate/up: 160 B > 128 B; down: 160 B < 192 B
    assert "4 of 6 stripped weight(s) take more bytes" in err, err
    assert "no dense weight stripped" in build("kept.gguf", "--K", "8")
