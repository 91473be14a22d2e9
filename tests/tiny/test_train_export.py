"""Training-side model, training loop (learning, bit-exact resume) and GGUF F16 export on small configs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from seeddelta.runtime.tokenizers.spm import SPMTokenizer, tiny_tokenizer
from seeddelta.tiny import dataset as ds
from seeddelta.tiny.export import export_gguf, load_gguf_model
from seeddelta.tiny.model import TinyConfig, TinyLlama, apply_rope_norm, rope_cache
from seeddelta.tiny.train import TrainConfig, make_batch, train

SMALL = {"n_layer": 2, "n_embd": 32, "n_ff": 64, "n_head": 2, "n_head_kv": 2, "n_ctx": 64}
VAL = ds.load_val_text()[:3000]


def small_cfg(steps: int = 30) -> TrainConfig:
    return TrainConfig(seed=3, steps=steps, lr=3e-3, warmup=5, phases=[(1.0, 32, 4)], log_every=5,
                       eval_every=10, ckpt_every_sec=1e9, model=dict(SMALL), threads=1)


@pytest.fixture(scope="module")
def tok() -> SPMTokenizer:
    return tiny_tokenizer()


def quiet(_s: str) -> None:
    pass


def test_rope_rotates_adjacent_pairs_like_llama_cpp_norm():
    # llama.cpp rope type NORM: (x[2i], x[2i+1]) rotated by pos * theta^(-2i/d); checked by hand for d=4
    d, theta, pos = 4, 10000.0, 3
    cos, sin = rope_cache(d, pos + 1, theta)
    x = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 1, d)
    got = apply_rope_norm(x, cos[pos:pos + 1], sin[pos:pos + 1]).flatten()
    want = []
    for i, (a, b) in enumerate(((1.0, 2.0), (3.0, 4.0))):
        ang = pos * theta ** (-2 * i / d)
        want += [a * math.cos(ang) - b * math.sin(ang), a * math.sin(ang) + b * math.cos(ang)]
    # float32 cos/sin of float64 angles: error ≤ a few ulp of values of size ~5 → 1e-6 abs
    assert torch.allclose(got, torch.tensor(want, dtype=torch.float32), atol=1e-6, rtol=0)


def test_kv_cache_decoding_matches_full_forward(tok):
    torch.manual_seed(0)
    m = TinyLlama(TinyConfig(n_vocab=tok.n_vocab, **SMALL))
    m.init_weights(1)
    m.eval()
    x = torch.randint(0, tok.n_vocab, (1, 20))
    with torch.no_grad():
        full = m(x)
        caches = [{} for _ in m.blocks]
        parts = [m(x[:, :12], 0, caches)]
        for p in range(12, 20):
            parts.append(m(x[:, p:p + 1], p, caches))
        inc = torch.cat(parts, dim=1)
    # same maths, different float32 summation order in attention: logits of size ~0.1, 1e-5 abs
    assert torch.allclose(full, inc, atol=1e-5, rtol=0)


def test_batches_are_deterministic_start_with_bos_and_mark_answers(tok):
    cfg = small_cfg()
    held = ds.heldout_texts(cfg.seed)
    x1, y1, m1 = make_batch(cfg, 4, tok, held)
    x2, y2, m2 = make_batch(cfg, 4, tok, held)
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and torch.equal(m1, m2)
    assert x1.shape == (4, 32) and bool((x1[:, 0] == tok.bos_id).all())
    assert torch.equal(x1[:, 1:], y1[:, :-1]), "targets are the inputs shifted by one"
    x3, _, _ = make_batch(cfg, 5, tok, held)
    assert not torch.equal(x1, x3)
    assert 0 < float(m1.float().mean()) < 1


def _fixed_batch_loss(model: TinyLlama, cfg: TrainConfig, tok: SPMTokenizer) -> float:
    x, y, _ = make_batch(cfg, 10_000, tok, set())  # a step the short run never reaches
    with torch.no_grad():
        logits = model(x)
        return float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)))


def test_training_reduces_the_loss(tok, tmp_path):
    cfg = small_cfg(steps=40)
    torch.set_num_threads(2)
    from seeddelta.tiny.train import build

    before = _fixed_batch_loss(build(cfg, tok)[0], cfg, tok)
    model = train(cfg, tmp_path / "run", log=quiet, val_text=VAL)
    after = _fixed_batch_loss(model, cfg, tok)
    # at init the loss is ≈ ln(n_vocab) = 5.85 nats; the data's character statistics alone are worth
    # > 2 nats, which 40 steps at lr 3e-3 pick up (measured: 5.84 → 3.77 nats); a 1-nat drop separates
    # "learns" from "does not learn" with a wide margin on both sides
    assert before == pytest.approx(math.log(tok.n_vocab), abs=0.3)
    assert after < before - 1.0
    assert (tmp_path / "run" / "ckpt.pt").exists() and (tmp_path / "run" / "best.pt").exists()


def test_resume_reproduces_an_uninterrupted_run_bit_for_bit(tmp_path):
    cfg = small_cfg(steps=12)
    full = train(cfg, tmp_path / "a", log=quiet, val_text=VAL)
    train(small_cfg(steps=12), tmp_path / "b", max_steps=5, log=quiet, val_text=VAL)
    resumed = train(small_cfg(steps=12), tmp_path / "b", resume=True, log=quiet, val_text=VAL)
    sa, sb = full.state_dict(), resumed.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def _small_model(tok: SPMTokenizer, tied: bool = False) -> TinyLlama:
    m = TinyLlama(TinyConfig(n_vocab=tok.n_vocab, tied_output=tied, **SMALL))
    m.init_weights(7)
    with torch.no_grad():  # non-trivial norm weights, so a norm written as ones would be caught
        for p in m.parameters():
            if p.ndim == 1:
                p.add_(0.01 * torch.arange(p.numel(), dtype=torch.float32))
    return m.eval()


def test_export_metadata_names_shapes_dtypes_and_exact_f16_values(tok, tmp_path):
    import gguf

    m = _small_model(tok)
    path = export_gguf(m, tok, tmp_path / "t.gguf", name="unit")
    assert not list(tmp_path.glob("*.tmp")), "written through a temporary file and renamed"
    r = gguf.GGUFReader(str(path))
    kv = {k: f.contents() for k, f in r.fields.items()}
    c = m.cfg
    expect = {
        "general.architecture": "llama", "general.name": "unit", "general.file_type": 1,
        "llama.context_length": c.n_ctx, "llama.embedding_length": c.n_embd,
        "llama.feed_forward_length": c.n_ff, "llama.block_count": c.n_layer,
        "llama.attention.head_count": c.n_head, "llama.attention.head_count_kv": c.n_head_kv,
        "llama.rope.dimension_count": c.head_dim, "llama.vocab_size": tok.n_vocab,
        "tokenizer.ggml.model": "llama", "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.add_eos_token": False,
        "tokenizer.ggml.add_space_prefix": False,
    }
    for k, v in expect.items():
        assert kv[k] == v, k
    # float32 metadata: 10000 is exact; 1e-5 is stored as the nearest float32
    assert kv["llama.rope.freq_base"] == 10000.0
    assert kv["llama.attention.layer_norm_rms_epsilon"] == float(np.float32(1e-5))
    tensors = {t.name: t for t in r.tensors}
    names = ["token_embd.weight", "output_norm.weight", "output.weight"]
    for i in range(c.n_layer):
        names += [f"blk.{i}.{n}.weight" for n in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output",
                                                   "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")]
    assert sorted(tensors) == sorted(names)
    params = m.gguf_tensors()
    for name, t in tensors.items():
        p = params[name].detach()
        # ggml ne lists the fastest dimension first: a (n_out, n_in) array has ne = [n_in, n_out]
        assert list(t.shape) == list(reversed(p.shape)), name
        if p.ndim == 2:
            assert t.tensor_type == gguf.GGMLQuantizationType.F16, name
            want = p.numpy().astype(np.float16)
        else:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32, name
            want = p.numpy().astype(np.float32)
        got = np.asarray(t.data).reshape(p.shape)
        assert got.dtype == want.dtype and np.array_equal(got, want), f"{name}: stored values are the rounded parameters"
    assert tensors["blk.0.ffn_gate.weight"].shape.tolist() == [c.n_embd, c.n_ff]
    assert tensors["blk.0.ffn_down.weight"].shape.tolist() == [c.n_ff, c.n_embd]


def test_reloaded_gguf_model_equals_the_f16_rounded_model(tok, tmp_path):
    m = _small_model(tok)
    path = export_gguf(m, tok, tmp_path / "t.gguf")
    back, back_tok = load_gguf_model(path)
    assert back.cfg == m.cfg
    with torch.no_grad():
        for p in m.parameters():
            if p.ndim == 2:
                p.copy_(p.half().float())
        x = torch.tensor([back_tok.encode(VAL[:200], add_bos=True)[:64]])
        # identical weights and identical code: logits equal bit for bit
        assert torch.equal(m(x), back(x))
    assert back_tok.encode(VAL) == tok.encode(VAL)


def test_tied_output_writes_no_output_tensor(tok, tmp_path):
    import gguf

    m = _small_model(tok, tied=True)
    path = export_gguf(m, tok, tmp_path / "tied.gguf")
    names = {t.name for t in gguf.GGUFReader(str(path)).tensors}
    assert "output.weight" not in names
    back, _ = load_gguf_model(path)
    assert back.cfg.tied_output and back.output is None


def test_warm_start_begins_from_the_gguf_weights_and_records_the_parent(tok, tmp_path):
    from seeddelta.errors import SeedDeltaError
    from seeddelta.tiny.release import sha256_file

    parent = export_gguf(_small_model(tok), tok, tmp_path / "parent.gguf")
    loaded, _ = load_gguf_model(parent)
    # max_steps=0: the run stops before its first update, so the model is the parent's exactly
    warm = train(small_cfg(steps=10), tmp_path / "warm", max_steps=0, log=quiet, val_text=VAL, init_from=parent)
    for (k, a), (_, b) in zip(loaded.state_dict().items(), warm.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    ck = torch.load(tmp_path / "warm" / "ckpt.pt", weights_only=False)
    assert ck["state"]["init_from"] == {"path": str(parent), "sha256": sha256_file(parent)}
    with pytest.raises(SeedDeltaError, match="configuration"):
        other = TrainConfig.from_dict({**small_cfg().to_dict(), "model": {**SMALL, "n_ff": 96}})
        train(other, tmp_path / "bad", max_steps=0, log=quiet, val_text=VAL, init_from=parent)


def test_data_offset_gives_new_batches_from_the_same_stream(tok):
    cfg = small_cfg()
    x0, _, _ = make_batch(cfg, 7, tok, set())
    shifted = TrainConfig.from_dict({**cfg.to_dict(), "data_offset": 5})
    # step 2 of a run offset by 5 reads the stream position of step 7; step 7 reads a new one
    assert torch.equal(make_batch(shifted, 2, tok, set())[0], x0)
    assert not torch.equal(make_batch(shifted, 7, tok, set())[0], x0)


def test_release_finds_the_warm_start_parents_history_by_sha256(tmp_path, monkeypatch):
    from seeddelta.errors import SeedDeltaError
    from seeddelta.tiny import release

    monkeypatch.setattr(release, "DATA_DIR", tmp_path / "none")  # only the outdir's manifest counts here
    parent = {"gguf": {"sha256": "ab" * 32}, "training": {"steps": 6000, "tokens": 12},
              "evaluation": {"greedy": {"copy": 1.0}, "ppl": {"512": 2.6}, "items": []}}
    (tmp_path / "manifest.json").write_text(json.dumps(parent))
    got = release._parent_training({"path": "p.gguf", "sha256": "ab" * 32}, tmp_path)
    assert got == {"path": "p.gguf", "sha256": "ab" * 32, "training": parent["training"],
                   "evaluation": {"greedy": {"copy": 1.0}, "ppl": {"512": 2.6}}}
    assert release._parent_training(None, tmp_path) is None
    with pytest.raises(SeedDeltaError, match="has no manifest"):
        release._parent_training({"path": "q.gguf", "sha256": "cd" * 32}, tmp_path)
