"""The torch runtime (seeddelta.runtime.model) against a from-scratch float64 numpy forward written here.

The reference reads the same GGUF with gguf.GGUFReader (+ gguf.quants.dequantize) and computes
llama.cpp's LLAMA graph in float64: RMSNorm, RoPE NORM built as explicit 2×2 rotations of the
pairs (2i, 2i+1), attention head by head (GQA: query head h reads KV head h // (n_head/n_head_kv)),
causal softmax, SwiGLU.

Tolerance: the runtime computes in float32. Every logit is the end of a chain of at most
n_layer·8 sequential float32 reductions (projections, attention dot products/weighted sums,
norms), each of at most n = max(n_embd, n_ff, T) terms, with error ≤ n·u·Σ|terms| (u = 2⁻²⁴). With
the O(1)-conditioned random weights used here this gives |Δlogit| ≤ n_layer·8·n·u·(1 + max|logit|)
(≈ 1e-4 relative for the shapes below); a layout or formula error moves logits by O(0.1–1), and a
sensitivity check shows that the NEOX rope pairing (a plausible bug) is far outside the band.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from seeddelta.errors import SeedDeltaError
from seeddelta.runtime.model import load_model, load_tokenizer
from seeddelta.testing import synthetic_gguf as synthetic

U32 = 2.0 ** -24
U16 = 2.0 ** -11
SHAPE = dict(n_layer=2, n_embd=64, n_ff=96, n_head=4, n_head_kv=2, vocab=259)


PLAIN = ("F32", "F16", "BF16")


def read_weights(path: str, held: bool = False) -> tuple[dict[str, np.ndarray], dict[str, object]]:
    """Every tensor dequantized exactly (float64); held=True rounds quantized matrices to float16 the
    way the runtime holds them (seeddelta.runtime.weights), written here independently."""
    import gguf

    r = gguf.GGUFReader(path)
    w = {}
    for t in r.tensors:
        a = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
        a = np.asarray(a, dtype=np.float64).reshape([int(d) for d in reversed(t.shape)])
        if held and a.ndim == 2 and gguf.GGMLQuantizationType(t.tensor_type).name not in PLAIN:
            a = a.astype(np.float16).astype(np.float64)
        w[t.name] = a
    meta = {k: f.contents() for k, f in r.fields.items() if k.startswith("llama.")}
    return w, meta


def ref_forward(path: str, tokens: list[int], neox: bool = False, held: bool = False) -> np.ndarray:
    w, meta = read_weights(path, held)
    n_head, n_kv = int(meta["llama.attention.head_count"]), int(meta["llama.attention.head_count_kv"])
    n_embd, eps = int(meta["llama.embedding_length"]), float(meta["llama.attention.layer_norm_rms_epsilon"])
    theta, rd = float(meta["llama.rope.freq_base"]), int(meta["llama.rope.dimension_count"])
    hd = n_embd // n_head
    T = len(tokens)

    def rms(x: np.ndarray, g: np.ndarray) -> np.ndarray:
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * g

    def rope(v: np.ndarray) -> np.ndarray:  # v (T, H, hd)
        out = v.copy()
        for p in range(T):
            for i in range(rd // 2):
                a = p * theta ** (-2.0 * i / rd)
                rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
                pair = [i, i + rd // 2] if neox else [2 * i, 2 * i + 1]
                out[p, :, pair] = rot @ v[p, :, pair]
        return out

    x = w["token_embd.weight"][tokens]
    for layer in range(int(meta["llama.block_count"])):
        b = f"blk.{layer}."
        h = rms(x, w[b + "attn_norm.weight"])
        q = rope((h @ w[b + "attn_q.weight"].T).reshape(T, n_head, hd))
        k = rope((h @ w[b + "attn_k.weight"].T).reshape(T, n_kv, hd))
        v = (h @ w[b + "attn_v.weight"].T).reshape(T, n_kv, hd)
        att = np.zeros((T, n_head, hd))
        for hh in range(n_head):
            kv = hh // (n_head // n_kv)
            s = q[:, hh] @ k[:, kv].T / np.sqrt(hd)
            s = np.where(np.tril(np.ones((T, T))) > 0, s, -np.inf)
            s = np.exp(s - s.max(-1, keepdims=True))
            att[:, hh] = (s / s.sum(-1, keepdims=True)) @ v[:, kv]
        x = x + att.reshape(T, n_embd) @ w[b + "attn_output.weight"].T
        h = rms(x, w[b + "ffn_norm.weight"])
        g = h @ w[b + "ffn_gate.weight"].T
        x = x + ((g / (1 + np.exp(-g))) * (h @ w[b + "ffn_up.weight"].T)) @ w[b + "ffn_down.weight"].T
    out = w.get("output.weight", w["token_embd.weight"])
    return rms(x, w["output_norm.weight"]) @ out.T


def tol_for(ref: np.ndarray, n_layer: int, n: int) -> float:
    return n_layer * 8 * n * U32 * (1.0 + float(np.abs(ref).max()))


def f16_hold_tol(ref: np.ndarray, n_layer: int) -> float:
    """Extra band when quantized weights are held as float16: each weight is rounded once (relative
    error <= u16 = 2^-11), so each of the 7 matmuls per layer and the output projection errs by at most
    u16·Σ|w·x| — the same chain argument as tol_for with u16 in place of n·u32 per matmul."""
    return (7 * n_layer + 1) * U16 * (1.0 + float(np.abs(ref).max()))


@pytest.fixture(scope="module")
def model_f32(tmp_path_factory: pytest.TempPathFactory) -> str:
    p = tmp_path_factory.mktemp("rt") / "f32.gguf"
    # std 0.25: attention logits of O(1–10), so rope/GQA/mask errors change the output visibly
    synthetic.make_llama_gguf(p, dtype="F32", std=0.25, seed=1, **SHAPE)
    return str(p)


TOKENS = [1, 65, 66, 67, 10, 200, 13, 72, 101, 108, 108, 111, 32, 119, 3, 258, 100]


def test_forward_matches_float64_reference(model_f32: str) -> None:
    m = load_model(model_f32)
    got = m.forward(TOKENS).numpy().astype(np.float64)
    ref = ref_forward(model_f32, TOKENS)
    tol = tol_for(ref, SHAPE["n_layer"], SHAPE["n_ff"])
    assert got.shape == ref.shape == (len(TOKENS), SHAPE["vocab"])
    assert np.max(np.abs(got - ref)) <= tol, (np.max(np.abs(got - ref)), tol)
    # sensitivity: the other rope pairing (NEOX) is far outside the band, so this test sees layout errors
    assert np.max(np.abs(ref_forward(model_f32, TOKENS, neox=True) - ref)) > 100 * tol


@pytest.mark.parametrize("dtype", ["F16", "BF16", "Q8_0", "Q4_1"])
def test_quantized_types_match_reference_on_dequantized_weights(tmp_path, dtype: str) -> None:
    p = str(tmp_path / f"{dtype}.gguf")
    synthetic.make_llama_gguf(p, dtype=dtype, std=0.25, seed=2, **SHAPE)
    m = load_model(p)
    held = {torch.float16: "F16", torch.bfloat16: "BF16"}[m.layers[0].ffn["ffn_up"].weight.dtype]
    assert held == ("BF16" if dtype == "BF16" else "F16")  # as stored; quantized types as float16
    got = m.forward(TOKENS[:9]).numpy()
    # the graph on the values the runtime holds: the float32 band
    ref_held = ref_forward(p, TOKENS[:9], held=True)
    tol = tol_for(ref_held, SHAPE["n_layer"], SHAPE["n_ff"])
    assert np.max(np.abs(got - ref_held)) <= tol
    # against the exactly dequantized weights: plus one float16 rounding per quantized weight
    ref = ref_forward(p, TOKENS[:9])
    extra = 0.0 if dtype in PLAIN else f16_hold_tol(ref, SHAPE["n_layer"])
    assert np.max(np.abs(got - ref)) <= tol + extra
    # hold="float32" dequantizes every weight to float32: the exact reference within the float32 band
    got32 = load_model(p, hold="float32").forward(TOKENS[:9]).numpy()
    assert np.max(np.abs(got32 - ref)) <= tol_for(ref, SHAPE["n_layer"], SHAPE["n_ff"])
    if dtype not in PLAIN:  # the float16 rounding is really there (so the held reference is the right one)
        assert np.max(np.abs(got - ref)) > np.max(np.abs(got32 - ref))


def test_weights_are_held_once_in_their_stored_width(tmp_path) -> None:
    p = str(tmp_path / "q.gguf")
    synthetic.make_llama_gguf(p, dtype="F16", std=0.25, seed=2, **SHAPE)
    m16, m32 = load_model(p), load_model(p, hold="float32")
    # F16 held as F16: half the bytes of the float32 model, norms excepted (held float32 in both)
    norms = sum(t.numel() * 4 for t in [m16.output_norm] + [x for L in m16.layers for x in (L.attn_norm, L.ffn_norm)])
    assert m16.weight_nbytes() - norms == (m32.weight_nbytes() - norms) // 2
    # the held float16 bits are the stored bits
    import gguf

    r = gguf.GGUFReader(p)
    stored = next(t for t in r.tensors if t.name == "blk.1.ffn_down.weight")
    assert np.array_equal(m16.layers[1].ffn["ffn_down"].weight.numpy().view(np.uint16),
                          np.asarray(stored.data).view(np.uint16).reshape(SHAPE["n_embd"], SHAPE["n_ff"]))


def test_tied_output_uses_token_embedding(tmp_path) -> None:
    p = str(tmp_path / "tied.gguf")
    synthetic.make_llama_gguf(p, dtype="F32", std=0.25, seed=3, omit=["output.weight"], **SHAPE)
    m = load_model(p)
    assert m.output is None
    ref = ref_forward(p, TOKENS[:7])
    assert np.max(np.abs(m.forward(TOKENS[:7]).numpy() - ref)) <= tol_for(ref, SHAPE["n_layer"], SHAPE["n_ff"])


def test_kv_cache_decode_equals_full_recompute(model_f32: str) -> None:
    m = load_model(model_f32)
    full = m.forward(TOKENS).numpy()
    cache = m.new_cache(len(TOKENS))
    parts = [m.forward(TOKENS[:5], cache).numpy()]
    parts.append(m.forward(TOKENS[5:9], cache).numpy())  # a multi-token step after a prefix
    for t in TOKENS[9:]:
        parts.append(m.forward([t], cache).numpy())
    inc = np.concatenate(parts)
    assert cache.n == len(TOKENS)
    # same f32 operations on the same values, different reduction shapes: same bound as above
    assert np.max(np.abs(inc - full)) <= tol_for(full, SHAPE["n_layer"], SHAPE["n_ff"])
    with pytest.raises(SeedDeltaError, match="KV cache"):
        m.forward([1], cache)


def test_logits_start_returns_the_tail(model_f32: str) -> None:
    m = load_model(model_f32)
    full = m.forward(TOKENS)
    tail = m.forward(TOKENS, logits_start=10)
    assert torch.equal(tail, full[10:]) or float((tail - full[10:]).abs().max()) <= 1e-5


def test_weight_bytes_count_every_tensor(model_f32: str) -> None:
    m = load_model(model_f32)
    c = SHAPE
    hd = c["n_embd"] // c["n_head"]
    per_layer = (2 * c["n_embd"] + 2 * c["n_embd"] * c["n_embd"] + 2 * c["n_embd"] * hd * c["n_head_kv"]
                 + 3 * c["n_embd"] * c["n_ff"])
    expect = 4 * (2 * c["vocab"] * c["n_embd"] + c["n_embd"] + c["n_layer"] * per_layer)
    assert m.weight_nbytes() == expect


def test_missing_tensor_and_bad_file_are_clear_errors(tmp_path) -> None:
    p = str(tmp_path / "missing.gguf")
    synthetic.make_llama_gguf(p, dtype="F32", seed=4, omit=["blk.1.ffn_up.weight"], **SHAPE)
    with pytest.raises(SeedDeltaError, match=r"blk\.1\.ffn_up\.weight is missing"):
        load_model(p)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all")
    with pytest.raises(SeedDeltaError, match="is not a GGUF file"):
        load_model(bad)
    with pytest.raises(SeedDeltaError, match="not found"):
        load_model(tmp_path / "nope.gguf")


def test_tokenizer_from_synthetic_gguf_round_trips_bytes(model_f32: str) -> None:
    tok = load_tokenizer(model_f32)
    ids = tok.encode("Hello\n", add_bos=True)
    # the synthetic vocabulary has no add_space_prefix key, so SPM's default prefix "▁" is added
    assert ids[0] == tok.bos_id and tok.decode(ids).endswith("Hello\n")


def test_partial_rope_dimension_count(model_f32: str, tmp_path) -> None:
    from gguf import GGUFValueType

    from seeddelta.gguf_format.reader import GGUFModel
    from seeddelta.gguf_format.writer import KV, write_model_copy
    p = str(tmp_path / "partial_rope.gguf")
    # head_dim 16, only the first 8 dims rotated (the rest pass through, as llama.cpp's NORM rope)
    write_model_copy(GGUFModel(model_f32), p,
                             set_keys=[KV("llama.rope.dimension_count", 8, GGUFValueType.UINT32)])
    m = load_model(p)
    assert m.config.rope_dim == 8
    ref = ref_forward(p, TOKENS)
    tol = tol_for(ref, SHAPE["n_layer"], SHAPE["n_ff"])
    assert np.max(np.abs(m.forward(TOKENS).numpy() - ref)) <= tol
    assert np.max(np.abs(ref - ref_forward(model_f32, TOKENS))) > 100 * tol  # the key really changes the model


def test_sixteen_bit_linear_works_inside_and_then_outside_inference_mode() -> None:
    """The float32 scratch buffer is shared per thread: one first made under inference_mode must still
    be writable by a projection called directly afterwards (found by the suite run in one process)."""
    from seeddelta.runtime import weights

    weights._scratch.__dict__.pop("buf", None)  # start from no buffer, as a fresh thread does
    w = torch.randn(8, 4, generator=torch.Generator().manual_seed(0)).to(torch.float16)
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        inside = weights.linear(x, w)
    outside = weights.linear(x, w)
    assert torch.equal(inside, outside)  # same inputs, same kernel: bit-identical
