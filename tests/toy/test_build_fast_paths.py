"""The builder's fast paths against straightforward references, bit for bit.

The speed work (issue 12) may change no output byte, so every fast path here is compared with
exact equality (no tolerance): the torch-free Hadamard transform with torch's matrix product, the
top-K selection with a sort of (−score, index), the sampled-rows metrics with the full
computation (values and memory layout), the GGUF reader with gguf's own, and whole builds across
thread counts.
"""

from __future__ import annotations

import hashlib
import io
import os

import numpy as np
import pytest
import torch
from gguf import GGUFReader, GGUFValueType
from gguf import quants as gguf_quants
from gguf.constants import GGML_QUANT_SIZES

from seeddelta.builder.options import BuildOptions
from seeddelta.builder.pipeline import run_build
from seeddelta.codec.encode import EncodeConfig, encode
from seeddelta.codec.hadamard import fwht, fwht_sequential, fwht_sequential_at, fwht_torch, fwht_torch_levels
from seeddelta.codec.residual import topk_indices
from seeddelta.gguf_format.reader import GGUFModel, field_raw_value, field_value, open_gguf
from seeddelta.testing.synthetic_gguf import make_imatrix, make_llama_gguf
from seeddelta.testing.tolerances import U32


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("length", [1, 2, 8, 32, 128, 1024, 4096])
def test_sequential_fwht_is_torchs_matrix_product_bit_for_bit(length, dtype):
    """The builder's metrics were computed with `fwht_torch`; `fwht_sequential` must give the same
    bits so that the report is unchanged (and the runtime's arithmetic is what the builder measures)."""
    v = np.random.default_rng(length).standard_normal((5, 3, length)).astype(dtype)
    got = fwht_sequential(v)
    assert got.dtype == v.dtype
    np.testing.assert_array_equal(got, fwht_torch(torch.from_numpy(v)).numpy())


@pytest.mark.parametrize("length", [2, 64, 2048])
def test_sequential_fwht_is_the_transform_within_its_bound(length):
    """Against the exact transform (float64 butterfly of float32 inputs): each output is a sum of
    fwht_torch_levels(L)+1 terms, so its error is at most that many roundings of Σ|v| (u = 2^-24)."""
    v = np.random.default_rng(1).standard_normal((4, length)).astype(np.float32)
    exact = fwht(v.astype(np.float64))
    l1 = np.abs(v.astype(np.float64)).sum(axis=-1, keepdims=True)
    assert np.all(np.abs(fwht_sequential(v) - exact) <= fwht_torch_levels(length) * U32 * l1)


def _reference_topk(score: np.ndarray, k: int) -> np.ndarray:
    """Each row sorted by (score descending, index ascending), first k: the definition."""
    return np.stack([np.lexsort((np.arange(row.size), -row))[:k] for row in score]).astype(np.int64)


@pytest.mark.parametrize("kind", ["distinct", "quantized", "float32_collisions", "signed_zeros"])
@pytest.mark.parametrize("k", [1, 3, 17, 63, 64])
def test_topk_is_the_sort_of_minus_score_then_index(kind, k):
    rng = np.random.default_rng(k)
    score = np.abs(rng.standard_normal((40, 64)))
    if kind == "quantized":  # many exact ties (a quantized weight without base)
        score = np.round(score * 4) / 4
    if kind == "signed_zeros":  # the partition reads float32 bits as int32: -0.0 must still tie with +0.0
        score[:, 0::3], score[:, 1::5] = -0.0, 0.0
    if kind == "float32_collisions":  # pairs equal in float32, distinct in float64
        score[:, 0::2] = score[:, 1::2] * (1 + rng.integers(-3, 4, (40, 32)) * 2.0**-40)
    np.testing.assert_array_equal(topk_indices(score, k), _reference_topk(score, k))
    # ranked by magnitude without a float64 copy of it: signs flipped at random change nothing
    signed = score * np.where(rng.random(score.shape) < 0.5, -1.0, 1.0)
    np.testing.assert_array_equal(topk_indices(signed, k, absolute=True), _reference_topk(score, k))


@pytest.mark.parametrize("n,k", [(576, 128), (1100, 128), (1536, 128), (1536, 300), (1100, 367), (2048, 1)])
@pytest.mark.parametrize("kind", ["distinct", "quantized"])
def test_topk_of_long_rows_selected_piecewise_is_the_sort(n, k, kind):
    """Rows longer than numpy's in-register select are cut into pieces (padded when n is not a
    multiple): the selection must still be the definition's, ties included, at and around the limits
    (k equal to a piece's width, one piece's worth of k, a padded last piece)."""
    rng = np.random.default_rng(n + k)
    score = np.abs(rng.standard_normal((12, n)))
    if kind == "quantized":
        score = np.round(score * 2) / 2
    np.testing.assert_array_equal(topk_indices(score, k), _reference_topk(score, k))
    signed = score * np.where(rng.random(score.shape) < 0.5, -1.0, 1.0)
    np.testing.assert_array_equal(topk_indices(signed, k, absolute=True), _reference_topk(score, k))


@pytest.mark.parametrize("scheme,base,row_scale,shape,tokens", [
    ("coo", "xor_circulant", False, (96, 64), 5), ("coo", "xor_circulant", True, (64, 96), 3),
    ("block", "xor_circulant", True, (80, 48), 4), ("coo", "none", True, (50, 70), 2),
    ("coo", "xor_circulant", True, (1024, 512), 40),  # T·n_out·K above the gather limit: embedding_bag
])
def test_sampled_rows_equal_the_full_computation_layout_included(scheme, base, row_scale, shape, tokens):
    rng = np.random.default_rng(3)
    W = rng.standard_normal(shape).astype(np.float32)
    sdw = encode(W, EncodeConfig(K=min(shape[1], 400), scheme=scheme, block=8, base=base, row_scale=row_scale, seed=2))
    x = rng.standard_normal((tokens, shape[1])).astype(np.float32)
    rows = np.sort(rng.choice(shape[0], min(shape[0], 24), replace=False))
    part = sdw.apply_rows(x, rows)  # first: the sampled rows' residual entries alone (no full table yet)
    full = sdw.apply(x)[:, rows]
    np.testing.assert_array_equal(part, full)
    np.testing.assert_array_equal(sdw.apply_rows(x, rows), full)  # and from the full table, once it exists
    # the metrics sum over these arrays; numpy sums in memory order, so the layout must match too
    assert part.strides == full.strides and part.flags.f_contiguous == full.flags.f_contiguous
    np.testing.assert_array_equal(sdw.dense(rows), sdw.dense()[rows])


@pytest.mark.parametrize("shape", [(1536, 576), (576, 1536), (80, 48), (100, 40), (48, 80), (300, 1000), (1000, 300)])
def test_base_rows_cut_from_pieces_are_the_definition(shape):
    """W0 of the identity-permutation XOR base is cut from contiguous pieces of a table (C = 8…32
    values; n_in with no such divisor, e.g. 300, takes the element gather): every value must be
    h2_b[p XOR j] (tall: row b·L + p; wide: column b·L + j), for all rows and for a sorted subset."""
    W = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    base = encode(W, EncodeConfig(K=4, base="xor_circulant", seed=3)).base
    L, (n_out, n_in) = base.geometry.L, shape
    r, j = np.arange(n_out)[:, None], np.arange(n_in)[None, :]
    if n_out >= n_in:
        expected = base.h2[r // L, (r % L) ^ j]
    else:
        expected = base.h2[j // L, r ^ (j % L)]
    assert (base._piece_table is None) == (n_in % 8 != 0)
    np.testing.assert_array_equal(base.dense_rows(np.arange(n_out)), expected)
    rows = np.sort(np.random.default_rng(2).choice(n_out, 37, replace=False))
    np.testing.assert_array_equal(base.dense_rows(rows), expected[rows])


def test_reader_parses_what_ggufs_reader_parses(tmp_path):
    m = make_llama_gguf(tmp_path / "m.gguf", n_layer=2, n_embd=32, n_ff=64, n_head=2, n_head_kv=1, vocab=300,
                        seed=5, extra_kv={"x.empty": "", "x.flag": True, "x.f": 0.5})
    ours, theirs = open_gguf(m.path), GGUFReader(m.path)
    assert list(ours.fields) == list(theirs.fields)
    for key, fa in theirs.fields.items():
        fb = ours.fields[key]
        assert (fb.offset, fb.name, fb.data, fb.types) == (fa.offset, fa.name, fa.data, fa.types), key
        assert len(fb.parts) == len(fa.parts), key
        for pa, pb in zip(fa.parts, fb.parts, strict=True):
            assert pa.dtype == pb.dtype and pa.shape == pb.shape and pa.tobytes() == pb.tobytes(), key
        assert field_raw_value(fb) == b"".join(p.tobytes() for p in fa.parts[2:]), key
        if fa.types and fa.types[0] == GGUFValueType.ARRAY:  # arrays' parts are cut lazily: values as gguf's
            assert field_value(fb) == fa.contents(), key
    for ta, tb in zip(theirs.tensors, ours.tensors, strict=True):
        assert (ta.name, ta.data_offset, ta.data.dtype, ta.data.shape) == (tb.name, tb.data_offset, tb.data.dtype,
                                                                          tb.data.shape)
        np.testing.assert_array_equal(ta.data, tb.data)


def _sha(path: str) -> str:
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()


@pytest.mark.parametrize("ffn_dtype,scheme", [("Q4_1", "coo"), ("Q8_0", "block"), ("F16", "coo")])
def test_build_is_byte_identical_across_thread_counts(tmp_path, monkeypatch, ffn_dtype, scheme):
    """Trials run on worker threads ahead of the decisions and are parked in a spill file: neither the
    thread count nor the timing may change a byte of the GGUF or the report."""
    m = make_llama_gguf(tmp_path / "in.gguf", n_layer=3, n_embd=64, n_ff=96, ffn_dtype=ffn_dtype, seed=4)
    make_imatrix(tmp_path / "im.gguf", m, seed=1)
    outputs = []
    for threads in (1, 2, 3):
        d = tmp_path / f"t{threads}"
        d.mkdir()
        monkeypatch.chdir(d)  # the report names the output as given: the same relative name in each run
        opts = BuildOptions(input=m.path, output="o.gguf", report_json="r.json", K=12,
                            scheme=scheme, block=4, base=True, row_scale=True, imatrix=str(tmp_path / "im.gguf"),
                            eval_cols=16, eval_x=8, threads=threads, deterministic_report=True, progress=False)
        run_build(opts, log=io.StringIO())
        assert sorted(os.listdir(d)) == ["o.gguf", "r.json"]  # the spill file leaves nothing behind
        outputs.append((_sha(str(d / "o.gguf")), _sha(str(d / "r.json"))))
        GGUFModel(opts.output)  # a readable llama GGUF
    assert outputs[0] == outputs[1] == outputs[2]


@pytest.mark.parametrize("qtype", sorted(gguf_quants._type_traits, key=lambda t: t.name), ids=lambda t: t.name)
def test_chunked_dequantize_is_ggufs_bit_for_bit(qtype):
    """Every type gguf decodes, on random bytes (NaN and Inf scales included: compared as bits), over
    more blocks than one chunk and a partial last chunk."""
    from seeddelta.gguf_format import reader

    block, type_size = GGML_QUANT_SIZES[qtype]
    rows, per_row = 3, (reader._DEQUANT_CHUNK_BLOCKS // 2 + 7)
    data = np.random.default_rng(int(qtype)).integers(0, 256, (rows, per_row * type_size), dtype=np.uint8)
    with np.errstate(all="ignore"):  # random scales: NaN and Inf on purpose
        ours, theirs = reader._dequantize(data, qtype), gguf_quants.dequantize(data, qtype)
    assert ours.dtype == theirs.dtype == np.float32 and ours.shape == theirs.shape == (rows, per_row * block)
    np.testing.assert_array_equal(ours.view(np.uint32), theirs.view(np.uint32))


@pytest.mark.parametrize("shape", [(96, 40), (40, 96), (64, 64), (130, 33), (33, 130)])
@pytest.mark.parametrize("max_samples,trials,weighted", [(2048, 1, False), (2048, 3, True), (20, 1, False),
                                                         (0, 2, False), (2048, 1, True)])
def test_xor_base_shortcuts_change_no_bit(monkeypatch, shape, max_samples, trials, weighted):
    """The XOR base's two shortcuts against the plain computation, bit for bit: unit-weight bucket
    counts taken from `_xor_counts` when every row of a block is sampled (instead of a bincount), and
    a tall base's first Hadamard stage computed once for all blocks."""
    from seeddelta.codec import base as base_mod

    rng = np.random.default_rng(sum(shape) + max_samples + trials)
    W = rng.standard_normal(shape).astype(np.float32)
    scale = rng.uniform(0.1, 2.0, shape[1]) if weighted else None

    def fit() -> base_mod.XorCirculantBase:
        return base_mod.fit_xor_circulant(W, scale=scale, max_samples=max_samples, perm_trials=trials,
                                          rng=np.random.default_rng(7))

    fast = fit()
    fast_sse = fast.sse  # (computed when asked, with one trial: asked here, before the plain fit is patched in)
    plain_fit = base_mod._bucket_fit
    monkeypatch.setattr(base_mod, "_bucket_fit", lambda W, sample, omega, L, full=False, with_sse=True:
                        plain_fit(W, sample, omega, L))
    monkeypatch.setattr(base_mod, "_FIT_CHUNK_VALUES", 1 << 40)  # and every block's values in one bincount call
    plain = fit()
    for a, b in ((fast.d2, plain.d2), (fast.perm1, plain.perm1)):
        np.testing.assert_array_equal(a, b)
    assert fast_sse == plain.sse
    x = rng.standard_normal((5, shape[1])).astype(np.float32)
    shared = fast.apply(x)
    # the per-block computation: neither D1 = 1, P1 = identity skipped nor the first stage shared
    plain.__dict__["_plain_first_stage"] = plain.__dict__["_shared_first_stage"] = False
    np.testing.assert_array_equal(shared, plain.apply(x))


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("identity", [False, True])
@pytest.mark.parametrize("chunk", [1, 7, 40, 1 << 40])
def test_xor_bucket_sums_by_chunks_are_one_bincount(monkeypatch, weighted, identity, chunk):
    """The XOR fit's bucket sums taken a chunk of rows at a time (the running sums carried into the next
    bincount call) against one np.bincount over all values in row-major order, bit for bit: chunks
    of one row, of several rows with a partial last one, and everything in one call."""
    from seeddelta.codec import base as base_mod

    rng = np.random.default_rng(chunk + 2 * identity + weighted)
    W = (rng.standard_normal((50, 24)) * 10.0 ** rng.integers(-6, 6, (50, 24))).astype(np.float32)
    L = 32
    rows = rng.permutation(50)[:30]
    local = rows % L
    cols = np.arange(3, 23) if identity else rng.permutation(24)[:20]
    slots = rng.permutation(L)[:20]
    omega = rng.uniform(0.1, 3.0, 20) if weighted else None
    monkeypatch.setattr(base_mod, "_FIT_CHUNK_VALUES", chunk)
    s0, s1, s2 = base_mod._bucket_sums(W, base_mod._BlockSample(rows, local, slots, cols, identity), omega, L,
                                       counts=True, with_sse=True)
    u = (local[:, None] ^ slots[None, :]).ravel()
    v = W[rows][:, cols].astype(np.float64).ravel()
    w = np.ones_like(v) if omega is None else np.broadcast_to(omega[None, :], (30, 20)).ravel()
    wv = v if omega is None else w * v
    expected = (np.bincount(u, minlength=L).astype(np.float64) if omega is None else
                np.bincount(u, weights=w, minlength=L),
                np.bincount(u, weights=wv, minlength=L), np.bincount(u, weights=wv * v, minlength=L))
    for got, want in zip((s0, s1, s2), expected, strict=True):
        assert got is not None
        np.testing.assert_array_equal(got.view(np.int64), want.view(np.int64))


def test_metric_names_without_metrics_are_the_summarys():
    """evaluate_weight lists every group's names up front (zeros) without computing a summary of zeros:
    the names, and their order in the report, must be the summary's."""
    from seeddelta.codec.metrics import SUMMARY_NAMES, RowMetrics, evaluate_weight

    rm = RowMetrics(np.ones(3), np.ones(3), np.ones(3))
    assert list(rm.summary("_x")) == [f"{n}_x" for n in SUMMARY_NAMES]
    W = np.random.default_rng(0).standard_normal((8, 6)).astype(np.float32)
    sdw = encode(W, EncodeConfig(K=2))
    got = evaluate_weight(W, sdw, eval_cols=0, eval_x=0)
    assert list(got) == [k for s in ("", "_w", "_x", "_x_w") for k in rm.summary(s)] + ["has_w", "has_x"]
    assert all(got[k] == 0.0 for s in ("", "_w", "_x", "_x_w") for k in rm.summary(s))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("length", [1, 2, 8, 32, 128, 2048])
def test_fwht_at_positions_is_the_full_transform_there(length, dtype):
    rng = np.random.default_rng(length)
    v = rng.standard_normal((3, 2, length)).astype(dtype)
    for positions in (np.arange(length), np.unique(rng.integers(0, length, max(1, length // 7))), np.array([length - 1])):
        np.testing.assert_array_equal(fwht_sequential_at(v, positions), fwht_sequential(v)[..., positions])


@pytest.mark.parametrize("shape", [(96, 40), (40, 96), (64, 64), (130, 33), (33, 130), (300, 70)])
@pytest.mark.parametrize("trials,depth1,perm2", [(1, False, False), (3, False, False), (1, True, False), (2, False, True)])
def test_xor_base_rows_are_the_full_output_there(shape, trials, depth1, perm2):
    """`XorCirculantBase.apply_rows` (the metrics' sampled outputs) against `apply(x)[:, rows]`, bit for
    bit, for tall and wide bases, shared or per-block first stages, depth 1 and a second permutation."""
    from dataclasses import replace

    from seeddelta.codec.base import fit_xor_circulant

    rng = np.random.default_rng(sum(shape) + trials)
    W = rng.standard_normal(shape).astype(np.float32)
    base = fit_xor_circulant(W, scale=None, max_samples=2048, perm_trials=trials, rng=np.random.default_rng(1))
    if depth1:
        base = replace(base, d2=None)
    if perm2:
        base = replace(base, perm2=np.stack([rng.permutation(base.d1.shape[1]) for _ in range(base.d1.shape[0])]))
    x = rng.standard_normal((6, shape[1])).astype(np.float32)
    full = base.apply(x)
    for rows in (np.arange(shape[0]), np.sort(rng.choice(shape[0], min(shape[0], 17), replace=False)), np.array([0])):
        np.testing.assert_array_equal(base.apply_rows(x, rows), full[:, rows])


@pytest.mark.parametrize("scheme,base,row_scale,imatrix", [
    ("coo", "xor_circulant", False, False), ("coo", "xor_circulant", True, True), ("block", "xor_circulant", True, True),
    ("coo", "none", False, True), ("block", "none", False, False),
])
def test_encoding_rows_in_chunks_changes_nothing(monkeypatch, scheme, base, row_scale, imatrix):
    """The encoder works on cache-sized chunks of rows; every row is encoded on its own, so chunks of a
    few rows (the last one partial) give the arrays of one chunk holding every row, bit for bit."""
    from seeddelta.codec import encode as codec_encode

    rng = np.random.default_rng(8)
    W = rng.standard_normal((70, 48)).astype(np.float32)
    scale = rng.uniform(0.5, 2.0, 48) if imatrix else None
    config = EncodeConfig(K=9, scheme=scheme, block=4, base=base, row_scale=row_scale, seed=3)
    monkeypatch.setattr(codec_encode, "_CHUNK_ELEMENTS", 1 << 30)
    whole = encode(W, config, scale)
    monkeypatch.setattr(codec_encode, "_CHUNK_ELEMENTS", 3 * 48 + 5)  # 3 rows a chunk: 23 full + 1 of one row
    chunked = encode(W, config, scale)
    for name, array in whole.tensors().items():
        np.testing.assert_array_equal(chunked.tensors()[name], array, err_msg=name)


@pytest.mark.parametrize("user_setting", [None, "2"])
def test_build_loads_numpy_on_one_blas_thread_unless_the_user_decided(user_setting):
    """`seeddelta build` imports numpy with OpenBLAS on one thread (its BLAS calls run on one thread
    anyway) and leaves the environment as it was; a user's OPENBLAS_NUM_THREADS is obeyed."""
    import subprocess
    import sys

    code = ("import os; from seeddelta.resources import load_numpy_without_blas_threads as load; did = load(); "
            "from threadpoolctl import threadpool_info; "
            "print(did, [i['num_threads'] for i in threadpool_info() if i['internal_api'] == 'openblas'], "
            "os.environ.get('OPENBLAS_NUM_THREADS'))")
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    if user_setting is not None:
        env["OPENBLAS_NUM_THREADS"] = user_setting
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout.split()
    if user_setting is None:
        assert out == ["True", "[1]", "None"]
    else:
        assert out[0] == "False" and out[-1] == user_setting


@pytest.mark.parametrize("kernel", ["copies", "refuses", "stops_midway"])
def test_copied_tensors_are_the_same_bytes_however_the_kernel_copies(tmp_path, monkeypatch, kernel):
    """The input's tensors are copied by the kernel (copy_file_range) when it can; when it refuses, the
    writer copies them itself, and when it stops midway the rest is read and written: the same file."""
    from seeddelta.gguf_format.writer import write_model_copy

    m = make_llama_gguf(tmp_path / "in.gguf", n_layer=2, n_embd=64, n_ff=96, ffn_dtype="Q4_1", seed=3)
    model = GGUFModel(m.path)
    write_model_copy(model, tmp_path / "reference.gguf")
    real = os.copy_file_range
    calls = []

    def copy(src, dst, count, offset_src=None, offset_dst=None):
        calls.append(count)
        if kernel == "refuses":
            raise OSError(18, "Invalid cross-device link")
        if kernel == "stops_midway" and len(calls) % 2 == 0:
            raise OSError(5, "Input/output error")
        return real(src, dst, max(1, count // 3) if kernel == "stops_midway" else count, offset_src, offset_dst)

    monkeypatch.setattr(os, "copy_file_range", copy)
    write_model_copy(model, tmp_path / "out.gguf")
    assert calls, "the kernel copy was not tried"
    assert (tmp_path / "out.gguf").read_bytes() == (tmp_path / "reference.gguf").read_bytes()


def test_a_fitted_base_does_not_keep_its_weight_alive():
    """With one permutation trial the fit's SSE is computed when asked, from the weight it was fitted
    on — held weakly, so that the builder's trials waiting ahead hold no weight: while the weight lives
    the SSE is there (and the same on every read); once it is freed, NaN."""
    import gc
    import math
    import weakref

    W = np.random.default_rng(2).standard_normal((96, 64)).astype(np.float32)
    alive = encode(W, EncodeConfig(K=2, base="xor_circulant", seed=1)).base
    assert math.isfinite(alive.sse) and alive.sse > 0 and alive.sse == alive.sse
    freed = encode(W.copy(), EncodeConfig(K=2, base="xor_circulant", seed=1)).base
    gc.collect()
    assert math.isnan(freed.sse)
    ref = weakref.ref(W)
    del W
    gc.collect()
    assert ref() is None  # `alive` did not keep it
