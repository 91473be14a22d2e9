"""Llama-architecture forward pass in torch, from a GGUF file, with pluggable FFN projections.

Semantics follow llama.cpp's LLAMA graph: token embedding; per block RMSNorm → attention
(Q/K/V projections, RoPE type NORM on adjacent pairs (2i, 2i+1) of the first
``rope.dimension_count`` dims of each head, grouped-query attention, causal mask, scale
1/√head_dim) → residual; RMSNorm → SwiGLU FFN ``down(silu(gate·x) ⊙ up·x)`` → residual; final
RMSNorm and output projection (``output.weight``, or the token embedding when tied). No biases.
GGUF files written by llama.cpp's converter store attn_q/attn_k already permuted for NORM rope.

The file is opened once, through `seeddelta.gguf_format.reader` (the tokenizer reuses that reader).
Weights are held as stored where torch can (F32, F16, BF16) and quantized ones as float16, one copy
each (`seeddelta.runtime.weights`); compute is float32 (16-bit weights are converted a block of rows
at a time inside each matmul). The FFN projections are either dense or SeedΔ (see
`seeddelta.runtime.projections`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf.constants import GGMLQuantizationType

from seeddelta.errors import SeedDeltaError
from seeddelta.gguf_format.extensions import EXTENSIONS_KEY, check_extensions
from seeddelta.gguf_format.reader import GGUFModel
from seeddelta.gguf_format.schema import KINDS, RUNTIME_ARCHITECTURES, SEEDDELTA_SUFFIXES
from seeddelta.gguf_format.seeddelta_tensors import StoredArray
from seeddelta.gguf_format.writer import RawTensor
from seeddelta.runtime.projections import (
    MODES,
    DenseProjection,
    SeedDeltaPayload,
    make_projection,
    parse_payload,
)
from seeddelta.runtime.regime import RegimeGate, summarize
from seeddelta.runtime.sdq_projections import SdqPayload
from seeddelta.runtime.tokenizers import Tokenizer
from seeddelta.runtime.tokenizers.bpe import BPETokenizer
from seeddelta.runtime.tokenizers.spm import SPMTokenizer
from seeddelta.runtime.weights import HOLD_MODES, TensorRef, hold_tensor, linear

FfnObserver = Callable[[int, str, torch.Tensor], None]
LayerObserver = Callable[[int, torch.Tensor], None]  # (layer, residual stream after the block)


@dataclass(frozen=True)
class LlamaConfig:
    n_vocab: int
    n_embd: int
    n_ff: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    rope_dim: int
    rope_theta: float
    rope_freq_scale: float
    rms_eps: float
    n_ctx_train: int


def _read_config(gguf_model: GGUFModel) -> LlamaConfig:
    """The hyper-parameters, each checked for type and range: a bad header value is one line naming the key."""
    path, arch = gguf_model.path, gguf_model.arch
    if arch not in RUNTIME_ARCHITECTURES:
        raise SeedDeltaError(f"{path}: general.architecture is {arch!r}; the runtime runs "
                             f"{', '.join(RUNTIME_ARCHITECTURES)} only")

    def bad(key: str, value: Any, expected: str) -> SeedDeltaError:
        return SeedDeltaError(f"{path}: metadata key {key} is {value!r} ({type(value).__name__}); expected {expected}")

    def integer(suffix: str, default: int | None = None, minimum: int = 1) -> int:
        key = f"{arch}.{suffix}"
        value = gguf_model.get(key)
        if value is None:
            if default is None:
                raise SeedDeltaError(f"{path}: metadata key {key} is missing")
            return default
        if isinstance(value, list) and value and all(v == value[0] for v in value):
            value = value[0]  # a per-layer array with one value for every layer
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad(key, value, f"an integer >= {minimum}")
        if value < minimum:
            raise bad(key, value, f"an integer >= {minimum}")
        return int(value)

    def number(suffix: str, default: float | None = None, positive: bool = True) -> float:
        key = f"{arch}.{suffix}"
        value = gguf_model.get(key)
        if value is None:
            if default is None:
                raise SeedDeltaError(f"{path}: metadata key {key} is missing")
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or (positive and value <= 0):
            raise bad(key, value, "a finite number > 0" if positive else "a finite number")
        return float(value)

    n_embd = integer("embedding_length")
    n_head = integer("attention.head_count")
    head_dim = integer("attention.key_length", n_embd // n_head if n_embd % n_head == 0 else 0)
    if head_dim == 0:
        raise SeedDeltaError(f"{path}: {arch}.embedding_length {n_embd} is not a multiple of "
                             f"{arch}.attention.head_count {n_head} (and no attention.key_length)")
    scaling = gguf_model.get(f"{arch}.rope.scaling.type")
    freq_scale = 1.0
    if scaling not in (None, "none"):
        if scaling != "linear":
            raise SeedDeltaError(f"{path}: {arch}.rope.scaling.type {scaling!r} is not supported (only linear)")
        freq_scale = 1.0 / number("rope.scaling.factor", 1.0)
    tokens = gguf_model.reader.fields.get("tokenizer.ggml.tokens")
    n_vocab = integer("vocab_size", len(tokens.data) if tokens is not None else None)
    return LlamaConfig(
        n_vocab=n_vocab,
        n_embd=n_embd,
        n_ff=integer("feed_forward_length"),
        n_layer=integer("block_count"),
        n_head=n_head,
        n_head_kv=integer("attention.head_count_kv", n_head),
        head_dim=head_dim,
        rope_dim=integer("rope.dimension_count", head_dim, minimum=0),
        rope_theta=number("rope.freq_base", 10000.0),
        rope_freq_scale=freq_scale,
        rms_eps=number("attention.layer_norm_rms_epsilon"),
        n_ctx_train=integer("context_length", 2048),
    )


@dataclass
class KVCache:
    """Per-layer K/V buffers (n_head_kv, max_len, head_dim) and the number of filled positions."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    max_len: int
    n: int = 0

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


@dataclass
class _Layer:
    attn_norm: torch.Tensor
    wqkv: torch.Tensor  # attn_q, attn_k, attn_v stacked by rows: one matmul per token instead of three
    wo: torch.Tensor
    ffn_norm: torch.Tensor
    ffn: dict[str, Any] = field(default_factory=dict)  # kind -> projection


class LlamaModel:
    """A loaded model. ``forward(tokens)`` returns float32 logits (T, n_vocab)."""

    def __init__(self, config: LlamaConfig, tok_embd: torch.Tensor, output: torch.Tensor | None,
                 output_norm: torch.Tensor, layers: list[_Layer], rope_freqs: torch.Tensor | None,
                 path: str = "", metadata: dict[str, Any] | None = None) -> None:
        self.config = config
        self.tok_embd = tok_embd
        self.output = output  # None = tied to tok_embd
        self.output_norm = output_norm
        self.layers = layers
        self.path = path
        self.metadata = metadata or {}
        self.ffn_observer: FfnObserver | None = None
        self.layer_observer: LayerObserver | None = None
        self.tokens_forwarded = 0  # positions run through the layers (what conditional Δ's counts are over)
        c = config
        inv = 1.0 / (c.rope_theta ** (np.arange(0, c.rope_dim, 2, dtype=np.float64) / c.rope_dim))
        if rope_freqs is not None:
            inv = inv / rope_freqs.float().numpy().astype(np.float64)[: len(inv)]
        self._inv_freq = inv * c.rope_freq_scale
        self.rope_freqs = rope_freqs

    # ------------------------------------------------------------------ bookkeeping
    def projections(self) -> dict[str, Any]:
        return {f"blk.{i}.{k}": p for i, layer in enumerate(self.layers) for k, p in layer.ffn.items()}

    @property
    def n_seeddelta(self) -> int:
        """Number of FFN projections that run through SeedΔ."""
        return sum(1 for p in self.projections().values() if p.kind == "seeddelta")

    def nonfinite_outputs(self) -> int:
        return sum(int(getattr(p, "nonfinite", 0)) for p in self.projections().values())

    def regime_gates(self) -> dict[str, RegimeGate]:
        """The projections with a delta regime (extension delta_regime/1) and their counters."""
        return {n: p.gate for n, p in self.projections().items() if getattr(p, "gate", None) is not None}

    def conditional_delta(self) -> dict[str, Any] | None:
        """Compute saved by conditional Δ since the last reset (None: no weight has a regime)."""
        c = self.config
        return summarize(self.regime_gates(), self.tokens_forwarded, c.n_layer * len(KINDS) * 2 * c.n_embd * c.n_ff)

    def reset_conditional_delta(self) -> None:
        self.tokens_forwarded = 0
        for g in self.regime_gates().values():
            g.reset()

    def weight_nbytes(self) -> int:
        """Bytes of all weight tensors this model holds (tied output counted once)."""
        n = 0
        tensors = [self.tok_embd, self.output_norm]
        if self.output is not None:
            tensors.append(self.output)
        if self.rope_freqs is not None:
            tensors.append(self.rope_freqs)
        for layer in self.layers:
            tensors += [layer.attn_norm, layer.wqkv, layer.wo, layer.ffn_norm]
            n += sum(p.nbytes() for p in layer.ffn.values())
        return n + sum(t.numel() * t.element_size() for t in tensors)

    def ffn_nbytes(self) -> int:
        return sum(p.nbytes() for p in self.projections().values())

    def new_cache(self, max_len: int) -> KVCache:
        c = self.config
        shape = (c.n_head_kv, max_len, c.head_dim)
        return KVCache([torch.zeros(shape) for _ in self.layers], [torch.zeros(shape) for _ in self.layers], max_len)

    # ------------------------------------------------------------------ maths
    def _rms(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.config.rms_eps) * w

    def _cos_sin(self, pos: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        ang = pos.astype(np.float64)[:, None] * self._inv_freq[None, :]
        return torch.from_numpy(np.cos(ang).astype(np.float32)), torch.from_numpy(np.sin(ang).astype(np.float32))

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # x (T, H, hd); NORM mode rotates adjacent pairs (2i, 2i+1) of the first rope_dim dims
        rd = self.config.rope_dim
        xr = x[..., :rd].reshape(*x.shape[:-1], rd // 2, 2)
        x0, x1 = xr[..., 0], xr[..., 1]
        c, s = cos[:, None, :], sin[:, None, :]
        rot = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1).reshape(*x.shape[:-1], rd)
        if rd == x.shape[-1]:
            return rot
        return torch.cat((rot, x[..., rd:]), dim=-1)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor | list[int] | np.ndarray, cache: KVCache | None = None,
                logits_start: int = 0) -> torch.Tensor:
        """Logits (T - logits_start, n_vocab) for tokens (T,) appended after the cache's contents."""
        c = self.config
        tok = torch.as_tensor(np.asarray(tokens, dtype=np.int64))
        if tok.ndim != 1 or tok.numel() == 0:
            raise SeedDeltaError("forward: tokens must be a non-empty 1-D sequence")
        if int(tok.min()) < 0 or int(tok.max()) >= c.n_vocab:
            raise SeedDeltaError(f"forward: token id out of range [0, {c.n_vocab})")
        t = tok.numel()
        past = cache.n if cache is not None else 0
        if cache is not None and past + t > cache.max_len:
            raise SeedDeltaError(f"forward: KV cache of {cache.max_len} positions cannot hold {past + t}")
        cos, sin = self._cos_sin(np.arange(past, past + t))
        self.tokens_forwarded += t
        h = self.tok_embd[tok].to(torch.float32)
        rep = c.n_head // c.n_head_kv
        for i, layer in enumerate(self.layers):
            x = self._rms(h, layer.attn_norm)
            qkv = linear(x, layer.wqkv).view(t, c.n_head + 2 * c.n_head_kv, c.head_dim)
            qk = self._rope(qkv[:, : c.n_head + c.n_head_kv], cos, sin).transpose(0, 1)
            q, k = qk[: c.n_head], qk[c.n_head:]
            v = qkv[:, c.n_head + c.n_head_kv:].transpose(0, 1)
            if cache is not None:
                cache.k[i][:, past: past + t] = k
                cache.v[i][:, past: past + t] = v
                k = cache.k[i][:, : past + t]
                v = cache.v[i][:, : past + t]
            if rep > 1:
                k = k.repeat_interleave(rep, dim=0)
                v = v.repeat_interleave(rep, dim=0)
            att = causal_attention(q, k, v, past)
            h = h + linear(att.transpose(0, 1).reshape(t, c.n_head * c.head_dim), layer.wo)
            x = self._rms(h, layer.ffn_norm)
            obs = self.ffn_observer
            if obs is not None:
                obs(i, "ffn_gate", x)
                obs(i, "ffn_up", x)
            a = torch.nn.functional.silu(layer.ffn["ffn_gate"](x)) * layer.ffn["ffn_up"](x)
            if obs is not None:
                obs(i, "ffn_down", a)
            h = h + layer.ffn["ffn_down"](a)
            if self.layer_observer is not None:
                self.layer_observer(i, h)
        if cache is not None:
            cache.n = past + t
        h = self._rms(h[logits_start:], self.output_norm)
        return linear(h, self.output if self.output is not None else self.tok_embd)

    __call__ = forward


# Queries per attention block: the scores of one block (heads × block × keys float32) stay a few MB, so
# they come from malloc's heap instead of fresh zeroed pages (a 2048-token window's full score matrix is
# 100 MB on the tiny model: a third of the CPU time went to the kernel's page faults, measured).
ATTENTION_QUERY_BLOCK = 128


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past: int) -> torch.Tensor:
    """Causal softmax attention of queries at positions past..past+T-1 over keys 0..past+T-1, (H, T, hd).

    Computed a block of queries at a time, each over the keys it can see: the masked half of the score
    matrix is never computed (it contributes exact zeros), so the result equals one masked call up to
    float32 rounding of the kernel's internal order (≤ 1e-6 absolute, tests/toy/test_runtime_attention.py)."""
    t = q.shape[1]
    if t == 1:  # decoding one token: it sees every key, no mask
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)
    blocks = []
    for start in range(0, t, ATTENTION_QUERY_BLOCK):
        end = min(t, start + ATTENTION_QUERY_BLOCK)
        seen = past + end
        mask = torch.arange(seen)[None, :] <= torch.arange(past + start, past + end)[:, None]
        blocks.append(torch.nn.functional.scaled_dot_product_attention(
            q[:, start:end], k[:, :seen], v[:, :seen], attn_mask=mask))
    return blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=1)


def _collect_seeddelta(tensors: dict[str, Any], layer: int, kind: str) -> dict[str, StoredArray]:
    out: dict[str, StoredArray] = {}
    for suf in SEEDDELTA_SUFFIXES:
        t = tensors.get(f"blk.{layer}.{kind}.{suf}")
        if t is not None:
            data = np.array(t.data)  # copy out of the memory map, dtype and numpy shape as stored
            # a variant's base carries its ggml type (any quantization)
            out[suf] = RawTensor(data, GGMLQuantizationType(t.tensor_type), tuple(t.shape)) if suf == "sdq_base" else data
    return out


@dataclass
class WeightSource:
    """What loading the weights needs from an opened file: path, configuration, metadata and the tensor
    table (views of the memory map) — without the reader's per-key objects, which for a 49k-token
    vocabulary take ~150 MB and need not be resident while the weights are read (`weight_source`)."""

    path: str
    config: LlamaConfig
    tensors: dict[str, TensorRef]
    data: Any  # the file's memory map (numpy.memmap)
    meta: dict[str, Any]


def weight_source(gguf_model: GGUFModel) -> WeightSource:
    cfg = _read_config(gguf_model)
    # a SeedΔ file extension this runtime does not know is refused before anything is loaded
    check_extensions(gguf_model.get(EXTENSIONS_KEY), (n.rsplit(".", 1)[-1] for n in gguf_model.tensors), gguf_model.path)
    meta = {
        "architecture": gguf_model.arch,
        "name": gguf_model.get("general.name"),
        "strip_dense": gguf_model.get("seeddelta.strip_dense", False) is True,
        "seeddelta_enabled": gguf_model.get("seeddelta.enabled", False) is True,
    }
    tensors = {name: TensorRef.of(t) for name, t in gguf_model.tensors.items()}
    return WeightSource(gguf_model.path, cfg, tensors, gguf_model.reader.data, meta)


def materialized_dtype(tensors: Mapping[str, Any], layer: int, kind: str, hold: str = "stored") -> torch.dtype:
    """The dtype a materialized Ŵ is held in: float32 when the weight it replaces is stored F32 (or,
    stripped, the layer's attention weights are), float16 otherwise — the precision of the model it
    came from (never bfloat16: 8 significant bits would be coarser than the stored f16 SeedΔ values).
    Ŵ is reconstructed in float64 and rounded once to this dtype; `seeddelta materialize` writes
    exactly these values."""
    if hold == "float32":
        return torch.float32
    for name in (f"blk.{layer}.{kind}.weight", f"blk.{layer}.attn_q.weight", f"blk.{layer}.attn_output.weight"):
        t = tensors.get(name)
        if t is not None:
            return torch.float32 if GGMLQuantizationType(t.tensor_type) == GGMLQuantizationType.F32 else torch.float16
    return torch.float16


def load_model(path: str | Path | GGUFModel | WeightSource, *, use_seeddelta: bool = True,
               mode: str = "materialized", hold: str = "stored") -> LlamaModel:
    """Load a llama GGUF. SeedΔ tensors, when present and `use_seeddelta`, replace the dense FFN matmul.

    mode: "materialized" (dense Ŵ built at load) or "sparse" (no dense copy of SeedΔ weights).
    hold: "stored" (F32/F16/BF16 as stored, quantized as float16, Ŵ per `materialized_dtype`) or
    "float32" (every weight dequantized to float32: the reference the stored mode is measured against).
    A stripped dense weight (``seeddelta.strip_dense`` true and ``blk.N.T.weight`` absent) runs
    through SeedΔ; it cannot run dense (SeedDeltaError).
    """
    if mode not in MODES:
        raise SeedDeltaError(f"SeedΔ mode {mode!r} unknown (expected one of {', '.join(MODES)})")
    if hold not in HOLD_MODES:
        raise SeedDeltaError(f"weight holding {hold!r} unknown (expected one of {', '.join(HOLD_MODES)})")
    if isinstance(path, WeightSource):
        src = path
    else:
        src = weight_source(path if isinstance(path, GGUFModel) else GGUFModel(path, what="model"))
    p = src.path
    cfg = src.config
    tensors = src.tensors
    strip_dense = bool(src.meta["strip_dense"])

    def dense(name: str) -> torch.Tensor:
        t = tensors.get(name)
        if t is None:
            raise SeedDeltaError(f"{p}: tensor {name} is missing")
        w = hold_tensor(t, p, hold=hold, reader_data=src.data)
        return w.to(torch.float32) if w.ndim == 1 else w  # norms and rope factors: float32 (tiny, exact)
    def check_shape(name: str, w: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        if tuple(w.shape) != shape:
            raise SeedDeltaError(f"{p}: tensor {name} has shape {tuple(w.shape)}, expected {shape}")
        return w

    c = cfg
    # every SeedΔ payload is validated before any weight is dequantized: a damaged file fails in a moment
    payloads: dict[tuple[int, str], SeedDeltaPayload | SdqPayload] = {}
    if use_seeddelta:
        for i in range(c.n_layer):
            for kind in KINDS:
                n_in, n_out = (c.n_ff, c.n_embd) if kind == "ffn_down" else (c.n_embd, c.n_ff)
                try:
                    payload = parse_payload(f"blk.{i}.{kind}", _collect_seeddelta(tensors, i, kind), n_in, n_out)
                except SeedDeltaError as exc:  # name the file too: `kld` loads two
                    raise SeedDeltaError(f"{p}: {exc}") from None
                if payload is not None:
                    payloads[(i, kind)] = payload
    tok_embd = check_shape("token_embd.weight", dense("token_embd.weight"), (c.n_vocab, c.n_embd))
    output = None
    if "output.weight" in tensors:
        output = check_shape("output.weight", dense("output.weight"), (c.n_vocab, c.n_embd))
    output_norm = check_shape("output_norm.weight", dense("output_norm.weight"), (c.n_embd,))
    rope_freqs = dense("rope_freqs.weight") if "rope_freqs.weight" in tensors else None
    if c.rope_dim % 2 or c.rope_dim > c.head_dim:
        raise SeedDeltaError(f"{p}: rope.dimension_count {c.rope_dim} invalid for head dim {c.head_dim}")
    if c.n_head % c.n_head_kv:
        raise SeedDeltaError(f"{p}: head_count {c.n_head} not a multiple of head_count_kv {c.n_head_kv}")
    qd, kvd = c.n_head * c.head_dim, c.n_head_kv * c.head_dim
    layers: list[_Layer] = []
    for i in range(c.n_layer):
        b = f"blk.{i}."
        layer = _Layer(
            attn_norm=check_shape(b + "attn_norm.weight", dense(b + "attn_norm.weight"), (c.n_embd,)),
            wqkv=torch.cat([check_shape(b + "attn_q.weight", dense(b + "attn_q.weight"), (qd, c.n_embd)),
                            check_shape(b + "attn_k.weight", dense(b + "attn_k.weight"), (kvd, c.n_embd)),
                            check_shape(b + "attn_v.weight", dense(b + "attn_v.weight"), (kvd, c.n_embd))]),
            wo=check_shape(b + "attn_output.weight", dense(b + "attn_output.weight"), (c.n_embd, qd)),
            ffn_norm=check_shape(b + "ffn_norm.weight", dense(b + "ffn_norm.weight"), (c.n_embd,)),
        )
        for kind in KINDS:
            n_in, n_out = (c.n_ff, c.n_embd) if kind == "ffn_down" else (c.n_embd, c.n_ff)
            wname = f"{b}{kind}.weight"
            payload = payloads.pop((i, kind), None)
            if payload is not None:
                layer.ffn[kind] = make_projection(payload, mode, materialized_dtype(tensors, i, kind, hold))
            elif wname in tensors:
                layer.ffn[kind] = DenseProjection(check_shape(wname, dense(wname), (n_out, n_in)), f"{b}{kind}")
            elif strip_dense:
                has_sd = any(f"{b}{kind}.{s}" in tensors for s in SEEDDELTA_SUFFIXES)
                why = "SeedΔ is disabled" if has_sd else "the file has no SeedΔ tensors for it"
                raise SeedDeltaError(f"{p}: {wname} is stripped (seeddelta.strip_dense) and cannot run dense: {why}")
            else:
                raise SeedDeltaError(f"{p}: tensor {wname} is missing")
        layers.append(layer)
    meta = {
        **src.meta,
        "mode": mode,
        "use_seeddelta": use_seeddelta,
        "hold": hold,
    }
    return LlamaModel(cfg, tok_embd, output, output_norm, layers, rope_freqs, path=p, metadata=meta)


def load_tokenizer(path: str | Path | GGUFModel) -> Tokenizer:
    """The tokenizer described by a GGUF's metadata: SPM ("llama") or GPT-2 byte-level BPE ("gpt2")."""
    gguf_model = path if isinstance(path, GGUFModel) else GGUFModel(path, what="model")
    kind = gguf_model.get("tokenizer.ggml.model")
    if kind == "llama":
        return SPMTokenizer.from_gguf(gguf_model.reader)
    if kind == "gpt2":
        return BPETokenizer.from_gguf(gguf_model.reader)
    raise SeedDeltaError(f"{gguf_model.path}: tokenizer.ggml.model {kind!r} is not supported (llama or gpt2)")
