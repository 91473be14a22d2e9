"""Export the tiny model to GGUF F16 with gguf.GGUFWriter, and read such a file back into TinyLlama.

2-D weights are written F16, norms F32; arrays are (n_out, n_in), which GGUF stores as
ne = [n_in, n_out] as llama.cpp expects. Q/K need no permutation: the training-side RoPE already
uses llama.cpp's NORM (adjacent-pair) layout. The file is written to a temporary name and renamed into
place (`outputs.AtomicOutput`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGUFReader

from seeddelta.errors import SeedDeltaError
from seeddelta.gguf_format.reader import field_value, open_gguf
from seeddelta.outputs import AtomicOutput
from seeddelta.runtime.tokenizers.spm import SPMTokenizer, tiny_tokenizer
from seeddelta.tiny.checkpoint import load_checkpoint, model_from_checkpoint
from seeddelta.tiny.model import TinyConfig, TinyLlama

ARCH = "llama"
FILE_TYPE_MOSTLY_F16 = 1


def export_gguf(model: TinyLlama, tok: SPMTokenizer, out: Path | str, name: str = "seeddelta-tiny",
                extra_kv: dict[str, str] | None = None) -> Path:
    import gguf

    cfg = model.cfg
    if tok.n_vocab != cfg.n_vocab:
        raise SeedDeltaError(f"tokenizer has {tok.n_vocab} pieces, model {cfg.n_vocab}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with AtomicOutput(out, "tiny GGUF") as target:
        _write(gguf.GGUFWriter(target.tmp, ARCH), model, tok, name, extra_kv)
    return out


def _write(w: Any, model: TinyLlama, tok: SPMTokenizer, name: str, extra_kv: dict[str, str] | None) -> None:
    cfg = model.cfg
    w.add_name(name)
    w.add_context_length(cfg.n_ctx)
    w.add_embedding_length(cfg.n_embd)
    w.add_feed_forward_length(cfg.n_ff)
    w.add_block_count(cfg.n_layer)
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv(cfg.n_head_kv)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_eps)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_vocab_size(cfg.n_vocab)
    w.add_file_type(FILE_TYPE_MOSTLY_F16)
    w.add_bool("seeddelta.tiny.tied_output", cfg.tied_output)
    for k, v in (extra_kv or {}).items():
        w.add_string(k, v)
    tok.add_to_gguf(w)
    with torch.no_grad():
        for tname, p in model.gguf_tensors().items():
            a = p.detach().float().numpy()
            a = a.astype(np.float16) if a.ndim == 2 else a.astype(np.float32)
            w.add_tensor(tname, np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def export_checkpoint(ckpt: Path | str, out: Path | str, name: str = "seeddelta-tiny") -> Path:
    ck = load_checkpoint(Path(ckpt))
    model = model_from_checkpoint(ck)
    return export_gguf(model, tiny_tokenizer(), out, name=name)


def _field(reader: GGUFReader, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    return default if f is None else field_value(f)


def load_gguf_model(path: Path | str) -> tuple[TinyLlama, SPMTokenizer]:
    """A TinyLlama holding the GGUF's tensors (F16 values converted exactly to float32)."""
    import gguf

    path = Path(path)
    r = open_gguf(path, "model")
    arch = _field(r, "general.architecture")
    if arch != ARCH:
        raise SeedDeltaError(f"{path}: architecture {arch!r}, expected 'llama'")
    tensors = {t.name: t for t in r.tensors}
    cfg = TinyConfig(
        n_vocab=int(_field(r, "llama.vocab_size", len(_field(r, "tokenizer.ggml.tokens")))),
        n_layer=int(_field(r, "llama.block_count")),
        n_embd=int(_field(r, "llama.embedding_length")),
        n_ff=int(_field(r, "llama.feed_forward_length")),
        n_head=int(_field(r, "llama.attention.head_count")),
        n_head_kv=int(_field(r, "llama.attention.head_count_kv")),
        n_ctx=int(_field(r, "llama.context_length")),
        # float32 metadata back to the decimal value that was written (1e-5, not 9.99999974e-06)
        rope_theta=float(f"{float(_field(r, 'llama.rope.freq_base', 10000.0)):.7g}"),
        rms_eps=float(f"{float(_field(r, 'llama.attention.layer_norm_rms_epsilon')):.7g}"),
        tied_output="output.weight" not in tensors,
    )
    model = TinyLlama(cfg)
    with torch.no_grad():
        for tname, p in model.gguf_tensors().items():
            if tname not in tensors:
                raise SeedDeltaError(f"{path}: tensor {tname} missing")
            t = tensors[tname]
            if t.tensor_type not in (gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F32):
                raise SeedDeltaError(f"{path}: tensor {tname} has type {t.tensor_type.name}; tiny loader reads F16/F32")
            a = np.asarray(t.data).astype(np.float32).reshape(tuple(p.shape))
            p.copy_(torch.from_numpy(a))
    model.eval()
    return model, SPMTokenizer.from_gguf(r)
