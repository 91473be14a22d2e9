"""Variant sdq end to end on a synthetic model: `build --variant sdq` writes a versioned extension
that no plain-SeedΔ reader can mistake for SeedΔ; our reader and runtime (both modes) compute what
the oracle says the stored tensors mean; anything unknown or damaged is one line, exit status 2."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGUFValueType

from seeddelta.cli import main
from seeddelta.gguf_format.reader import GGUFModel
from seeddelta.gguf_format.schema import PLAIN_SUFFIXES, parse_seeddelta_name
from seeddelta.gguf_format.seeddelta_tensors import read_seeddelta_file, seeddelta_entries
from seeddelta.gguf_format.writer import KV, RawTensor, write_model_copy
from seeddelta.gguf_format.xtx_file import read_xtx
from seeddelta.runtime.model import load_model
from seeddelta.testing.oracles import reference_sdq_dense
from seeddelta.testing.synthetic_gguf import make_llama_gguf
from seeddelta.testing.tolerances import F16_SUBNORMAL_ABS, U16, U32

N_EMBD, N_FF = 64, 96  # rotation blocks 64 (gate/up) and 32 (down); Q4_0 blocks of 32
F64_EPS = np.finfo(np.float64).eps
F32_EPS = np.finfo(np.float32).eps

VARIANTS = {
    "coo": ["--K", "3"],
    "c8_rs": ["--K", "3", "--coding", "c8", "--row-scale"],
    "rot_q8": ["--K", "2", "--quant-base", "Q8_0", "--rotate"],
    "hold_mx": ["--K", "2", "--quant-base", "MXFP4", "--holdout", "--coding", "c8"],
    "alone": ["--K", "0"],
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("sdq")
    m = make_llama_gguf(d / "dense.gguf", n_layer=2, n_embd=N_EMBD, n_ff=N_FF, n_head=2, n_head_kv=1, vocab=300, seed=4)
    (d / "text.txt").write_text("the quick brown fox jumps over the lazy dog. " * 60)
    assert main(["imatrix", "-m", m.path, "-f", str(d / "text.txt"), "-c", "32", "-o", str(d / "im.gguf"),
                 "--xtx", str(d / "xtx.gguf"), "-q", "-t", "1"]) == 0
    out = {}
    for name, flags in {**VARIANTS,
                        "gptq_full": ["--K", "2", "--quantizer", "gptq", "--refit", "full", "--coding", "c8",
                                      "--xtx", str(d / "xtx.gguf")]}.items():
        out[name] = d / f"{name}.gguf"
        assert main(["build", "-i", m.path, "-o", str(out[name]), "--variant", "sdq", "--strip-dense",
                     "--imatrix", str(d / "im.gguf"), "-q", "-t", "1", *flags]) == 0
    return d, m.path, out


def stored_arrays(model: GGUFModel, layer: int, kind: str) -> dict:
    arrays = {}
    for name, t in model.tensors.items():
        p = parse_seeddelta_name(name)
        if p is not None and p[:2] == (layer, kind):
            data = np.array(t.data)
            arrays[p[2]] = RawTensor(data, t.tensor_type, tuple(t.shape)) if p[2] == "sdq_base" else data
    return arrays


def test_keys_and_names_say_variant_and_never_plain_seeddelta(files):
    _d, _dense, out = files
    for path in out.values():
        m = GGUFModel(path)
        assert m.get("seeddelta.variant") == "sdq" and m.get("seeddelta.ext_version") == 1
        names = [parse_seeddelta_name(n) for n in m.tensors]
        suffixes = {p[2] for p in names if p is not None}
        assert suffixes and all(s.startswith("sdq_") for s in suffixes) and not suffixes & set(PLAIN_SUFFIXES)
        assert all(m.get(f"seeddelta.blk.{layer}.{kind}.variant") == "sdq"
                   for layer in range(2) for kind in ("ffn_gate", "ffn_up", "ffn_down"))
        assert not any(n.endswith((".ffn_gate.weight", ".ffn_up.weight", ".ffn_down.weight")) for n in m.tensors)


@pytest.mark.parametrize("name", [*VARIANTS, "gptq_full"])
def test_reader_runtime_and_oracle_agree(files, name):
    _d, _dense, out = files
    path = out[name]
    model = GGUFModel(path)
    codec = read_seeddelta_file(path).weights
    mat, sparse = load_model(path), load_model(path, mode="sparse")
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((3, N_FF)).astype(np.float32))
    for layer in range(2):
        for kind in ("ffn_gate", "ffn_up", "ffn_down"):
            n_in, n_out = (N_FF, N_EMBD) if kind == "ffn_down" else (N_EMBD, N_FF)
            ref = reference_sdq_dense(stored_arrays(model, layer, kind), n_in, n_out)
            scale = float(np.abs(ref).max()) + 1e-30
            # float64 reconstructions of the same stored values: a few float64 roundings apart
            assert np.max(np.abs(codec[(layer, kind)].dense() - ref)) <= 64 * F64_EPS * scale
            # materialized: float64 rounded once to the dtype the model came in (f16 here: the synthetic
            # model is F16), so each entry is within half an ulp of ref (relative), or half the subnormal
            # spacing near zero
            w = mat.layers[layer].ffn[kind].weight
            u = U16 if w.dtype == torch.float16 else U32
            assert np.all(np.abs(w.numpy().astype(np.float64) - ref) <= u * np.abs(ref) + F16_SUBNORMAL_ABS)
            # sparse: float32 products of n_in terms (+ the rotation's FWHT, log2 b levels)
            xi = x[:, :n_in]
            y = sparse.layers[layer].ffn[kind](xi).numpy()
            bound = (n_in + 8) * F32_EPS * (np.abs(xi.numpy()).astype(np.float64) @ np.abs(ref).T)
            assert np.all(np.abs(y - xi.numpy().astype(np.float64) @ ref.T) <= 2 * bound + 1e-30)
    assert sparse.layers[0].ffn["ffn_gate"].mode == "sparse"


def test_same_inputs_give_the_same_bytes(files, tmp_path):
    d, dense, out = files
    again = tmp_path / "again.gguf"
    assert main(["build", "-i", dense, "-o", str(again), "--variant", "sdq", "--strip-dense", "--imatrix",
                 str(d / "im.gguf"), "-q", "-t", "2", *VARIANTS["c8_rs"]]) == 0
    assert again.read_bytes() == out["c8_rs"].read_bytes()


def test_base_from_another_file_is_copied_byte_for_byte(tmp_path):
    q = make_llama_gguf(tmp_path / "q.gguf", n_layer=1, n_embd=N_EMBD, n_ff=N_FF, n_head=2, n_head_kv=1, vocab=300,
                        seed=4, ffn_dtype="Q5_1")
    out = tmp_path / "from.gguf"
    assert main(["build", "-i", q.path, "-o", str(out), "--variant", "sdq", "--K", "0", "--quant-base-from", q.path,
                 "--strip-dense", "-q"]) == 0
    src, got = GGUFModel(q.path), GGUFModel(out)
    for kind in ("ffn_gate", "ffn_up", "ffn_down"):
        a, b = src.tensors[f"blk.0.{kind}.weight"], got.tensors[f"blk.0.{kind}.sdq_base"]
        assert b.tensor_type == a.tensor_type and np.array_equal(np.array(a.data), np.array(b.data))


def test_inspect_lists_the_variant(files, capsys):
    _d, _dense, out = files
    assert main(["inspect", str(out["c8_rs"]), "--check"]) == 0
    text = capsys.readouterr().out
    assert "variant=sdq" in text and "valid: every SeedΔ weight passes" in text
    assert "dense_rows/1" not in text and "delta_regime/1" not in text  # a variant uses no extension
    assert main(["inspect", str(out["c8_rs"]), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["extensions"] == [] and all(w["extensions"] == {} and w["variant"] == "sdq" for w in info["weights"])
    e = seeddelta_entries(GGUFModel(out["c8_rs"]))[0]
    assert (e.variant, e.coding, e.base_type, e.K, e.row_scale) == ("sdq", "c8", "Q4_0", 3, True)


def test_xtx_file_diagonal_is_the_imatrix(files):
    from seeddelta.gguf_format.imatrix_file import read_imatrix

    d, _dense, _out = files
    x, im = read_xtx(d / "xtx.gguf"), read_imatrix(d / "im.gguf")
    for layer in range(2):
        for kind, n_in in (("ffn_gate", N_EMBD), ("ffn_up", N_EMBD), ("ffn_down", N_FF)):
            name = f"blk.{layer}.{kind}.weight"
            m = x.matrix(name, n_in)
            assert np.allclose(m, m.T, rtol=0, atol=1e-7 * np.abs(m).max())
            # both are float32-stored means of the same float64 sums: agree to float32 rounding
            assert np.allclose(np.diag(m), im.entry(name, n_in), rtol=4 * F32_EPS, atol=0)
    assert "in_xtx" in "".join(x.names[n][0].name for n in x.names)  # type: ignore[attr-defined]


# ------------------------------------------------------------------------------------------ refusals
def _rewrite(src: Path, dst: Path, *, set_keys=(), drop_keys=(), drop=(), add=()):
    write_model_copy(GGUFModel(src), dst, set_keys=list(set_keys), drop_keys=set(drop_keys), drop_tensors=set(drop),
                     add_tensors=list(add))


def _run_ppl(files, path: Path, capsys, mode: str = "materialized") -> list[str]:
    d = files[0]
    before = sorted(os.listdir(d))
    rc = main(["ppl", "-m", str(path), "-f", str(d / "text.txt"), "-c", "32", "--chunks", "1", "-q", "-t", "1",
               *(["--sparse"] if mode == "sparse" else [])])
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("warning: ")]
    assert rc == 2 and len(err) == 1 and "Traceback" not in err[0], (rc, err)
    assert sorted(os.listdir(d)) == before
    return err


@pytest.mark.parametrize("change,needle", [
    (dict(set_keys=[KV("seeddelta.variant", "sdq2", GGUFValueType.STRING)]),
     "uses SeedΔ variant 'sdq2', which this seeddelta does not know"),
    (dict(set_keys=[KV("seeddelta.ext_version", 2, GGUFValueType.UINT32)]),
     "SeedΔ variant sdq extension version 2 is not supported (this seeddelta reads version 1)"),
    (dict(drop_keys=["seeddelta.variant"]), "seeddelta.ext_version is set but seeddelta.variant is not"),
    (dict(drop_keys=["seeddelta.variant", "seeddelta.ext_version"]),
     "belongs to a SeedΔ variant but the file has no seeddelta.variant key"),
    (dict(add=[("blk.0.ffn_gate.sdq_extra", np.zeros(4, np.float16))]),
     "tensor blk.0.ffn_gate.sdq_extra is not defined by SeedΔ variant sdq version 1"),
])
def test_an_unknown_variant_or_version_is_refused_in_one_line(files, tmp_path, capsys, change, needle):
    _d, _dense, out = files
    bad = tmp_path / "bad.gguf"
    _rewrite(out["coo"], bad, **change)
    err = _run_ppl(files, bad, capsys)
    assert needle in err[0] and str(bad) in err[0], err
    assert main(["inspect", str(bad)]) == 2
    assert needle in capsys.readouterr().err


def _damaged(src: Path, dst: Path, name: str, change) -> None:
    m = GGUFModel(src)
    t = m.tensors[name]
    a = np.array(t.data, copy=True)
    change(a)
    arr = RawTensor(a, t.tensor_type, ()) if name.endswith("sdq_base") else a
    write_model_copy(m, dst, drop_tensors={name}, add_tensors=[(name, arr)])


def _set(index, value):
    def change(a: np.ndarray) -> None:
        a[index] = value
    return change


def _nan_scale(a: np.ndarray) -> None:
    a[3, 0:2] = np.array([np.nan], dtype=np.float16).view(np.uint8)  # the first Q4_0 block's f16 d of row 3


DAMAGE = [
    ("coo", "blk.1.ffn_up.sdq_idx", _set((2, 0), N_EMBD), "sdq_idx: 1 index value(s) outside 0 <= i < n_in = 64"),
    ("coo", "blk.0.ffn_down.sdq_val", _set((1, 1), np.inf), "sdq_val: 1 NaN/Inf value(s)"),
    ("coo", "blk.0.ffn_gate.sdq_base", _nan_scale, "sdq_base: 32 NaN/Inf value(s) after dequantization"),
    ("c8_rs", "blk.0.ffn_gate.sdq_ccnt", _set((4, 0), 9), "sdq_ccnt: row 4 counts"),
    ("c8_rs", "blk.0.ffn_down.sdq_coff", _set((0, 2), np.uint8(200).view(np.int8)),  # byte 200
     "sdq_coff: 1 entr(ies) decode to an index >= n_in = 96"),
    ("c8_rs", "blk.1.ffn_up.sdq_cscale", _set(7, np.nan), "sdq_cscale: 1 NaN/Inf value(s)"),
    ("c8_rs", "blk.1.ffn_gate.sdq_scale", _set(0, np.inf), "sdq_scale: 1 NaN/Inf value(s)"),
    ("rot_q8", "blk.0.ffn_up.sdq_rot", _set((0, 3), 0), "sdq_rot: 1 value(s) other than -1/+1"),
]


# every damage in the materialized mode; the sparse mode (same parse_payload) on two of them
MATRIX = [(*t, "materialized") for t in DAMAGE] + [(*t, "sparse") for t in DAMAGE[2:4]]


@pytest.mark.parametrize("src,tensor,change,needle,mode", MATRIX,
                         ids=[f"{t[1].split('.', 2)[2]}-{t[0]}-{t[4]}" for t in MATRIX])
def test_damaged_variant_tensors_are_refused_in_one_line(files, tmp_path, capsys, src, tensor, change, needle, mode):
    _d, _dense, out = files
    bad = tmp_path / "bad.gguf"
    _damaged(out[src], bad, tensor, change)
    err = _run_ppl(files, bad, capsys, mode)
    assert f"SeedΔ tensor {tensor.rsplit('.', 1)[0]}." in err[0] and needle in err[0], err
    assert main(["inspect", str(bad), "--check"]) == 1
    capsys.readouterr()


def test_plain_and_variant_tensors_for_one_weight_are_refused(files, tmp_path, capsys):
    _d, _dense, out = files
    bad = tmp_path / "mixed.gguf"
    _rewrite(out["coo"], bad, add=[("blk.0.ffn_gate.d_row_scale", np.ones(N_FF, np.float16))])
    err = _run_ppl(files, bad, capsys)
    assert "plain SeedΔ tensor next to variant sdq tensors" in err[0], err


def test_valid_variant_files_run_in_both_modes(files, capsys):
    d, _dense, out = files
    # the other side of the refusals' boundary (the reader/runtime test covers every variant file)
    for name, mode in (("rot_q8", ["--sparse"]),):
        assert main(["ppl", "-m", str(out[name]), "-f", str(d / "text.txt"), "-c", "32", "--chunks", "1", "-q",
                     "-t", "1", *mode]) == 0
    capsys.readouterr()


@pytest.mark.parametrize("flags,needle", [
    (["--variant", "sdq", "--scheme", "block"], "--scheme block does not apply"),
    (["--variant", "sdq", "--base"], "--base (XOR-circulant) does not apply"),
    (["--variant", "sdq", "--refit", "full"], "--refit full needs the calibration activations' XᵀX"),
    (["--variant", "sdq", "--quantizer", "gptq"], "--quantizer gptq needs the calibration activations' XᵀX"),
    (["--variant", "sdq", "--quant-base", "Q3_K"], "quantized base type 'Q3_K' cannot be encoded"),
    (["--variant", "sdq", "--quant-base", "Q5_0", "--quantizer", "gptq", "--xtx", "X"],
     "quantizer gptq supports base types"),
    (["--variant", "sdq", "--K", "-1"], "--K must be a positive integer or 0"),
    (["--K", "0"], "--K must be a positive integer, got 0"),
])
def test_bad_variant_flags_are_one_line_before_any_work(files, tmp_path, capsys, flags, needle):
    d, dense, _out = files
    if "--xtx" in flags:
        flags = [str(d / "xtx.gguf") if f == "X" else f for f in flags]
    out = tmp_path / "o.gguf"
    rc = main(["build", "-i", dense, "-o", str(out), "-q", *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and needle in err[0], err
    assert not out.exists()


def test_a_base_type_the_rows_do_not_fit_is_refused_before_any_work(tmp_path, capsys):
    m = make_llama_gguf(tmp_path / "m.gguf", n_layer=1, n_embd=48, n_ff=64, n_head=2, n_head_kv=1, vocab=300)
    out = tmp_path / "o.gguf"
    rc = main(["build", "-i", m.path, "-o", str(out), "--variant", "sdq", "--K", "1", "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "blk.0.ffn_gate.weight" in err[0] and "n_in = 48" in err[0], err
    assert not out.exists()


@pytest.mark.parametrize("name", ["c8_rs", "rot_q8", "alone"])
def test_materialize_writes_the_runtimes_variant_weights_dense(files, tmp_path, name):
    """`seeddelta materialize` of a variant file: every FFN weight dense with exactly the values the
    materialized runtime holds (so stock llama.cpp computes what we compute), no sdq_* tensor, no
    seeddelta.* key."""
    _d, _dense, out = files
    dense = tmp_path / "dense.gguf"
    assert main(["materialize", str(out[name]), "-o", str(dense)]) == 0
    g = GGUFModel(dense)
    assert not any(parse_seeddelta_name(n) for n in g.tensors)
    assert not any(k.startswith("seeddelta.") for k in g.reader.fields)
    mat = load_model(out[name])
    for layer in range(2):
        for kind in ("ffn_gate", "ffn_up", "ffn_down"):
            held = mat.layers[layer].ffn[kind].weight.numpy()
            written = np.array(g.tensors[f"blk.{layer}.{kind}.weight"].data)
            assert written.dtype == held.dtype and np.array_equal(written, held)


def test_quantized_bases_go_through_the_spill_file_like_every_other_tensor(tmp_path, monkeypatch):
    """Memory is bounded by the weights being encoded: a decided sdq weight's tensors — its quantized
    base (a RawTensor) included — are parked in the spill file at once, and the GGUF written from the
    spill file is the one written from the arrays kept in memory, byte for byte."""
    import hashlib

    from seeddelta.builder import pipeline
    from seeddelta.builder.spill import SpillFile
    from seeddelta.gguf_format.writer import LazyTensor, RawTensor

    m = make_llama_gguf(tmp_path / "dense.gguf", n_layer=2, n_embd=N_EMBD, n_ff=N_FF, n_head=2, n_head_kv=1,
                        vocab=300, seed=4)
    parked: list[tuple[str, object, LazyTensor, np.ndarray]] = []

    class Recording(SpillFile):
        def park(self, name, array):
            lazy = super().park(name, array)
            parked.append((name, array, lazy, lazy.produce()))  # read back while the file is open
            return lazy

    class InMemory(SpillFile):  # the path without a spill file: tensors stay as encoded
        def park(self, name, array):
            return (name, array)

    digests = []
    from seeddelta.builder import workers

    # worker threads: the recording (and the in-memory path) live in this process; processes park
    # their own tensors (tests/toy/test_build_workers.py)
    monkeypatch.setattr(workers, "PROCESS_WORKERS", "never")
    for spill in (Recording, InMemory):
        monkeypatch.setattr(pipeline, "SpillFile", spill)
        out = tmp_path / f"{spill.__name__}.gguf"
        assert main(["build", "-i", m.path, "-o", str(out), "--variant", "sdq", "--strip-dense", "--K", "2",
                     "--quant-base", "Q8_0", "-q", "-t", "2"]) == 0
        digests.append(hashlib.sha256(out.read_bytes()).hexdigest())
    raw = [p for p in parked if isinstance(p[1], RawTensor)]
    assert raw, "no quantized base was parked"
    for name, array, lazy, back in raw:
        assert lazy.tensor_type == array.tensor_type
        assert back.tobytes() == np.ascontiguousarray(array.data).tobytes(), name
    assert all(p[2].tensor_type is None for p in parked if not isinstance(p[1], RawTensor))
    assert digests[0] == digests[1]
    GGUFModel(str(tmp_path / "Recording.gguf"))  # a readable model
