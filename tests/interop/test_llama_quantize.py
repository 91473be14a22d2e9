"""Stock llama.cpp's quantizer on the FFN weights only (the equal-bytes comparison's llama.cpp points).

For every file type the comparison uses, on the tiny model: the written file differs from the
original in FFN weights only (every key and every other tensor byte-identical), the FFN weights
have the types llama.cpp chose, and gguf-py's dequantization — which our runtime uses — equals
llama.cpp's own bit for bit (llama.cpp dequantizes the file to F32 itself with
`llama_model_quantize(ftype=ALL_F32)`), IQ4_XS included. The imatrix reaches the quantizer.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import pytest

from seeddelta.assets import TINY_MODEL
from seeddelta.evaluation.activations import collect_imatrix
from seeddelta.evaluation.llamacpp_quant import FTYPES, quantize_ffn
from seeddelta.evaluation.windows import text_windows
from seeddelta.gguf_format.imatrix_file import read_imatrix, write_imatrix
from seeddelta.gguf_format.reader import GGUFModel, field_raw_value
from seeddelta.runtime.model import load_model, load_tokenizer

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python not importable; optional extra: interop")

FFN = [f"blk.{layer}.{kind}.weight" for layer in range(8) for kind in ("ffn_gate", "ffn_up", "ffn_down")]


@pytest.fixture(scope="module")
def imatrix(tmp_path_factory: pytest.TempPathFactory):
    from seeddelta.assets import TINY_VAL_TEXT

    path = tmp_path_factory.mktemp("im") / "imatrix.gguf"
    model = load_model(TINY_MODEL)
    w = text_windows(TINY_VAL_TEXT, 256, 2, load_tokenizer(TINY_MODEL)).windows
    sums, counts = collect_imatrix(model, w)
    write_imatrix(path, sums, counts, ["val"], w.n_chunk, w.n_ctx)
    return read_imatrix(path)


def _llama_f32(src: Path, out: Path) -> GGUFModel:
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype, p.allow_requantize, p.nthread = llama_cpp.LLAMA_FTYPE_ALL_F32, True, 1
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(p)) == 0
    return GGUFModel(out)


@pytest.mark.parametrize("ftype", sorted(FTYPES))
def test_only_ffn_weights_change_and_gguf_py_decodes_them_as_llama_cpp_does(ftype, imatrix, tmp_path):
    out = tmp_path / f"{ftype}.gguf"
    types = quantize_ffn(TINY_MODEL, out, ftype, imatrix=imatrix if ftype == "IQ4_XS" else None, threads=1)
    a, b = GGUFModel(TINY_MODEL), GGUFModel(out)
    assert {k: field_raw_value(f) for k, f in a.reader.fields.items() if not k.startswith("GGUF.")} == \
        {k: field_raw_value(f) for k, f in b.reader.fields.items() if not k.startswith("GGUF.")}
    assert list(a.tensors) == list(b.tensors)
    for name in a.tensors:
        if name not in FFN:
            assert a.tensors[name].tensor_type == b.tensors[name].tensor_type
            assert a.tensors[name].data.tobytes() == b.tensors[name].data.tobytes(), name
    assert set(types) == set(FFN)
    assert {b.tensor_type(n).name for n in FFN} == set(types.values())
    assert all(t != "F16" for t in types.values())  # every FFN weight really was quantized
    theirs = _llama_f32(out, tmp_path / "f32.gguf")
    for name in FFN:
        assert np.array_equal(b.dense(name), theirs.dense(name)), name  # bit-exact dequantization
    logits = load_model(out).forward([1, 5, 9, 3])
    assert bool(logits.isfinite().all())


def test_the_imatrix_reaches_the_quantizer(imatrix, tmp_path):
    with_im, without = tmp_path / "a.gguf", tmp_path / "b.gguf"
    quantize_ffn(TINY_MODEL, with_im, "IQ4_XS", imatrix=imatrix, threads=1)
    quantize_ffn(TINY_MODEL, without, "IQ4_XS", threads=1)
    a, b = GGUFModel(with_im), GGUFModel(without)
    differ = [n for n in FFN if a.tensors[n].data.tobytes() != b.tensors[n].data.tobytes()]
    assert len(differ) == len(FFN)  # importance weighting changes the rounding of every weight
