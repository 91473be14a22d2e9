"""Training-side llama model in plain torch (the reference the GGUF runtime is compared against).

Llama as llama.cpp runs it: RMSNorm (eps 1e-5) → attention with RoPE in llama.cpp's NORM layout
(rotate adjacent pairs (x[2i], x[2i+1]) by angle pos·theta^(-2i/head_dim)), causal softmax with
scale 1/sqrt(head_dim) → residual; RMSNorm → SwiGLU FFN down(silu(gate(x)) * up(x)) → residual;
final RMSNorm → output projection. No biases. Q/K are therefore exported to GGUF without
permutation. Weights are stored as (n_out, n_in) like the GGUF arrays.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class TinyConfig:
    n_vocab: int
    n_layer: int = 8
    n_embd: int = 192
    n_ff: int = 768
    n_head: int = 6
    n_head_kv: int = 6
    n_ctx: int = 2048
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5
    tied_output: bool = False

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def to_dict(self) -> dict:
        return asdict(self)


def rope_cache(head_dim: int, n_pos: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape (n_pos, head_dim/2), computed in float64 then rounded to float32."""
    inv = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    ang = torch.arange(n_pos, dtype=torch.float64)[:, None] * inv[None, :]
    return torch.cos(ang).float(), torch.sin(ang).float()


def apply_rope_norm(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, D); pairs (x[..., 2i], x[..., 2i+1]) rotated (llama.cpp rope type NORM)."""
    x0 = x[..., 0::2]
    x1 = x[..., 1::2]
    r0 = x0 * cos - x1 * sin
    r1 = x0 * sin + x1 * cos
    return torch.stack((r0, r1), dim=-1).flatten(-2)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Block(nn.Module):
    def __init__(self, cfg: TinyConfig) -> None:
        super().__init__()
        d, hd = cfg.n_embd, cfg.head_dim
        self.cfg = cfg
        self.attn_norm = RMSNorm(d, cfg.rms_eps)
        self.attn_q = nn.Linear(d, cfg.n_head * hd, bias=False)
        self.attn_k = nn.Linear(d, cfg.n_head_kv * hd, bias=False)
        self.attn_v = nn.Linear(d, cfg.n_head_kv * hd, bias=False)
        self.attn_output = nn.Linear(cfg.n_head * hd, d, bias=False)
        self.ffn_norm = RMSNorm(d, cfg.rms_eps)
        self.ffn_gate = nn.Linear(d, cfg.n_ff, bias=False)
        self.ffn_up = nn.Linear(d, cfg.n_ff, bias=False)
        self.ffn_down = nn.Linear(cfg.n_ff, d, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: dict | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        c = self.cfg
        h = self.attn_norm(x)
        q = self.attn_q(h).view(B, T, c.n_head, c.head_dim).transpose(1, 2)
        k = self.attn_k(h).view(B, T, c.n_head_kv, c.head_dim).transpose(1, 2)
        v = self.attn_v(h).view(B, T, c.n_head_kv, c.head_dim).transpose(1, 2)
        q = apply_rope_norm(q, cos, sin)
        k = apply_rope_norm(k, cos, sin)
        if cache is not None:
            if "k" in cache:
                k = torch.cat((cache["k"], k), dim=2)
                v = torch.cat((cache["v"], v), dim=2)
            cache["k"], cache["v"] = k, v
        if c.n_head_kv != c.n_head:
            rep = c.n_head // c.n_head_kv
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        S = k.shape[2]
        if T == S:
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif T == 1:
            a = F.scaled_dot_product_attention(q, k, v)
        else:  # chunk appended to a cache: query i sees keys ≤ S-T+i
            mask = torch.ones(T, S, dtype=torch.bool).tril(diagonal=S - T)
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        a = a.transpose(1, 2).reshape(B, T, c.n_head * c.head_dim)
        x = x + self.attn_output(a)
        h = self.ffn_norm(x)
        return x + self.ffn_down(F.silu(self.ffn_gate(h)) * self.ffn_up(h))


class TinyLlama(nn.Module):
    def __init__(self, cfg: TinyConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.token_embd = nn.Embedding(cfg.n_vocab, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.output_norm = RMSNorm(cfg.n_embd, cfg.rms_eps)
        self.output = None if cfg.tied_output else nn.Linear(cfg.n_embd, cfg.n_vocab, bias=False)
        cos, sin = rope_cache(cfg.head_dim, cfg.n_ctx, cfg.rope_theta)
        self.rope_cos: torch.Tensor  # buffers, declared for the type checker
        self.rope_sin: torch.Tensor
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def init_weights(self, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        std = 0.02
        resid_std = std / math.sqrt(2 * self.cfg.n_layer)
        for name, p in self.named_parameters():
            if p.ndim == 1:
                nn.init.ones_(p)
            elif name.endswith("attn_output.weight") or name.endswith("ffn_down.weight"):
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=g) * resid_std)
            else:
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=g) * std)

    def forward(self, tokens: torch.Tensor, start_pos: int = 0,
                caches: list[dict] | None = None) -> torch.Tensor:
        """tokens (B, T) → logits (B, T, n_vocab). With `caches` (one dict per layer) the keys and
        values are kept for incremental decoding; `start_pos` is the position of tokens[:, 0]."""
        T = tokens.shape[1]
        if start_pos + T > self.cfg.n_ctx:
            raise ValueError(f"sequence of {start_pos + T} tokens exceeds n_ctx {self.cfg.n_ctx}")
        cos = self.rope_cos[start_pos:start_pos + T]
        sin = self.rope_sin[start_pos:start_pos + T]
        x = self.token_embd(tokens)
        for i, blk in enumerate(self.blocks):
            x = blk(x, cos, sin, None if caches is None else caches[i])
        x = self.output_norm(x)
        w = self.token_embd.weight if self.output is None else self.output.weight
        return x @ w.t()

    def gguf_tensors(self) -> dict[str, torch.Tensor]:
        """GGUF tensor name → parameter (shape (n_out, n_in) for matrices)."""
        out = {"token_embd.weight": self.token_embd.weight}
        for i, b in enumerate(self.blocks):
            for name in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output",
                         "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"):
                out[f"blk.{i}.{name}.weight"] = getattr(b, name).weight
        out["output_norm.weight"] = self.output_norm.weight
        if self.output is not None:
            out["output.weight"] = self.output.weight
        return out
