"""A SeedΔ file written by a second, independent path (GGUFWriter and hand-made arrays following
spec §8, as the original builder writes them) is read by `read_seeddelta_*` and `seeddelta inspect`."""

from __future__ import annotations

import json

import numpy as np
import pytest
from gguf import GGUFWriter

from seeddelta.cli import main
from seeddelta.gguf_format.seeddelta_tensors import (
    read_seeddelta_file,
    read_seeddelta_kv,
    read_seeddelta_weights,
)
from seeddelta.testing.oracles import reference_dense
from seeddelta.testing.synthetic_gguf import make_llama_gguf
from seeddelta.testing.tolerances import F64_REORDER

N_EMBD, N_FF = 32, 80  # tall gate/up: L = 32, B = 3; wide down: L = 32, B = 3


def _hand_made_file(path, rng: np.random.Generator) -> dict:
    """Write a llama GGUF with SeedΔ tensors directly; return the arrays written per weight."""
    w = GGUFWriter(str(path), "llama")
    w.add_uint32("llama.block_count", 2)
    w.add_uint32("llama.embedding_length", N_EMBD)
    w.add_uint32("llama.feed_forward_length", N_FF)
    w.add_tensor("token_embd.weight", rng.normal(0, 0.02, (16, N_EMBD)).astype(np.float16))
    dense = {}
    for layer in range(2):
        for kind, shape in (("ffn_gate", (N_FF, N_EMBD)), ("ffn_up", (N_FF, N_EMBD)), ("ffn_down", (N_EMBD, N_FF))):
            dense[(layer, kind)] = rng.normal(0, 0.02, shape).astype(np.float16)
            if (layer, kind) != (0, "ffn_gate"):  # blk.0.ffn_gate is stripped
                w.add_tensor(f"blk.{layer}.{kind}.weight", dense[(layer, kind)])
    L, B = 32, 3

    def base() -> dict:
        return {
            "base_d1": np.ones((B, L), np.float16),
            "base_d2": (rng.normal(0, 1e-3, (B, L))).astype(np.float16),
            "base_d3": np.ones((B, L), np.float16),
            "base_perm1": np.stack([rng.permutation(L) for _ in range(B)]).astype(np.int16),
        }

    gate_idx = np.stack([rng.choice(N_EMBD, 5, replace=False) for _ in range(N_FF)]).astype(np.int16)
    arrays = {
        (0, "ffn_gate"): {"d_idx": gate_idx, "d_val": rng.normal(0, 0.02, (N_FF, 5)).astype(np.float16),
                          "d_row_scale": rng.uniform(0.8, 1.2, N_FF).astype(np.float16), **base()},
        (1, "ffn_up"): {"d_idx": np.stack([rng.choice(N_EMBD, 7, replace=False) for _ in range(N_FF)]).astype(np.int32),
                        "d_val": rng.normal(0, 0.02, (N_FF, 7)).astype(np.float32)},
        (1, "ffn_down"): {"b_idx": np.stack([rng.choice(5, 2, replace=False) for _ in range(N_EMBD)]).astype(np.int32),
                          "b_val": rng.normal(0, 0.02, (N_EMBD, 2, 16)).astype(np.float32), **base()},
    }
    for (layer, kind), arrs in arrays.items():  # §8.1 order per weight, build order across weights
        for suffix in ("d_idx", "d_val", "b_idx", "b_val", "d_row_scale", "base_d1", "base_d2", "base_d3",
                       "base_perm1"):
            if suffix in arrs:
                w.add_tensor(f"blk.{layer}.{kind}.{suffix}", arrs[suffix])
    w.add_bool("seeddelta.enabled", True)
    w.add_uint32("seeddelta.version", 1)
    w.add_uint32("seeddelta.scheme", 0)
    w.add_bool("seeddelta.row_scale", True)
    w.add_uint32("seeddelta.resid.K", 5)
    w.add_bool("seeddelta.strip_dense", True)
    w.add_bool("seeddelta.base.enabled", True)
    for (layer, kind), arrs in arrays.items():
        p = f"seeddelta.blk.{layer}.{kind}"
        w.add_bool(f"{p}.enabled", True)
        w.add_bool(f"{p}.gating_pass", True)
        w.add_bool(f"{p}.strip_dense", (layer, kind) == (0, "ffn_gate"))
        w.add_uint32(f"{p}.K", arrs["d_idx"].shape[1] if "d_idx" in arrs else 32)
    w.add_bool("seeddelta.blk.0.ffn_down.enabled", False)  # a rejected weight: keys, no tensors
    w.add_bool("seeddelta.blk.0.ffn_down.gating_pass", False)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return arrays


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    path = tmp_path_factory.mktemp("orig") / "orig.gguf"
    return path, _hand_made_file(path, np.random.default_rng(99))


def test_reader_decodes_the_original_schema(original):
    path, arrays = original
    weights = read_seeddelta_weights(path)
    assert list(weights) == [(0, "ffn_gate"), (1, "ffn_up"), (1, "ffn_down")]
    for key, arrs in arrays.items():
        sdw = weights[key]
        n_in, n_out = (N_FF, N_EMBD) if key[1] == "ffn_down" else (N_EMBD, N_FF)
        assert (sdw.n_in, sdw.n_out) == (n_in, n_out)  # the stripped gate's dims come from the metadata
        for suffix, arr in sdw.tensors().items():
            assert arr.dtype == arrs[suffix].dtype and np.array_equal(arr, arrs[suffix]), suffix
        ref = reference_dense(arrs, n_in, n_out)
        # same f16/f32-exact values summed in float64 in a different order: F64_REORDER of the scale
        np.testing.assert_allclose(sdw.dense(), ref, rtol=0, atol=F64_REORDER * np.abs(ref).max())
        if "base_d1" in arrs:
            np.testing.assert_allclose(reference_dense(arrs, n_in, n_out, closed_form=True), ref, rtol=0,
                                       atol=F64_REORDER * np.abs(ref).max())
    assert weights[(1, "ffn_down")].scheme == "block" and weights[(1, "ffn_down")].K == 32


def test_keys_of_the_original_file(original):
    path, _ = original
    glob, per = read_seeddelta_kv(path)
    assert glob == {"seeddelta.enabled": True, "seeddelta.version": 1, "seeddelta.scheme": 0,
                    "seeddelta.row_scale": True, "seeddelta.resid.K": 5, "seeddelta.strip_dense": True,
                    "seeddelta.base.enabled": True}
    assert per[(0, "ffn_gate")] == {"enabled": True, "gating_pass": True, "strip_dense": True, "K": 5}
    assert per[(1, "ffn_up")]["K"] == 7
    assert per[(0, "ffn_down")] == {"enabled": False, "gating_pass": False}
    f = read_seeddelta_file(path)
    assert f.tensor_kv[(1, "ffn_down")]["strip_dense"] is False


def test_inspect_json_and_text(original, capsys):
    path, arrays = original
    assert main(["inspect", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    rows = {(w["layer"], w["kind"]): w for w in info["weights"]}
    assert list(rows) == list(arrays)
    g = rows[(0, "ffn_gate")]
    assert (g["scheme"], g["K"], g["base_L"], g["base_B"], g["row_scale"], g["stripped"]) == ("coo", 5, 32, 3, True, True)
    assert g["bytes_seeddelta"] == sum(a.nbytes for a in arrays[(0, "ffn_gate")].values())
    assert g["dtypes"]["d_idx"] == "I16" and g["bytes_dense"] == 0
    dn = rows[(1, "ffn_down")]
    assert (dn["scheme"], dn["block"], dn["n_blocks"], dn["K"], dn["stripped"]) == ("block", 16, 2, 32, False)
    assert dn["bytes_dense"] == 2 * N_EMBD * N_FF and dn["dtypes"]["b_val"] == "F32"
    up = rows[(1, "ffn_up")]
    assert (up["base"], up["base_L"], up["row_scale"], up["K"]) == (False, 0, False, 7)
    t = info["totals"]
    assert (t["weights"], t["stripped"], t["with_base"], t["with_row_scale"]) == (3, 1, 2, 1)
    assert t["bytes_seeddelta"] == sum(a.nbytes for arrs in arrays.values() for a in arrs.values())
    assert main(["inspect", str(path)]) == 0
    text = capsys.readouterr().out
    assert "stripped" in text and "total: 3 weight(s), 1 stripped" in text


def test_inspect_plain_model_and_missing_file(tmp_path, capsys):
    m = make_llama_gguf(tmp_path / "m.gguf", n_layer=1, seed=1)
    assert main(["inspect", m.path]) == 0
    assert "no SeedΔ tensors" in capsys.readouterr().out
    assert main(["inspect", str(tmp_path / "missing.gguf")]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"seeddelta inspect: error: file not found: {tmp_path / 'missing.gguf'}"


def test_malformed_seeddelta_tensors_are_one_clear_error(tmp_path):
    from seeddelta.errors import SeedDeltaError

    w = GGUFWriter(str(tmp_path / "bad.gguf"), "llama")
    w.add_uint32("llama.block_count", 1)
    w.add_uint32("llama.embedding_length", 8)
    w.add_uint32("llama.feed_forward_length", 12)
    w.add_tensor("blk.0.ffn_up.weight", np.zeros((12, 8), np.float16))
    w.add_tensor("blk.0.ffn_up.d_idx", np.zeros((12, 2), np.int16))
    w.add_tensor("blk.0.ffn_up.d_val", np.zeros((12, 2), np.float16))
    w.add_tensor("blk.0.ffn_up.base_d1", np.ones((2, 6), np.float16))  # L = 6 is not a power of two
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(SeedDeltaError, match=r"SeedΔ tensor blk\.0\.ffn_up\.base_d1: shape \(B=2, L=6\) invalid"):
        read_seeddelta_weights(tmp_path / "bad.gguf")
