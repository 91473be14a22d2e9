"""The evaluation engines (no heavy imports: command-line parsing reads these)."""

from __future__ import annotations

ENGINES = ("torch", "llama.cpp")
DEFAULT_CTX = 512  # llama.cpp context of an engine not told otherwise (greedy packs: prompt + answer)
