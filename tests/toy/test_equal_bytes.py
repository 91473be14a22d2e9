"""Equal-bytes comparison on synthetic models: pruning keeps exactly its density, bytes are what the
file stores, COO pruning is SeedΔ with no base and no row scale, candidate files differ from the
input in their FFN weights only, the Pareto rule, and a missing llama-cpp-python skips cleanly."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from seeddelta.codec.pruning import keep_count, keep_indices, pruned, scores
from seeddelta.errors import SeedDeltaError
from seeddelta.evaluation import equal_bytes as eb
from seeddelta.evaluation.result_cache import ResultCache
from seeddelta.evaluation.scoring import model_logits
from seeddelta.evaluation.windows import make_windows
from seeddelta.gguf_format.imatrix_file import imatrix_scale, read_imatrix
from seeddelta.gguf_format.reader import GGUFModel, field_raw_value
from seeddelta.gguf_format.seeddelta_tensors import read_seeddelta_weights
from seeddelta.runtime.model import load_model
from seeddelta.testing import synthetic_gguf as synthetic

SHAPE = dict(n_layer=2, n_embd=64, n_ff=96, n_head=4, n_head_kv=2, vocab=64)
KINDS = ("ffn_gate", "ffn_up", "ffn_down")


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("eb")
    m = synthetic.make_llama_gguf(d / "in.gguf", dtype="F16", std=0.25, seed=5, **SHAPE)
    synthetic.make_imatrix(d / "imatrix.gguf", m, seed=5)
    return {"dir": d, "model": d / "in.gguf", "imatrix": d / "imatrix.gguf"}


def _ffn(model: GGUFModel) -> list[str]:
    return [f"blk.{layer}.{kind}.weight" for layer in range(model.n_layer) for kind in KINDS]


def _only_ffn_differs(a: Path, b: Path) -> list[str]:
    """Names of tensors whose bytes or type differ; asserts every key and every other tensor is identical."""
    ma, mb = GGUFModel(a), GGUFModel(b)
    keys_a = {k: field_raw_value(f) for k, f in ma.reader.fields.items() if not k.startswith("GGUF.")}
    keys_b = {k: field_raw_value(f) for k, f in mb.reader.fields.items() if not k.startswith("GGUF.")}
    assert keys_a == keys_b
    assert list(ma.tensors) == list(mb.tensors)  # same tensors in the same order
    changed = []
    for name in ma.tensors:
        ta, tb = ma.tensors[name], mb.tensors[name]
        if ta.tensor_type != tb.tensor_type or bytes(ta.data.tobytes()) != bytes(tb.data.tobytes()):
            changed.append(name)
    assert set(changed) <= set(_ffn(ma)), changed
    return changed


# ---------------------------------------------------------------------------------- pruning
@pytest.mark.parametrize("density,n_in,k", [(0.25, 64, 16), (1.0, 64, 64), (1e-9, 64, 1), (0.5, 3, 2), (1 / 3, 96, 32)])
def test_keep_count_is_round_density_times_width(density, n_in, k):
    assert keep_count(density, n_in) == k


@pytest.mark.parametrize("density", [0.0, -0.1, 1.0000001, float("nan")])
def test_density_outside_zero_one_is_an_error(density):
    with pytest.raises(SeedDeltaError, match="density"):
        keep_count(density, 64)


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
@pytest.mark.parametrize("density", [1 / 16, 1 / 3, 1.0])
def test_pruning_keeps_exactly_the_stated_density(method, density, seed):
    rng = np.random.default_rng(seed)
    W = rng.normal(size=(40, 96)).astype(np.float32)
    x2 = np.exp(rng.normal(size=96))
    kept = keep_indices(W, density, method, x2)
    k = keep_count(density, 96)
    assert kept.shape == (40, k)
    assert all(len(set(row)) == k for row in kept.tolist())  # k distinct inputs per row
    P = pruned(W, kept)
    # random normal weights have no exact zeros, so the nonzeros are exactly the kept entries
    assert (np.count_nonzero(P, axis=1) == k).all()
    assert np.array_equal(np.take_along_axis(P, kept, 1), np.take_along_axis(W, kept, 1))


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_pruning_keeps_the_highest_scores_per_row_by_brute_force(method, seed):
    rng = np.random.default_rng(seed + 1)
    W = rng.normal(size=(12, 30)).astype(np.float32)
    x2 = np.exp(rng.normal(size=30))
    s = np.abs(W.astype(np.float64)) * (imatrix_scale(x2).astype(np.float64) if method == "wanda" else 1.0)
    kept = keep_indices(W, 0.3, method, x2)
    for row in range(12):
        want = sorted(sorted(range(30), key=lambda j: (-s[row, j], j))[:9])  # ties: lowest index
        assert kept[row].tolist() == want


def test_ties_go_to_the_lowest_index():
    W = np.ones((2, 8), dtype=np.float32)
    assert keep_indices(W, 0.25, "magnitude").tolist() == [[0, 1], [0, 1]]


def test_wanda_without_statistics_and_unknown_methods_are_errors():
    W = np.ones((2, 8), dtype=np.float32)
    with pytest.raises(SeedDeltaError, match="imatrix"):
        scores(W, "wanda")
    with pytest.raises(SeedDeltaError, match="unknown pruning method"):
        scores(W, "random")
    with pytest.raises(SeedDeltaError, match="inputs"):
        scores(W, "wanda", np.ones(9))


# ---------------------------------------------------------------------------------- files and bytes
@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_coo_pruning_file_stores_exactly_the_pruning(env, method):
    """COO-stored pruning is SeedΔ with no base and no row scale: the stored entries are exactly the
    pruning's kept set (an independent selection algorithm) with f16 values of W."""
    out = env["dir"] / f"coo-{method}.gguf"
    inputs = eb.Inputs(env["model"], env["imatrix"])
    eb.make_candidate(eb.Candidate("pruning", "p", {"density": "1/4", "method": method, "storage": "coo",
                                                    "imatrix": method == "wanda"}), inputs, out)
    src, stored = GGUFModel(env["model"]), read_seeddelta_weights(out)
    im = read_imatrix(env["imatrix"])
    assert len(stored) == 3 * src.n_layer
    for (layer, kind), sdw in stored.items():
        name = f"blk.{layer}.{kind}.weight"
        W = src.dense(name)
        want = keep_indices(W, 0.25, method, im.entry(name, W.shape[1]) if method == "wanda" else None)
        assert sdw.base is None and sdw.row_scale is None
        assert np.array_equal(np.sort(sdw.idx.astype(np.int64), axis=1), want)
        order = np.argsort(sdw.idx, axis=1)
        vals = np.take_along_axis(sdw.val, order, 1)
        assert np.array_equal(vals, np.take_along_axis(W, want, 1).astype(np.float16))


def test_ffn_storage_counts_what_each_file_stores(env):
    src = GGUFModel(env["model"])
    n_w = sum(int(np.prod(src.weight_dims(layer, kind))) for layer in range(src.n_layer) for kind in KINDS)
    st = eb.ffn_storage(env["model"])
    assert (st.bytes, st.weights, st.types) == (2 * n_w, n_w, {"F16": 6})  # F16: 2 bytes a weight
    assert st.bits_per_weight == 16.0
    out = env["dir"] / "coo-count.gguf"
    eb.make_candidate(eb.Candidate("pruning", "p", {"density": "1/8", "method": "magnitude", "storage": "coo",
                                                    "imatrix": False}), eb.Inputs(env["model"], None), out)
    # i16 index + f16 value per kept entry, K = round(n_in/8) per output row, nothing else
    want = sum(n_out * keep_count(1 / 8, n_in) * 4 for layer in range(2) for kind in KINDS
               for n_in, n_out in [src.weight_dims(layer, kind)])
    st = eb.ffn_storage(out)
    assert (st.bytes, st.types) == (want, {"SeedΔ": 6})


def test_ffn_storage_of_a_quantized_file_is_the_type_size(tmp_path):
    m = synthetic.make_llama_gguf(tmp_path / "q8.gguf", dtype="F16", ffn_dtype="Q8_0", **SHAPE)
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType.Q8_0]
    n_w = sum(n_in * n_out for kind in KINDS for n_in, n_out in [m.dims(kind)]) * m.n_layer
    st = eb.ffn_storage(m.path)
    assert st.bytes == n_w // block * size and st.bits_per_weight == 8.5


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_dense_pruning_changes_only_ffn_tensors_and_keeps_their_type(env, method):
    out = env["dir"] / f"dense-{method}.gguf"
    eb.make_candidate(eb.Candidate("pruning", "p", {"density": "1/4", "method": method, "storage": "dense",
                                                    "imatrix": method == "wanda"}),
                      eb.Inputs(env["model"], env["imatrix"]), out)
    changed = _only_ffn_differs(env["model"], out)
    a, b = GGUFModel(env["model"]), GGUFModel(out)
    assert sorted(changed) == sorted(_ffn(a))
    for name in changed:
        assert b.tensor_type(name) == a.tensor_type(name)
        W, P = a.dense(name), b.dense(name)
        k = keep_count(0.25, W.shape[1])
        assert (np.count_nonzero(P, axis=1) == k).all()
        kept = np.nonzero(P)
        assert np.array_equal(P[kept], W[kept])  # F16 in, F16 out: kept values unchanged


def test_quantized_source_keeps_its_type_when_pruned_densely(tmp_path):
    m = synthetic.make_llama_gguf(tmp_path / "q8.gguf", dtype="F16", ffn_dtype="Q8_0", seed=2, **SHAPE)
    out = tmp_path / "out.gguf"
    eb.write_dense_pruned(Path(m.path), out, Fraction(1, 2), "magnitude", None)
    _only_ffn_differs(Path(m.path), out)
    b = GGUFModel(out)
    assert {b.tensor_type(n).name for n in _ffn(b)} == {"Q8_0"}
    assert eb.ffn_storage(out).bytes == eb.ffn_storage(m.path).bytes  # dense storage saves nothing


def test_a_seeddelta_candidate_changes_only_ffn_weights(env):
    out = env["dir"] / "sd.gguf"
    eb.make_candidate(eb.Candidate("seeddelta", "s", {"density": "1/4", "base": True, "imatrix": True,
                                                      "row_scale": True}), eb.Inputs(env["model"], env["imatrix"]), out)
    a, b = GGUFModel(env["model"]), GGUFModel(out)
    ffn = set(_ffn(a))
    others = [n for n in a.tensors if n not in ffn]
    assert [n for n in b.tensors if n in a.tensors] == others  # every FFN weight stripped, the rest in order
    for name in others:
        assert bytes(a.tensors[name].data.tobytes()) == bytes(b.tensors[name].data.tobytes())


# ---------------------------------------------------------------------------------- evaluation
def test_pareto_marks_points_nothing_beats():
    rows = [{"bits_per_weight": b, "kld_mean": k} for b, k in [(2, 1.0), (4, 0.5), (4, 0.6), (8, 0.5), (1, 2.0), (2, 1.0)]]
    # (4, .6) is beaten by (4, .5); (8, .5) by (4, .5); equal points (2, 1.0) do not beat each other
    assert eb.pareto(rows) == [True, True, False, False, True, True]


def _windows(model_path: Path) -> object:
    rng = np.random.default_rng(0)
    return make_windows(rng.integers(3, 64, size=4 * 64), 64, 3, bos_id=1)


def test_the_original_measures_zero_and_a_missing_quantizer_is_one_line(env, tmp_path, monkeypatch):
    monkeypatch.setattr(eb, "unavailable_reason", lambda: "llama-cpp-python not importable (x); install the interop extra")
    base = load_model(env["model"])
    cands = [eb.Candidate("original", "original"), *eb.llamacpp_candidates(("Q8_0",), ())]
    res = eb.run_equal_bytes(eb.Inputs(env["model"], None), model_logits(base), _windows(env["model"]), cands,
                             tmp_path / "work", ResultCache(tmp_path / "cache", {}, enabled=False))
    assert res.skipped == ["llama.cpp quantization points skipped (1): llama-cpp-python not importable (x); "
                           "install the interop extra"]
    [row] = res.rows
    assert row["kld_mean"] == 0.0 and row["delta_nll"] == 0.0 and row["pareto"]
    assert row["bits_per_weight"] == 16.0


def test_imatrix_candidates_without_an_imatrix_are_skipped_and_counted(env, tmp_path):
    base = load_model(env["model"])
    cands = eb.pruning_candidates((Fraction(1, 2),), ("magnitude", "wanda"), ("coo",))
    res = eb.run_equal_bytes(eb.Inputs(env["model"], None), model_logits(base), _windows(env["model"]), cands,
                             tmp_path / "work", ResultCache(tmp_path / "cache", {}, enabled=False))
    assert res.skipped == ["imatrix points skipped (1): no imatrix (calibration text) given"]
    assert [r["label"] for r in res.rows] == ["magnitude d=1/2 coo"]


def test_dense_and_coo_storage_of_one_pruning_give_the_same_model(env, tmp_path):
    """Both files hold the same f16 values; the evaluator must see the same model through either runtime
    path (dense matmul vs sparse gather): mean KLD equal within float32 summation noise."""
    base = load_model(env["model"])
    cands = eb.pruning_candidates((Fraction(1, 4),), ("magnitude",), ("dense", "coo"))
    res = eb.run_equal_bytes(eb.Inputs(env["model"], None), model_logits(base), _windows(env["model"]), cands,
                             tmp_path / "work", ResultCache(tmp_path / "cache", {}, enabled=False))
    dense, coo = res.rows
    assert dense["bits_per_weight"] == 16.0 and coo["bits_per_weight"] == 8.0
    assert dense["kld_mean"] > 1e-4  # the pruning does change the model
    # float32 logits of a 2-layer model summed in a different order: relative differences ~1e-6
    assert coo["kld_mean"] == pytest.approx(dense["kld_mean"], rel=1e-4)
    assert coo["delta_nll"] == pytest.approx(dense["delta_nll"], rel=1e-4, abs=1e-7)


def test_cached_rows_are_reused_and_settings_changes_miss(env, tmp_path):
    base = load_model(env["model"])
    cache = ResultCache(tmp_path / "cache", {"model": "x"})
    cands = eb.pruning_candidates((Fraction(1, 4),), ("magnitude",), ("coo",))
    w = _windows(env["model"])
    first = eb.run_equal_bytes(eb.Inputs(env["model"], None), model_logits(base), w, cands, tmp_path / "w", cache)
    assert (cache.hits, cache.misses) == (0, 1)
    again = eb.run_equal_bytes(eb.Inputs(env["model"], None), model_logits(base), w, cands, tmp_path / "w", cache)
    assert (cache.hits, again.rows) == (1, first.rows)
    other = ResultCache(tmp_path / "cache", {"model": "y"})
    assert other.get("equal_bytes", {"family": "pruning", **cands[0].settings}) is None


def test_pareto_plot_is_a_png_and_the_same_rows_give_the_same_bytes(tmp_path, monkeypatch):
    from seeddelta.evaluation import plots

    rows = [{"family": f, "label": f, "bits_per_weight": b, "kld_mean": k, "pareto": p}
            for f, b, k, p in [("original", 16, 0.0, True), ("seeddelta", 8, 0.7, False), ("llama.cpp", 4.5, 1e-4, True),
                               ("pruning", 2, 4.8, True)]]
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    assert plots.pareto_plot(rows, a, "t") is None and plots.pareto_plot(rows, b, "t") is None
    assert a.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert a.read_bytes() == b.read_bytes()
    monkeypatch.setattr(plots, "_pyplot", lambda: None)
    assert plots.pareto_plot(rows, tmp_path / "c.png", "t") == plots.PLOTS_HINT
    assert not (tmp_path / "c.png").exists()


# ---------------------------------------------------------------------------------- variant points
def test_variant_base_alone_holds_exactly_the_bytes_of_that_quantization(env):
    """The K-0 point is a Q4_0 file in all but name: its sdq_base bytes are gguf-py's Q4_0 of each weight
    (what a Q4_0 file stores), nothing else is stored for the weight, so its bits/weight is Q4_0's 4.5."""
    from gguf.quants import quantize

    [c] = eb.variant_candidates(["Q4_0"])
    out = env["dir"] / "v-q4.gguf"
    eb.make_candidate(c, eb.Inputs(env["model"], None), out)
    a, b = GGUFModel(env["model"]), GGUFModel(out)
    for name in _ffn(a):
        stem = name.removesuffix(".weight")
        assert [n for n in b.tensors if n.startswith(stem + ".")] == [stem + ".sdq_base"]
        assert bytes(b.tensors[stem + ".sdq_base"].data.tobytes()) == quantize(a.dense(name), GGMLQuantizationType.Q4_0).tobytes()
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType.Q4_0]
    assert eb.ffn_storage(out).bits_per_weight == 8 * size / block == 4.5


def test_variant_residual_bytes_are_the_compact_layout(env):
    """+1 % c8: Q4_0 base + per row 2 bytes per entry (offset, int8 value), one count byte per 256
    columns and a 2-byte step (docs/file-format.md), K = round(n_in/100) at least 1."""
    [c] = eb.variant_candidates(["Q4_0+1%-c8"])
    out = env["dir"] / "v-c8.gguf"
    eb.make_candidate(c, eb.Inputs(env["model"], env["imatrix"]), out)
    src = GGUFModel(env["model"])
    want = 0
    for layer in range(src.n_layer):
        for kind in KINDS:
            n_in, n_out = src.weight_dims(layer, kind)
            k = keep_count(0.01, n_in)
            want += n_out * n_in // 32 * 18 + n_out * (2 * k + -(-n_in // 256) + 2)
    assert eb.ffn_storage(out).bytes == want


def test_variant_points_needing_xtx_are_skipped_without_one_and_unknown_names_are_one_line(env):
    cands = eb.variant_candidates(["Q4_0", "Q4_0-gptq", "Q4_0+1%-c8-refit"])
    kept, skipped = eb.runnable(cands, eb.Inputs(env["model"], env["imatrix"]))
    assert [c.label for c in kept] == ["sdq Q4_0"]
    assert skipped == ["variant points needing XᵀX skipped (2): no calibration text given"]
    with pytest.raises(SeedDeltaError, match="unknown variant point 'Q3'"):
        eb.variant_candidates(["Q3"])
    assert len(eb.variant_candidates()) == len(eb.VARIANT_POINTS)
