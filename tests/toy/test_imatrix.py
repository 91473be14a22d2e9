"""imatrix: llama-imatrix's GGUF layout, reader/writer round trip, legacy format, per-input scale."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from gguf import GGUFReader, GGUFValueType
from gguf.constants import GGMLQuantizationType

from seeddelta.errors import SeedDeltaError
from seeddelta.gguf_format.imatrix_file import imatrix_scale, read_imatrix, write_imatrix
from seeddelta.testing.synthetic_gguf import make_llama_gguf


def _example():
    sums = {
        "blk.1.ffn_down.weight": np.array([4.0, 8.0, 0.5, 1e-3, 7.0, 3.0], dtype=np.float32),
        "blk.0.ffn_gate.weight": np.array([2.0, 6.0, 10.0, 0.25], dtype=np.float32),
    }
    counts = {"blk.1.ffn_down.weight": 4, "blk.0.ffn_gate.weight": 2}
    return sums, counts


def test_written_file_has_llama_imatrix_layout(tmp_path):
    sums, counts = _example()
    write_imatrix(tmp_path / "i.gguf", sums, counts, ["wiki.txt", "code.txt"], chunk_count=7, chunk_size=512)
    r = GGUFReader(tmp_path / "i.gguf")
    fields = {k: f for k, f in r.fields.items() if not k.startswith("GGUF.")}
    # llama-imatrix (tools/imatrix/imatrix.cpp save_imatrix) writes exactly these four keys
    assert list(fields) == ["general.type", "imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size"]
    assert fields["general.type"].types == [GGUFValueType.STRING]
    assert fields["general.type"].contents() == "imatrix"
    assert fields["imatrix.datasets"].types == [GGUFValueType.ARRAY, GGUFValueType.STRING]
    assert fields["imatrix.datasets"].contents() == ["wiki.txt", "code.txt"]
    assert fields["imatrix.chunk_count"].types == [GGUFValueType.UINT32]
    assert fields["imatrix.chunk_size"].types == [GGUFValueType.UINT32]
    assert (fields["imatrix.chunk_count"].contents(), fields["imatrix.chunk_size"].contents()) == (7, 512)
    # sorted weight names, in_sum2 then counts; F32; ggml_n_dims drops the trailing 1 of ne [n, 1]
    assert [t.name for t in r.tensors] == [
        "blk.0.ffn_gate.weight.in_sum2", "blk.0.ffn_gate.weight.counts",
        "blk.1.ffn_down.weight.in_sum2", "blk.1.ffn_down.weight.counts",
    ]
    shapes = {t.name: [int(d) for d in t.shape] for t in r.tensors}
    assert shapes["blk.1.ffn_down.weight.in_sum2"] == [6]
    assert shapes["blk.1.ffn_down.weight.counts"] == [1]
    assert all(t.tensor_type == GGMLQuantizationType.F32 for t in r.tensors)
    np.testing.assert_array_equal(next(t for t in r.tensors if t.name.endswith("down.weight.counts")).data, [4.0])


def test_round_trip_gives_mean_of_squares(tmp_path):
    sums, counts = _example()
    write_imatrix(tmp_path / "i.gguf", sums, counts, [], chunk_count=0, chunk_size=0)
    im = read_imatrix(tmp_path / "i.gguf")
    assert set(im.values) == set(sums)
    for name, s in sums.items():
        np.testing.assert_array_equal(im.values[name], s / np.float32(counts[name]))  # exact float32 division
    assert im.datasets == [] and im.chunk_count == 0 and not im.legacy


@pytest.mark.parametrize("sums,count,needle", [
    ([3.0, 5.0], 0, r"w\.counts is 0; a count must be a positive number"),
    ([3.0, float("nan")], 4, r"w\.in_sum2 holds 1 NaN/Inf value\(s\) \(first at input 1\)"),
    ([-1.0, 5.0], 4, r"w\.in_sum2 holds 1 negative value\(s\) \(first at input 0: -1\)"),
])
def test_damaged_statistics_are_errors_not_silent_replacements(tmp_path, sums, count, needle):
    write_imatrix(tmp_path / "i.gguf", {"w": np.array(sums, np.float32)}, {"w": count}, ["d"], 1, 1)
    with pytest.raises(SeedDeltaError, match=needle):
        read_imatrix(tmp_path / "i.gguf")


def test_smallest_valid_statistics_are_read(tmp_path):
    # the other side of the boundary: count 1 and a zero sum (a dead input channel) are valid
    write_imatrix(tmp_path / "i.gguf", {"w": np.array([0.0, 5.0], np.float32)}, {"w": 1}, ["d"], 1, 1)
    np.testing.assert_array_equal(read_imatrix(tmp_path / "i.gguf").values["w"], [0.0, 5.0])


def test_legacy_binary_format(tmp_path):
    name = b"blk.0.ffn_up.weight"
    vals = np.array([1.5, 2.5, 0.0], dtype="<f4")
    blob = struct.pack("<i", 1) + struct.pack("<i", len(name)) + name + struct.pack("<ii", 10, 3) + vals.tobytes()
    blob += struct.pack("<i", 10) + struct.pack("<i", 8) + b"data.txt"
    (tmp_path / "i.dat").write_bytes(blob)
    im = read_imatrix(tmp_path / "i.dat")
    assert im.legacy and im.datasets == ["data.txt"] and im.chunk_count == 10
    np.testing.assert_array_equal(im.values["blk.0.ffn_up.weight"], vals)  # used as stored (spec §5.1)


def test_scale_formula_by_hand():
    v = np.array([4.0, 1.0, 0.0, np.nan, np.inf, 9.0])
    # power 1: s = sqrt(max(v, eps)) -> [2, 1, 1e-4, (NaN->1), (inf->1), 3]; then divided by the mean
    raw = np.array([2.0, 1.0, 1e-4, 1.0, 1.0, 3.0])
    np.testing.assert_allclose(imatrix_scale(v, eps=1e-8, power=1.0), raw / raw.mean(), rtol=1e-6)  # float32 result
    # power 2: s = max(v, eps) ; eps floors the zero
    raw2 = np.array([4.0, 1.0, 0.5, 1.0, 1.0, 9.0])
    np.testing.assert_allclose(imatrix_scale(v, eps=0.5, power=2.0), raw2 / raw2.mean(), rtol=1e-6)
    # power 0 (and negative, clamped to 0): every s = 1
    np.testing.assert_array_equal(imatrix_scale(v, power=-3.0), np.ones(6, dtype=np.float32))
    s = imatrix_scale(np.array([0.3, 2.0, 7.0]))
    assert s.dtype == np.float32 and abs(float(s.mean()) - 1.0) < 1e-6


def test_mismatch_with_the_model_names_the_weight(tmp_path):
    write_imatrix(tmp_path / "i.gguf", {"blk.0.ffn_up.weight": np.ones(64, np.float32)},
                  {"blk.0.ffn_up.weight": 1}, ["d"], 1, 1)
    im = read_imatrix(tmp_path / "i.gguf")
    with pytest.raises(SeedDeltaError, match=r"no entry for blk\.0\.ffn_down\.weight"):
        im.entry("blk.0.ffn_down.weight", 96)
    with pytest.raises(SeedDeltaError, match=r"blk\.0\.ffn_up\.weight has 64 values but the weight has 65 inputs"):
        im.entry("blk.0.ffn_up.weight", 65)


def test_a_model_is_not_an_imatrix(tmp_path):
    m = make_llama_gguf(tmp_path / "m.gguf", seed=1)
    with pytest.raises(SeedDeltaError, match="not an imatrix GGUF"):
        read_imatrix(m.path)
    (tmp_path / "junk.dat").write_bytes(b"\x01\x02")
    with pytest.raises(SeedDeltaError, match="neither an imatrix GGUF nor a legacy"):
        read_imatrix(tmp_path / "junk.dat")
    with pytest.raises(SeedDeltaError, match="not found"):
        read_imatrix(tmp_path / "missing.gguf")
