"""Small synthetic llama-architecture GGUF models and imatrix files for tests and benchmarks.

`make_llama_gguf` writes a complete (random-weight) llama model with `gguf.GGUFWriter`: token
embedding, per-layer attention (GQA when n_head_kv < n_head), RMS norms, SwiGLU FFN, output
norm and head, plus the llama hyper-parameter keys and a toy tokenizer, so that the file has
the shape of a real model. 2-D weights are stored in the requested ggml type:

* F32, F16 — plain arrays; BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 — via `gguf.quants.quantize`;
* Q2_K … Q6_K — gguf-py has no quantizer for K-quants, so the blocks are random bytes with
  finite, small fp16 super-block scales: a valid tensor of that type whose true values are
  whatever `gguf.quants.dequantize` decodes (tests always compare against the decoded file).

Row lengths must be multiples of the type's block (32 for Q8_0/Q4_x/Q5_x, 256 for K-quants);
the function says so if they are not. 1-D tensors (norms) are always F32, as llama.cpp does.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from gguf import GGUFWriter
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize, quantize

KINDS = ("ffn_gate", "ffn_up", "ffn_down")

# Byte offsets of the fp16 scale fields inside one block of each K-quant (ggml block layouts).
_K_QUANT_F16_OFFSETS: dict[str, tuple[int, ...]] = {
    "Q2_K": (80, 82),     # scales[16] qs[64] d dmin
    "Q3_K": (108,),       # hmask[32] qs[64] scales[12] d
    "Q4_K": (0, 2),       # d dmin scales[12] qs[128]
    "Q5_K": (0, 2),       # d dmin scales[12] qh[32] qs[128]
    "Q6_K": (208,),       # ql[128] qh[64] scales[16] d
}
_PLAIN = {"F32": np.float32, "F16": np.float16}


@dataclass
class SyntheticModel:
    """What `make_llama_gguf` wrote."""

    path: str
    arch: str
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    vocab: int
    dtype: str
    ffn_dtype: str
    alignment: int
    tensor_names: list[str] = field(default_factory=list)

    def weight_name(self, layer: int, kind: str) -> str:
        return f"blk.{layer}.{kind}.weight"

    def dims(self, kind: str) -> tuple[int, int]:
        """(n_in, n_out) of a FFN kind."""
        return (self.n_ff, self.n_embd) if kind == "ffn_down" else (self.n_embd, self.n_ff)


def block_of(dtype: str) -> int:
    """Row-length granularity of a ggml type name."""
    return GGML_QUANT_SIZES[GGMLQuantizationType[dtype]][0]


def encode_matrix(values: np.ndarray, dtype: str, rng: np.random.Generator, name: str = "") -> tuple[np.ndarray, GGMLQuantizationType]:
    """(array to hand to GGUFWriter.add_tensor, raw ggml type) for a float32 (rows, cols) matrix."""
    qtype = GGMLQuantizationType[dtype]
    if dtype in _PLAIN:
        return values.astype(_PLAIN[dtype]), qtype
    block, type_size = GGML_QUANT_SIZES[qtype]
    rows, cols = values.shape
    if cols % block:
        raise ValueError(f"{name}: row length {cols} is not a multiple of the {dtype} block size {block}")
    if dtype in _K_QUANT_F16_OFFSETS:
        n_blocks = rows * cols // block
        raw = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
        for off in _K_QUANT_F16_OFFSETS[dtype]:
            scale = (rng.uniform(0.5, 1.5, size=n_blocks) * 1e-4).astype(np.float16)
            raw[:, off:off + 2] = scale.view(np.uint8).reshape(n_blocks, 2)
        return raw.reshape(rows, cols // block * type_size), qtype
    return quantize(values.astype(np.float32), qtype), qtype


def _tokenizer_kv(writer: GGUFWriter, vocab: int) -> None:
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(min(vocab - 3, 256))]
    tokens += [f"tok{i}" for i in range(len(tokens), vocab)]
    tokens = tokens[:vocab]
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([float(-i) for i in range(vocab)])
    types = [2, 3, 3] + [6] * (len(tokens) - 3)  # unknown, control x2, byte ...
    writer.add_token_types(types[:vocab])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)


def make_llama_gguf(
    path: str | os.PathLike[str],
    *,
    n_layer: int = 2,
    n_embd: int = 64,
    n_ff: int = 96,
    n_head: int = 4,
    n_head_kv: int = 2,
    vocab: int = 64,
    dtype: str = "F16",
    ffn_dtype: str | None = None,
    seed: int = 0,
    arch: str = "llama",
    alignment: int | None = None,
    std: float = 0.02,
    extra_kv: Mapping[str, Any] | None = None,
    nan_in: Iterable[str] = (),
    omit: Iterable[str] = (),
    tokenizer: bool = True,
) -> SyntheticModel:
    """Write a random llama-shaped GGUF; see the module docstring. `nan_in` names tensors that get
    one NaN (F16/F32 only); `omit` names tensors left out; `extra_kv` adds string/int/float/bool keys."""
    if n_embd % n_head or n_head % n_head_kv:
        raise ValueError("n_embd must be a multiple of n_head, and n_head of n_head_kv")
    ffn_dtype = ffn_dtype or dtype
    nan_set, omit_set = set(nan_in), set(omit)
    rng = np.random.default_rng(seed)
    head_dim = n_embd // n_head
    n_kv = head_dim * n_head_kv
    p = os.fspath(path)
    writer = GGUFWriter(p, arch)
    if alignment is not None:
        writer.add_custom_alignment(alignment)
    writer.add_name(f"synthetic-{arch}-{n_layer}x{n_embd}x{n_ff}-{dtype}")
    writer.add_uint32(f"{arch}.block_count", n_layer)
    writer.add_uint32(f"{arch}.context_length", 256)
    writer.add_uint32(f"{arch}.embedding_length", n_embd)
    writer.add_uint32(f"{arch}.feed_forward_length", n_ff)
    writer.add_uint32(f"{arch}.attention.head_count", n_head)
    writer.add_uint32(f"{arch}.attention.head_count_kv", n_head_kv)
    writer.add_uint32(f"{arch}.rope.dimension_count", head_dim)
    writer.add_float32(f"{arch}.rope.freq_base", 10000.0)
    writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)
    writer.add_uint32(f"{arch}.vocab_size", vocab)
    writer.add_file_type(1 if dtype == "F16" else 0)
    for key, value in (extra_kv or {}).items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_int32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        else:
            writer.add_string(key, str(value))
    if tokenizer:
        _tokenizer_kv(writer, vocab)

    names: list[str] = []

    def add_matrix(name: str, rows: int, cols: int, mat_dtype: str) -> None:
        values = rng.normal(0.0, std, size=(rows, cols)).astype(np.float32)
        if name in nan_set:
            if mat_dtype not in _PLAIN:
                raise ValueError(f"{name}: NaN injection needs F16 or F32")
            values[rows // 2, cols // 3] = np.nan
        data, qtype = encode_matrix(values, mat_dtype, rng, name)
        if name in omit_set:
            return
        writer.add_tensor(name, data, raw_dtype=qtype)
        names.append(name)

    def add_norm(name: str, n: int) -> None:
        if name in omit_set:
            return
        writer.add_tensor(name, (1.0 + rng.normal(0.0, 0.05, size=n)).astype(np.float32))
        names.append(name)

    add_matrix("token_embd.weight", vocab, n_embd, dtype)
    for layer in range(n_layer):
        b = f"blk.{layer}"
        add_norm(f"{b}.attn_norm.weight", n_embd)
        add_matrix(f"{b}.attn_q.weight", n_embd, n_embd, dtype)
        add_matrix(f"{b}.attn_k.weight", n_kv, n_embd, dtype)
        add_matrix(f"{b}.attn_v.weight", n_kv, n_embd, dtype)
        add_matrix(f"{b}.attn_output.weight", n_embd, n_embd, dtype)
        add_norm(f"{b}.ffn_norm.weight", n_embd)
        add_matrix(f"{b}.ffn_gate.weight", n_ff, n_embd, ffn_dtype)
        add_matrix(f"{b}.ffn_up.weight", n_ff, n_embd, ffn_dtype)
        add_matrix(f"{b}.ffn_down.weight", n_embd, n_ff, ffn_dtype)
    add_norm("output_norm.weight", n_embd)
    add_matrix("output.weight", vocab, n_embd, dtype)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return SyntheticModel(
        path=p, arch=arch, n_layer=n_layer, n_embd=n_embd, n_ff=n_ff, n_head=n_head, n_head_kv=n_head_kv,
        vocab=vocab, dtype=dtype, ffn_dtype=ffn_dtype,
        alignment=alignment if alignment is not None else 32, tensor_names=names,
    )


def decoded(data: np.ndarray, dtype: str, rows: int, cols: int) -> np.ndarray:
    """float32 values a stored matrix decodes to (for tests that build their own arrays)."""
    return np.asarray(dequantize(data, GGMLQuantizationType[dtype]), dtype=np.float32).reshape(rows, cols)


def make_imatrix(
    path: str | os.PathLike[str],
    model: SyntheticModel,
    *,
    seed: int = 0,
    layers: Iterable[int] | None = None,
    kinds: Iterable[str] = KINDS,
    skip: Iterable[str] = (),
    wrong_length: Iterable[str] = (),
    count: int = 512,
    datasets: tuple[str, ...] = ("synthetic.txt",),
) -> dict[str, np.ndarray]:
    """Write an imatrix (llama-imatrix GGUF format) for the FFN weights of `model` with random
    positive activation statistics; returns weight name -> mean x² per input (what was meant)."""
    from seeddelta.gguf_format.imatrix_file import write_imatrix

    rng = np.random.default_rng(seed)
    skip_set, wrong_set = set(skip), set(wrong_length)
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    means: dict[str, np.ndarray] = {}
    for layer in (range(model.n_layer) if layers is None else layers):
        for kind in kinds:
            name = model.weight_name(layer, kind)
            if name in skip_set:
                continue
            n_in, _ = model.dims(kind)
            if name in wrong_set:
                n_in += 1
            # log-normal spread so that the per-input scale really varies (a few dominant channels)
            mean_sq = np.exp(rng.normal(0.0, 1.0, size=n_in)).astype(np.float32)
            sums[name] = (mean_sq * np.float32(count)).astype(np.float32)
            counts[name] = count
            means[name] = sums[name].astype(np.float64) / count
    write_imatrix(path, sums, counts, list(datasets), chunk_count=4, chunk_size=count // 4)
    return means
