"""SeedΔ inside the model runtime: files written with the codec + gguf_io (and the builder CLI).

Tolerance for logits, as in test_runtime.py: the runtime is float32 and every logit ends a chain of
at most n_layer·8 sequential reductions of ≤ n = max(n_embd, n_ff) terms, each with error
≤ n·u·Σ|terms| (u = 2⁻²⁴): |Δlogit| ≤ n_layer·8·n·u·(1 + max|logit|).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGUFValueType

from seeddelta.codec import encode as codec
from seeddelta.errors import SeedDeltaError
from seeddelta.gguf_format.reader import GGUFModel
from seeddelta.gguf_format.seeddelta_tensors import read_seeddelta_weights
from seeddelta.gguf_format.writer import KV, write_model_copy
from seeddelta.runtime.model import load_model
from seeddelta.testing import synthetic_gguf as synthetic

U32 = 2.0 ** -24
SHAPE = dict(n_layer=2, n_embd=64, n_ff=96, n_head=4, n_head_kv=2, vocab=259)
KINDS = ("ffn_gate", "ffn_up", "ffn_down")
TOKENS = [1, 72, 101, 108, 108, 111, 10, 32, 200, 5, 77, 13]


def tol_for(ref: np.ndarray) -> float:
    return SHAPE["n_layer"] * 8 * SHAPE["n_ff"] * U32 * (1.0 + float(np.abs(ref).max()))


def write_seeddelta_copy(src: str, dst: str, cfg: dict, *, strip: bool = False, kinds=KINDS) -> dict:
    """Encode every FFN weight of `src` with the codec and write `dst`; returns (layer, kind) -> weight."""
    m = GGUFModel(src)
    add, drop, weights = [], [], {}
    for layer in range(m.n_layer):
        for kind in kinds:
            sdw = codec.encode(m.ffn_weight(layer, kind), codec.EncodeConfig(**cfg))
            weights[(layer, kind)] = sdw
            add += [(f"blk.{layer}.{kind}.{suf}", arr) for suf, arr in sdw.tensors().items()]
            if strip:
                drop.append(f"blk.{layer}.{kind}.weight")
    keys = [KV("seeddelta.enabled", True, GGUFValueType.BOOL),
            KV("seeddelta.strip_dense", strip, GGUFValueType.BOOL)]
    write_model_copy(m, dst, drop_tensors=drop, add_tensors=add, set_keys=keys)
    return weights


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("sd")
    dense = str(d / "dense.gguf")
    synthetic.make_llama_gguf(dense, dtype="F32", std=0.25, seed=11, **SHAPE)
    out = {"dense": dense}
    out["full"] = str(d / "full.gguf")  # K = n_in, no base, f32 values: Ŵ = W exactly
    write_seeddelta_copy(dense, out["full"], dict(K=10_000, base="none", val_type="f32", idx_type="i32"))
    lossy = dict(K=8, base="xor_circulant", row_scale=True)
    out["lossy"] = str(d / "lossy.gguf")
    write_seeddelta_copy(dense, out["lossy"], lossy)
    out["stripped"] = str(d / "stripped.gguf")
    write_seeddelta_copy(dense, out["stripped"], lossy, strip=True)
    return out


@pytest.mark.parametrize("mode", ["materialized", "sparse"])
def test_full_K_without_base_reproduces_the_dense_model(files: dict[str, str], mode: str) -> None:
    ref = load_model(files["dense"]).forward(TOKENS).numpy()
    m = load_model(files["full"], mode=mode)
    assert m.n_seeddelta == 3 * SHAPE["n_layer"]
    got = m.forward(TOKENS).numpy()
    assert np.max(np.abs(got - ref)) <= tol_for(ref)


def test_modes_agree_with_each_other_and_with_the_codec(files: dict[str, str]) -> None:
    mat = load_model(files["lossy"], mode="materialized")
    sparse = load_model(files["lossy"], mode="sparse")
    y_mat = mat.forward(TOKENS).numpy()
    y_sparse = sparse.forward(TOKENS).numpy()
    tol = tol_for(y_mat)
    assert np.max(np.abs(y_mat - y_sparse)) <= tol
    # the same model with every SeedΔ projection replaced by the codec's own apply()
    weights = read_seeddelta_weights(files["lossy"])
    assert len(weights) == 3 * SHAPE["n_layer"]
    for (layer, kind), sdw in weights.items():
        proj = sparse.layers[layer].ffn[kind]
        sparse.layers[layer].ffn[kind] = _CodecProjection(sdw, proj.kind)
    y_codec = sparse.forward(TOKENS).numpy()
    assert np.max(np.abs(y_codec - y_mat)) <= tol


class _CodecProjection:
    def __init__(self, sdw, kind: str) -> None:
        self.sdw, self.kind = sdw, kind

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.sdw.apply(x.numpy()))

    def nbytes(self) -> int:
        return 0


def test_seeddelta_is_used_and_can_be_switched_off(files: dict[str, str]) -> None:
    dense = load_model(files["dense"]).forward(TOKENS).numpy()
    on = load_model(files["lossy"])
    off = load_model(files["lossy"], use_seeddelta=False)
    assert on.n_seeddelta == 6 and off.n_seeddelta == 0
    y_off = off.forward(TOKENS).numpy()
    assert np.array_equal(y_off, dense)  # identical dense weights, identical arithmetic
    # K = 8 of 64/96 inputs: the SeedΔ model is a different function, far outside the f32 band
    assert np.max(np.abs(on.forward(TOKENS).numpy() - dense)) > 100 * tol_for(dense)


@pytest.mark.parametrize("mode", ["materialized", "sparse"])
def test_stripped_file_runs_through_seeddelta(files: dict[str, str], mode: str) -> None:
    ref = load_model(files["lossy"], mode=mode).forward(TOKENS).numpy()
    m = load_model(files["stripped"], mode=mode)
    assert m.n_seeddelta == 6 and m.metadata["strip_dense"]
    assert np.max(np.abs(m.forward(TOKENS).numpy() - ref)) <= tol_for(ref)


def test_stripped_file_cannot_run_dense(files: dict[str, str]) -> None:
    with pytest.raises(SeedDeltaError, match=r"blk\.0\.ffn_gate\.weight is stripped.*SeedΔ is disabled"):
        load_model(files["stripped"], use_seeddelta=False)


def test_stripped_file_without_seeddelta_tensors_is_a_clear_error(files: dict[str, str], tmp_path) -> None:
    m = GGUFModel(files["dense"])
    dst = str(tmp_path / "broken.gguf")
    write_model_copy(m, dst, drop_tensors=["blk.1.ffn_down.weight"],
                             set_keys=[KV("seeddelta.strip_dense", True, GGUFValueType.BOOL)])
    with pytest.raises(SeedDeltaError, match=r"blk\.1\.ffn_down\.weight is stripped.*no SeedΔ tensors"):
        load_model(dst)


def test_stripped_sparse_model_holds_fewer_weight_bytes(files: dict[str, str]) -> None:
    dense = load_model(files["dense"])
    stripped = load_model(files["stripped"], mode="sparse")
    # measured: the sum of nbytes of every tensor each loaded model holds
    assert stripped.weight_nbytes() < dense.weight_nbytes()
    assert stripped.ffn_nbytes() < dense.ffn_nbytes() / 2  # K = 8 ≪ n_in: 4 B/entry (i16 + f16) vs 4·n_in B/row
    for p in stripped.projections().values():  # no dense (n_out, n_in) copy anywhere in sparse mode
        dense_like = [t for t in vars(p).values() if isinstance(t, torch.Tensor) and t.layout == torch.strided
                      and tuple(t.shape) == (p.n_out, p.n_in)]
        assert not dense_like
    # materialized mode rebuilds dense float32 Ŵ: same FFN bytes as the dense model
    assert load_model(files["stripped"]).ffn_nbytes() == dense.ffn_nbytes()


def test_builder_output_loads_and_runs(files: dict[str, str], tmp_path) -> None:
    from seeddelta.cli import main

    out = str(tmp_path / "built.gguf")
    rc = main(["build", "-i", files["dense"], "-o", out, "--K", "16", "--base", "--row-scale", "--strip-dense",
               "--scheme", "block", "--block", "8", "-q"])
    assert rc == 0
    m = load_model(out, mode="sparse")
    assert m.n_seeddelta == 6
    ref = load_model(out, mode="materialized").forward(TOKENS).numpy()
    assert np.max(np.abs(m.forward(TOKENS).numpy() - ref)) <= tol_for(ref)
