"""`seeddelta materialize`: a SeedΔ file rewritten dense for stock llama.cpp, checked against the torch
runtime's own materialized mode (same bits, so the same logits bit for bit) and against the input
(every other tensor and key byte-identical), plus the missing-extra line of `--engine llama.cpp`."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from seeddelta.assets import TINY_MODEL
from seeddelta.cli import main
from seeddelta.gguf_format.reader import GGUFModel, field_raw_value
from seeddelta.runtime.model import load_model
from seeddelta.testing import synthetic_gguf as synthetic

TOKENS = [1, 72, 101, 108, 108, 111, 10, 32, 200, 5, 77, 13]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("mat")
    out = {}
    for dtype in ("F16", "F32", "Q8_0"):
        src = d / f"{dtype}.gguf"
        synthetic.make_llama_gguf(src, dtype=dtype, std=0.25, seed=5, n_layer=2, n_embd=64, n_ff=96, n_head=4,
                                  n_head_kv=2, vocab=259)
        sd = d / f"{dtype}-sd.gguf"
        # layer 1 stripped, layer 0 kept dense next to its SeedΔ tensors: both cases are rewritten
        assert main(["build", "-i", str(src), "-o", str(sd), "--K", "12", "--base", "--row-scale", "--layers", "1",
                     "--strip-dense", "-q"]) == 0
        sd2 = d / f"{dtype}-sd2.gguf"
        assert main(["build", "-i", str(sd), "-o", str(sd2), "--K", "8", "--layers", "0", "--overwrite-existing",
                     "-q"]) == 0
        out[dtype], out[f"{dtype}-sd"] = src, sd2
    return out


@pytest.mark.parametrize("dtype", ["F16", "F32", "Q8_0"])
def test_materialized_file_holds_the_runtimes_weights_and_gives_its_logits(built, tmp_path, dtype: str) -> None:
    sd = built[f"{dtype}-sd"]
    before = sha(sd)
    dense = tmp_path / "dense.gguf"
    assert main(["materialize", str(sd), "-o", str(dense)]) == 0
    assert sha(sd) == before  # the input is never modified
    runtime = load_model(sd)  # materialized mode: Ŵ as the runtime holds it
    assert runtime.n_seeddelta == 6
    m = GGUFModel(dense)
    assert not m.seeddelta_tensor_names() and not [k for k in m.kv_keys() if k.startswith("seeddelta.")]
    want = torch.float32 if dtype == "F32" else torch.float16  # F32 model: F32 Ŵ, otherwise F16
    for layer in (0, 1):
        for kind in ("ffn_gate", "ffn_up", "ffn_down"):
            w = runtime.layers[layer].ffn[kind].weight
            assert w.dtype == want
            stored = np.asarray(m.tensors[f"blk.{layer}.{kind}.weight"].data)
            assert stored.dtype == w.numpy().dtype and np.array_equal(stored.view(np.uint8),
                                                                       w.numpy().view(np.uint8))
    # same weights, same arithmetic: the torch runtime on the dense file gives the same logits, bit for bit
    assert torch.equal(load_model(dense).forward(TOKENS), runtime.forward(TOKENS))
    # and the SeedΔ projections are really in there: the original dense model differs
    assert not torch.equal(load_model(built[dtype]).forward(TOKENS), runtime.forward(TOKENS))


def test_everything_else_is_copied_as_stored(built, tmp_path) -> None:
    sd = GGUFModel(built["Q8_0-sd"])
    dense_path = tmp_path / "dense.gguf"
    assert main(["materialize", str(built["Q8_0-sd"]), "-o", str(dense_path)]) == 0
    dense = GGUFModel(dense_path)
    ffn = {f"blk.{layer}.{kind}.weight" for layer in (0, 1) for kind in ("ffn_gate", "ffn_up", "ffn_down")}
    kept = [n for n in sd.tensors if n not in ffn and n not in set(sd.seeddelta_tensor_names())]
    assert kept and sorted(kept + sorted(ffn)) == sorted(dense.tensors)
    for name in kept:
        a, b = sd.tensors[name], dense.tensors[name]
        assert a.tensor_type == b.tensor_type and np.array_equal(np.asarray(a.data), np.asarray(b.data))
    for key, fld in sd.reader.fields.items():
        if key.startswith("GGUF.") or key.startswith("seeddelta."):
            continue
        assert field_raw_value(dense.reader.fields[key]) == field_raw_value(fld), key


def test_no_seeddelta_keeps_dense_weights_and_refuses_stripped(built, tmp_path, capsys) -> None:
    out = tmp_path / "o.gguf"
    # layer 1 is stripped: it cannot run dense
    assert main(["materialize", str(built["F16-sd"]), "-o", str(out), "--no-seeddelta"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "blk.1.ffn_gate.weight is stripped" in err[0]
    assert not out.exists()
    # not stripped (layer 0 only has SeedΔ next to its dense weight): the dense weights, SeedΔ dropped
    partial = tmp_path / "p.gguf"
    assert main(["build", "-i", str(built["F16"]), "-o", str(partial), "--K", "8", "--layers", "0", "-q"]) == 0
    assert main(["materialize", str(partial), "-o", str(out), "--no-seeddelta"]) == 0
    assert torch.equal(load_model(out).forward(TOKENS), load_model(built["F16"]).forward(TOKENS))


def test_bad_input_and_output_are_one_line(tmp_path, capsys) -> None:
    assert main(["materialize", str(tmp_path / "missing.gguf"), "-o", str(tmp_path / "x.gguf")]) == 2
    assert main(["materialize", str(TINY_MODEL), "-o", str(tmp_path / "no" / "dir.gguf")]) == 2
    assert main(["materialize", str(TINY_MODEL), "-o", str(TINY_MODEL)]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 3 and all(ln.startswith("seeddelta materialize: error:") for ln in err), err
    assert not (tmp_path / "x.gguf").exists()


def test_engine_without_the_extra_is_one_line_naming_the_install(monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp now raises ImportError
    assert main(["ppl", "--engine", "llama.cpp", "--chunks", "2", "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "llama-cpp-python" in err[0] and "pip install" in err[0] and "interop" in err[0], err
