"""`seeddelta build` end to end on small synthetic llama GGUFs: the stored arrays, an independent
reconstruction of what they imply, the report's metrics, the GGUF schema (spec §8) and the bytes."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
from gguf import GGUFReader, GGUFValueType
from gguf.constants import GGMLQuantizationType as Q

from seeddelta.builder.report import WEIGHT_FIELD_NAMES
from seeddelta.cli import main
from seeddelta.gguf_format.seeddelta_tensors import read_seeddelta_file
from seeddelta.testing.oracles import reference_dense
from seeddelta.testing.synthetic_gguf import make_imatrix, make_llama_gguf
from seeddelta.testing.tolerances import F64_REORDER

N_EMBD, N_FF, N_LAYER = 64, 160, 2  # n_ff not a power of two; GQA (4 heads, 2 kv heads)
KINDS = ("ffn_gate", "ffn_up", "ffn_down")
K = 12


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _percentile(values: np.ndarray, q: float) -> float:
    """Spec §6: sort ascending, position q·(n−1), linear interpolation (written here independently)."""
    v = np.sort(np.asarray(values, dtype=np.float64))
    pos = q * (len(v) - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(v) - 1)
    return float(v[lo] + (v[hi] - v[lo]) * (pos - lo))


def _row_metrics(w: np.ndarray, w_hat: np.ndarray) -> dict[str, float]:
    a, b = np.linalg.norm(w, axis=1), np.linalg.norm(w_hat, axis=1)
    rel = np.linalg.norm(w - w_hat, axis=1) / a
    cos = np.sum(w * w_hat, axis=1) / (a * b)
    return {"rel_l2_mean": float(rel.mean()), "rel_l2_p95": _percentile(rel, 0.95),
            "cos_mean": float(cos.mean()), "cos_p05": _percentile(cos, 0.05),
            "norm_ratio_mean": float((b / a).mean())}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    d = tmp_path_factory.mktemp("build")
    m = make_llama_gguf(d / "in.gguf", n_layer=N_LAYER, n_embd=N_EMBD, n_ff=N_FF, seed=11)
    make_imatrix(d / "imatrix.gguf", m, seed=12)
    args = ["build", "-i", m.path, "-o", str(d / "out.gguf"), "--K", str(K), "--base", "--row-scale",
            "--imatrix", str(d / "imatrix.gguf"), "--eval-cols", "100000", "--eval-x", "4",
            "--strip-dense", "--layers", "0-1", "--report-json", str(d / "report.json"), "-t", "1", "-q"]
    assert main(args) == 0
    report = json.loads((d / "report.json").read_text())
    return d, m, report


def _input_weight(path, name: str) -> np.ndarray:
    t = next(t for t in GGUFReader(path).tensors if t.name == name)
    assert t.tensor_type == Q.F16
    return np.asarray(t.data, dtype=np.float64)


def _imatrix_scale_from_file(path, name: str) -> np.ndarray:
    """Spec §5.2 from the raw file: s = sqrt(max(sum/count, 1e-8)), normalised to mean 1."""
    r = GGUFReader(path)
    sums = next(t for t in r.tensors if t.name == name + ".in_sum2").data.astype(np.float64)
    count = float(next(t for t in r.tensors if t.name == name + ".counts").data[0])
    s = np.sqrt(np.maximum(sums / count, 1e-8))
    return s / s.mean()


def test_stored_arrays_imply_the_dense_matrix_of_the_codec_and_the_report(built):
    d, m, report = built
    sd = read_seeddelta_file(d / "out.gguf")
    raw = {t.name: t for t in GGUFReader(d / "out.gguf").tensors}
    entries = {(e["layer"], e["kind"]): e for e in report["weights"]}
    assert list(sd.weights) == list(entries) == [(la, k) for la in range(N_LAYER) for k in KINDS]
    for (layer, kind), sdw in sd.weights.items():
        n_in, n_out = (N_FF, N_EMBD) if kind == "ffn_down" else (N_EMBD, N_FF)
        assert (sdw.n_in, sdw.n_out) == (n_in, n_out)
        # the codec object holds exactly the bytes of the file
        for suffix, arr in sdw.tensors().items():
            t = raw[f"blk.{layer}.{kind}.{suffix}"]
            assert arr.dtype == t.data.dtype and arr.tobytes() == t.data.tobytes(), suffix
        arrays = {s: np.asarray(raw[f"blk.{layer}.{kind}.{s}"].data) for s in sdw.tensors()}
        chain = reference_dense(arrays, n_in, n_out)
        closed = reference_dense(arrays, n_in, n_out, closed_form=True)
        # both references and the codec sum the same f16-exact values in float64; only the
        # summation order differs (L <= 64 terms of magnitude <= max|W0|): F64_REORDER of the scale
        scale = np.abs(chain).max()
        np.testing.assert_allclose(closed, chain, rtol=0, atol=F64_REORDER * scale)
        np.testing.assert_allclose(sdw.dense(), chain, rtol=0, atol=F64_REORDER * scale)
        # the report's weight-space metrics are those of the stored reconstruction, on every row
        W = _input_weight(m.path, f"blk.{layer}.{kind}.weight")
        e = entries[(layer, kind)]
        s = _imatrix_scale_from_file(d / "imatrix.gguf", f"blk.{layer}.{kind}.weight")
        for name, value in _row_metrics(W, chain).items():
            assert e[name] == pytest.approx(value, abs=1e-9), name  # float64 re-summation only
        for name, value in _row_metrics(W * s, chain * s).items():
            # s is stored as float32 by the builder (relative rounding 6e-8): 1e-6 absolute
            assert e[name + "_w"] == pytest.approx(value, abs=1e-6), name
        assert e["has_w"] is True and e["has_x"] is True
        for name in ("rel_l2_mean_x", "cos_mean_x", "cos_mean_x_w", "cos_p05_x_w"):
            assert math.isfinite(e[name]) and e[name] != 0.0
        assert e["decision"] == "no_gating" and e["emit"] and e["strip_dense"]


def test_report_fields_order_and_accounting(built):
    d, m, report = built
    text = (d / "report.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert list(report)[:18] == [
        "input", "output", "base", "policy_file", "policy_hash", "base_kind", "base_max_samples",
        "base_perm_trials", "imatrix_file", "imatrix_eps", "imatrix_power", "imatrix_datasets", "resid",
        "eval_cols", "eval_x", "stack_pass_gate_up", "stack_pass_down", "weights",
    ]
    assert report["resid"] == {"scheme": "coo", "K": K, "K_gate": K, "K_up": K, "K_down": K,
                               "idx_type": "i16", "val_type": "f16", "row_scale": True}
    assert report["imatrix_datasets"] == ["synthetic.txt"]
    assert (report["stack_pass_gate_up"], report["stack_pass_down"]) == (2 * N_LAYER, N_LAYER)
    assert list(report)[-1] == "timing"  # wall-clock only under its own key
    out = GGUFReader(d / "out.gguf")
    inp = GGUFReader(m.path)
    out_names = {t.name for t in out.tensors}
    added = sum(int(t.n_bytes) for t in out.tensors if t.name.rsplit(".", 1)[1] != "weight"
                and t.name.startswith("blk.") and t.name.split(".")[2].startswith("ffn_")
                and t.name not in {u.name for u in inp.tensors})
    stripped = sum(int(t.n_bytes) for t in inp.tensors if t.name not in out_names)
    assert report["bytes_added"] == added and report["bytes_stripped"] == stripped > 0
    assert report["input_bytes"] == os.path.getsize(m.path)
    assert report["output_bytes"] == os.path.getsize(d / "out.gguf")
    for e in report["weights"]:
        assert list(e)[: len(WEIGHT_FIELD_NAMES)] == list(WEIGHT_FIELD_NAMES)
        t = [u for u in out.tensors if u.name.startswith(f"blk.{e['layer']}.{e['kind']}.")]
        assert e["bytes_seeddelta"] == sum(int(u.n_bytes) for u in t)
        assert e["bytes_dense"] == 2 * e["n_in"] * e["n_out"]  # F16 input
        assert e["bits_per_weight"] == pytest.approx(8 * e["bytes_seeddelta"] / (e["n_in"] * e["n_out"]), rel=F64_REORDER)
        assert e["K_budget"] == e["K"] == K and e["tile_rows"] == e["n_out"] and e["k_per_tile"] == [K]


def _kv_size(key: str, vtype: GGUFValueType) -> int:
    return 8 + len(key.encode()) + 4 + {GGUFValueType.BOOL: 1, GGUFValueType.UINT32: 4}[vtype]


def _ti_size(name: str, n_dims: int) -> int:
    return 8 + len(name.encode()) + 4 + 8 * n_dims + 4 + 8


def test_size_difference_is_added_minus_stripped_up_to_metadata_and_padding(built):
    d, m, report = built
    inp, out = GGUFReader(m.path), GGUFReader(d / "out.gguf")
    align = out.alignment
    in_names = {t.name for t in inp.tensors}
    out_names = {t.name for t in out.tensors}
    new_keys = [k for k in out.fields if k not in inp.fields]
    meta = sum(_kv_size(k, out.fields[k].types[0]) for k in new_keys)
    meta += sum(_ti_size(t.name, len(t.shape)) for t in out.tensors if t.name not in in_names)
    meta -= sum(_ti_size(t.name, len(t.shape)) for t in inp.tensors if t.name not in out_names)
    n_added = len(out_names - in_names)
    n_stripped = len(in_names - out_names)
    diff = os.path.getsize(d / "out.gguf") - os.path.getsize(m.path)
    core = report["bytes_added"] - report["bytes_stripped"]
    # every tensor's data is padded to the alignment (0..align-1 bytes), and so is the header:
    # the padding of added tensors can only add, that of stripped ones only remove
    assert meta - n_stripped * (align - 1) - (align - 1) <= diff - core <= meta + n_added * (align - 1) + (align - 1)


def _ggml(shape) -> list[int]:
    return [int(x) for x in shape]


def test_schema_names_dtypes_shapes_and_key_types(built):
    d, m, report = built
    out = GGUFReader(d / "out.gguf")
    inp = GGUFReader(m.path)
    tensors = {t.name: t for t in out.tensors}
    names = [t.name for t in out.tensors]
    kept = [t.name for t in inp.tensors if t.name in tensors]
    assert names[: len(kept)] == kept  # input tensors first, in input order
    expected_tail = []
    for layer in range(N_LAYER):
        for kind in KINDS:
            expected_tail += [f"blk.{layer}.{kind}.{s}" for s in
                              ("d_idx", "d_val", "d_row_scale", "base_d1", "base_d2", "base_d3", "base_perm1")]
    assert names[len(kept):] == expected_tail  # §8.1 order
    for layer in range(N_LAYER):
        for kind in KINDS:
            n_in, n_out = (N_FF, N_EMBD) if kind == "ffn_down" else (N_EMBD, N_FF)
            L = _pow2_at_least(min(n_in, n_out))
            B = -(-max(n_in, n_out) // L)
            p = f"blk.{layer}.{kind}."
            assert f"{p}weight" not in tensors  # stripped
            want = {"d_idx": (Q.I16, [K, n_out]), "d_val": (Q.F16, [K, n_out]), "d_row_scale": (Q.F16, [n_out]),
                    "base_d1": (Q.F16, [L, B]), "base_d2": (Q.F16, [L, B]), "base_d3": (Q.F16, [L, B]),
                    "base_perm1": (Q.I16, [L, B])}
            for suffix, (qtype, shape) in want.items():
                t = tensors[p + suffix]
                assert (t.tensor_type, _ggml(t.shape)) == (qtype, shape), p + suffix
            assert np.all(tensors[p + "base_d1"].data == 1) and np.all(tensors[p + "base_d3"].data == 1)
            for b in range(B):
                assert sorted(tensors[p + "base_perm1"].data[b].tolist()) == list(range(L))
            idx = tensors[p + "d_idx"].data
            assert idx.min() >= 0 and idx.max() < n_in
            assert all(len(set(row.tolist())) == K for row in idx)  # K distinct inputs per row
    B_, U32 = GGUFValueType.BOOL, GGUFValueType.UINT32
    global_keys = {
        "seeddelta.enabled": (B_, True), "seeddelta.version": (U32, 1), "seeddelta.scheme": (U32, 0),
        "seeddelta.row_scale": (B_, True), "seeddelta.resid.K": (U32, K), "seeddelta.strip_dense": (B_, True),
        "seeddelta.resid.K_variable": (B_, False), "seeddelta.base.enabled": (B_, True),
        "seeddelta.base.kind": (U32, 1), "seeddelta.base.depth": (U32, 2), "seeddelta.base.R": (U32, 1),
        "seeddelta.base.max_samples": (U32, 2048), "seeddelta.base.perm_trials": (U32, 1),
    }
    seen = {k for k in out.fields if k.startswith("seeddelta.") and not k.startswith("seeddelta.blk.")}
    assert seen == set(global_keys)  # block / K_gate... only when they apply
    for key, (vtype, value) in global_keys.items():
        assert out.fields[key].types == [vtype], key
        assert out.fields[key].contents() == value, key
    for layer in range(N_LAYER):
        for kind in KINDS:
            p = f"seeddelta.blk.{layer}.{kind}."
            for suffix, vtype, value in (("enabled", B_, True), ("gating_pass", B_, True),
                                         ("strip_dense", B_, True), ("K", U32, K)):
                assert out.fields[p + suffix].types == [vtype] and out.fields[p + suffix].contents() == value


def test_block_scheme_with_a_partial_last_block(tmp_path):
    m = make_llama_gguf(tmp_path / "in.gguf", n_layer=1, n_embd=N_EMBD, n_ff=N_FF, seed=5)
    block, k_req = 24, 30  # 64 = 2·24 + 16 and 160 = 6·24 + 16: the last block is partial
    assert main(["build", "-i", m.path, "-o", str(tmp_path / "o.gguf"), "--scheme", "block", "--block",
                 str(block), "--K", str(k_req), "--eval-cols", "1000", "--report-json", str(tmp_path / "r.json"),
                 "-q", "-t", "1"]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    out = GGUFReader(tmp_path / "o.gguf")
    tensors = {t.name: t for t in out.tensors}
    nb = -(-k_req // block)
    assert report["resid"]["block"] == block
    assert out.fields["seeddelta.resid.block"].types == [GGUFValueType.UINT32]
    assert out.fields["seeddelta.scheme"].contents() == 1
    sd = read_seeddelta_file(tmp_path / "o.gguf")
    for e in report["weights"]:
        p = f"blk.0.{e['kind']}."
        assert _ggml(tensors[p + "b_idx"].shape) == [nb, e["n_out"]]
        assert _ggml(tensors[p + "b_val"].shape) == [block, nb, e["n_out"]]
        assert e["K"] == nb * block and e["n_blocks"] == nb
        arrays = {"b_idx": tensors[p + "b_idx"].data, "b_val": tensors[p + "b_val"].data}
        ref = reference_dense(arrays, e["n_in"], e["n_out"])
        np.testing.assert_array_equal(sd.weights[(0, e["kind"])].dense(), ref)  # no base: exact scatter
        W = _input_weight(m.path, p + "weight")
        # the kept entries equal the weight up to f16 storage of already-f16 values: exactly
        kept = ref != 0
        np.testing.assert_array_equal(ref[kept], W[kept])
        # positions past n_in in the last partial block are stored as zeros
        idx = np.asarray(arrays["b_idx"]).astype(int)
        last = (e["n_in"] - 1) // block
        pad = np.asarray(arrays["b_val"])[idx == last][:, e["n_in"] - last * block:]
        assert pad.size == 0 or np.all(pad == 0)
        # the same float64 quantity summed in another order: re-summation error only
        assert e["rel_l2_mean"] == pytest.approx(_row_metrics(W, ref)["rel_l2_mean"], abs=1e-9)


def test_in_memory_arrays_survive_write_and_read_exactly(tmp_path):
    import io

    from seeddelta.builder.encode import run_trial
    from seeddelta.builder.options import BuildOptions, baseline_resolver
    from seeddelta.builder.pipeline import run_build
    from seeddelta.gguf_format.reader import GGUFModel
    from seeddelta.gguf_format.schema import seeddelta_tensor_name

    m = make_llama_gguf(tmp_path / "in.gguf", n_layer=1, n_embd=N_EMBD, n_ff=N_FF, seed=8)
    opts = BuildOptions(input=m.path, output=str(tmp_path / "o.gguf"), K=9, base=True, row_scale=True,
                        val_type="f32", idx_type="i32", threads=1, progress=False)
    result = run_build(opts, log=io.StringIO())
    raw = {t.name: t for t in GGUFReader(tmp_path / "o.gguf").tensors}
    # the build parks its tensors on disk once decided; the codec gives the same arrays again
    # (deterministic), which are what must come back from the file
    model, resolve = GGUFModel(m.path), baseline_resolver(opts)
    n = 0
    for res in result.results:
        trial = run_trial(model, opts, res.layer, res.kind, resolve(res.layer, res.kind), 9, None)
        for suffix, arr in trial.sdw.tensors().items():
            name = seeddelta_tensor_name(res.layer, res.kind, suffix)
            t = raw[name]
            assert t.data.dtype == arr.dtype and t.data.shape == arr.shape, name
            assert t.data.tobytes() == np.ascontiguousarray(arr).tobytes(), name
            n += 1
    assert n == 3 * 7  # d_idx, d_val, d_row_scale, 4 base tensors for each of 3 weights
    assert raw["blk.0.ffn_up.d_idx"].tensor_type == Q.I32 and raw["blk.0.ffn_up.d_val"].tensor_type == Q.F32
    assert raw["blk.0.ffn_up.d_row_scale"].tensor_type == Q.F16  # row scale stays F16 (§8.2)
