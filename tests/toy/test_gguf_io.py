"""gguf_io: reading llama GGUFs of every supported type, byte-exact copies, bad files, atomic writes."""

from __future__ import annotations

import os

import numpy as np
import pytest
from gguf import GGUFReader, GGUFValueType, GGUFWriter
from gguf.constants import GGMLQuantizationType
from gguf.quants import quantize

from seeddelta.errors import SeedDeltaError
from seeddelta.gguf_format.reader import GGUFModel, open_gguf
from seeddelta.gguf_format.writer import KV, write_model_copy
from seeddelta.outputs import same_file
from seeddelta.testing.synthetic_gguf import decoded, make_llama_gguf


def _write_single(path, W: np.ndarray, dtype: str) -> None:
    """A minimal llama GGUF holding one FFN weight W (n_out, n_in) in `dtype`."""
    writer = GGUFWriter(str(path), "llama")
    writer.add_uint32("llama.block_count", 1)
    writer.add_uint32("llama.embedding_length", W.shape[1])
    writer.add_uint32("llama.feed_forward_length", W.shape[0])
    qtype = GGMLQuantizationType[dtype]
    data = W.astype(np.float32) if dtype == "F32" else W.astype(np.float16) if dtype == "F16" else quantize(W, qtype)
    writer.add_tensor("blk.0.ffn_gate.weight", data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _q_bound(W: np.ndarray, dtype: str, block: int = 32) -> np.ndarray:
    """Per-element error bound of round-to-nearest block quantization, from the block range.

    Q8_0: d = amax/127, |x - q·d| <= d/2, plus f16 rounding of d (rel 2^-11) times |q| <= 127.
    Q4_0: d = -(signed max)/8, q in [-8, 7]: the largest magnitude maps to -8 exactly, but values of
          the other sign near amax clamp at 7, so |x - q·d| <= d (not d/2); plus f16 rounding of d
          times |q| <= 8.
    Q4_1: d = (max-min)/15, |x - (q·d + m)| <= d/2, plus f16 rounding of d (times q <= 15) and of m.
    BF16: relative 2^-8 (round to nearest, 8 significant bits).
    """
    rows, cols = W.shape
    blocks = W.reshape(rows, cols // block, block)
    amax = np.abs(blocks).max(axis=2, keepdims=True)
    rng_ = blocks.max(axis=2, keepdims=True) - blocks.min(axis=2, keepdims=True)
    u = 2.0 ** -11
    if dtype == "Q8_0":
        d = amax / 127
        bound = d / 2 + 127 * d * u
    elif dtype == "Q4_0":
        d = amax / 8
        bound = d + 8 * d * u
    elif dtype == "Q4_1":
        d = rng_ / 15
        bound = d / 2 + 15 * d * u + amax * u
    else:
        raise AssertionError(dtype)
    return np.broadcast_to(bound * 1.0001, blocks.shape).reshape(rows, cols)


@pytest.mark.parametrize("dtype", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1"])
def test_dense_weight_is_float32_n_out_by_n_in_and_within_the_type_error(tmp_path, dtype, seed):
    rng = np.random.default_rng(seed)
    W = rng.normal(0, 0.02, size=(96, 64)).astype(np.float32)  # n_out 96 != n_in 64: orientation visible
    W[5, :] += np.linspace(-0.1, 0.1, 64, dtype=np.float32)  # a distinctive row
    _write_single(tmp_path / "m.gguf", W, dtype)
    got = GGUFModel(tmp_path / "m.gguf").dense("blk.0.ffn_gate.weight")
    assert got.dtype == np.float32 and got.shape == (96, 64)
    if dtype == "F32":
        np.testing.assert_array_equal(got, W)
    elif dtype == "F16":
        np.testing.assert_array_equal(got, W.astype(np.float16).astype(np.float32))
    elif dtype == "BF16":
        assert np.all(np.abs(got - W) <= np.abs(W) * 2.0 ** -8)  # 8 significant bits, round to nearest
    else:
        assert np.all(np.abs(got - W) <= _q_bound(W, dtype))


@pytest.mark.parametrize("dtype,n_embd,n_ff", [("Q4_K", 256, 512), ("Q6_K", 256, 768), ("Q8_0", 64, 96)])
def test_quantized_synthetic_models_decode_to_the_stored_blocks(tmp_path, dtype, n_embd, n_ff):
    m = make_llama_gguf(tmp_path / "m.gguf", dtype=dtype, n_embd=n_embd, n_ff=n_ff, n_layer=1, seed=3)
    model = GGUFModel(m.path)
    assert (model.n_layer, model.n_embd, model.n_ff, model.arch) == (1, n_embd, n_ff, "llama")
    raw = GGUFReader(m.path)
    t = next(t for t in raw.tensors if t.name == "blk.0.ffn_down.weight")
    assert t.tensor_type == GGMLQuantizationType[dtype]
    got = model.dense("blk.0.ffn_down.weight")
    assert got.shape == (n_embd, n_ff)  # down: n_out = n_embd, n_in = n_ff
    np.testing.assert_array_equal(got, decoded(np.asarray(t.data), dtype, n_embd, n_ff))
    assert np.isfinite(got).all() and np.abs(got).max() > 0


def test_copy_is_byte_exact_for_tensors_and_keys_and_keeps_alignment(tmp_path):
    m = make_llama_gguf(tmp_path / "m.gguf", dtype="Q8_0", n_ff=96, alignment=64, seed=1,
                        extra_kv={"test.flag": True, "test.count": -3, "test.ratio": 0.5, "test.text": "ä"})
    model = GGUFModel(m.path)
    extra = np.arange(12, dtype=np.int16).reshape(3, 4)
    write_model_copy(model, tmp_path / "o.gguf", set_keys=[KV("seeddelta.version", 1, GGUFValueType.UINT32)],
                     add_tensors=[("blk.0.ffn_gate.d_idx", extra)], drop_tensors={"blk.1.ffn_up.weight"})
    a, b = GGUFReader(m.path), GGUFReader(tmp_path / "o.gguf")
    assert b.alignment == 64 and b.data_offset % 64 == 0
    keys_a = [k for k in a.fields if not k.startswith("GGUF.")]
    keys_b = [k for k in b.fields if not k.startswith("GGUF.")]
    assert keys_b == keys_a + ["seeddelta.version"]  # input keys first, in order, then ours
    for k in keys_a:
        fa, fb = a.fields[k], b.fields[k]
        assert fa.types == fb.types, k
        assert b"".join(p.tobytes() for p in fa.parts[2:]) == b"".join(p.tobytes() for p in fb.parts[2:]), k
    assert b.fields["seeddelta.version"].types == [GGUFValueType.UINT32]
    names_b = [t.name for t in b.tensors]
    assert names_b == [t.name for t in a.tensors if t.name != "blk.1.ffn_up.weight"] + ["blk.0.ffn_gate.d_idx"]
    by_name = {t.name: t for t in b.tensors}
    for t in a.tensors:
        if t.name == "blk.1.ffn_up.weight":
            continue
        u = by_name[t.name]
        assert u.tensor_type == t.tensor_type and list(u.shape) == list(t.shape), t.name
        assert u.data.tobytes() == t.data.tobytes(), t.name
        assert u.data_offset % 64 == 0
    added = by_name["blk.0.ffn_gate.d_idx"]
    assert list(added.shape) == [4, 3] and added.tensor_type == GGMLQuantizationType.I16  # ggml order reversed
    np.testing.assert_array_equal(added.data, extra)


def _cut(src, dst, n: int) -> None:
    with open(src, "rb") as fh:
        data = fh.read()
    with open(dst, "wb") as fh:
        fh.write(data[:n])


def test_bad_files_give_one_clear_error(tmp_path):
    m = make_llama_gguf(tmp_path / "m.gguf", n_ff=96, seed=2)
    size = os.path.getsize(m.path)
    cases = {
        "missing": (tmp_path / "nope.gguf", "not found"),
        "dir": (tmp_path, "directory"),
    }
    (tmp_path / "text.gguf").write_text("hello, not a model")
    (tmp_path / "empty.gguf").write_bytes(b"")
    cases["text"] = (tmp_path / "text.gguf", "not a GGUF")
    cases["empty"] = (tmp_path / "empty.gguf", "not a GGUF")
    reader = GGUFReader(m.path)
    # cut inside the KV section, inside the tensor-info section, and inside the data section
    for label, n in (("kv", 40), ("info", reader.data_offset - 10), ("data", size - 100)):
        _cut(m.path, tmp_path / f"cut_{label}.gguf", n)
        cases[f"cut_{label}"] = (tmp_path / f"cut_{label}.gguf", "truncated")
    for label, (path, needle) in cases.items():
        with pytest.raises(SeedDeltaError) as info:
            open_gguf(path)
        assert needle in str(info.value), label
        assert "\n" not in str(info.value), label


def test_unsupported_architecture_is_named(tmp_path):
    m = make_llama_gguf(tmp_path / "m.gguf", arch="gpt2", seed=1)
    with pytest.raises(SeedDeltaError, match="unsupported architecture 'gpt2'"):
        GGUFModel(m.path)
    GGUFModel(m.path, require_llama=False)  # inspection still reads it


def test_nan_weight_error_names_the_tensor(tmp_path):
    m = make_llama_gguf(tmp_path / "m.gguf", nan_in=["blk.1.ffn_up.weight"], seed=1)
    model = GGUFModel(m.path)
    model.dense("blk.0.ffn_up.weight")
    with pytest.raises(SeedDeltaError, match=r"blk\.1\.ffn_up\.weight contains 1 NaN/Inf"):
        model.dense("blk.1.ffn_up.weight")


def test_failed_write_leaves_target_and_directory_untouched(tmp_path):
    m = make_llama_gguf(tmp_path / "m.gguf", seed=1)
    model = GGUFModel(m.path)
    target = tmp_path / "out.gguf"
    target.write_bytes(b"previous content")
    before = set(os.listdir(tmp_path))
    with pytest.raises(SeedDeltaError):
        write_model_copy(model, target, add_tensors=[("x", np.zeros(3, dtype=np.float64))])  # F64 not allowed
    assert target.read_bytes() == b"previous content"
    assert set(os.listdir(tmp_path)) == before  # no temporary file left behind


def test_same_file_sees_through_symlinks_and_hard_links(tmp_path):
    m = make_llama_gguf(tmp_path / "m.gguf", seed=1)
    os.symlink(m.path, tmp_path / "link.gguf")
    os.link(m.path, tmp_path / "hard.gguf")
    assert same_file(m.path, tmp_path / "link.gguf")
    assert same_file(m.path, tmp_path / "hard.gguf")
    assert same_file(m.path, str(tmp_path / "." / "m.gguf"))
    assert not same_file(m.path, tmp_path / "other.gguf")
    with pytest.raises(SeedDeltaError, match="is the input"):
        write_model_copy(GGUFModel(m.path), tmp_path / "link.gguf")
