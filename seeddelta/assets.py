"""The built-in defaults shipped as package data: the tiny model, its validation text, its task pack.

Every command without `-m` runs on `tiny_model()`, without `-f` on `tiny_val_text()`; the greedy
command without `--pack` on `tiny_test_pack()`. They raise one clear line when the file is absent
(a broken installation), never a traceback."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from seeddelta.errors import SeedDeltaError

DATA_DIR = Path(__file__).resolve().parent / "data" / "tiny"
TINY_MODEL = DATA_DIR / "tiny.gguf"
TINY_MANIFEST = DATA_DIR / "manifest.json"
TINY_VAL_TEXT = DATA_DIR / "val.txt"
TINY_TEST_PACK = DATA_DIR / "test.jsonl"


def _existing(path: Path, what: str, flag: str) -> Path:
    if not path.is_file():
        raise SeedDeltaError(f"no {flag} given and the built-in {what} {path} is missing (reinstall seeddelta)")
    return path


def tiny_model() -> Path:
    """The committed tiny model (GGUF F16): the default `-m` of every command."""
    return _existing(TINY_MODEL, "tiny model", "-m MODEL")


def tiny_val_text() -> Path:
    """The tiny model's held-out validation text: the default `-f` of every command."""
    return _existing(TINY_VAL_TEXT, "validation text", "-f TEXT")


def tiny_test_pack() -> Path:
    """The tiny model's held-out task prompts: the default greedy pack."""
    return _existing(TINY_TEST_PACK, "task pack", "--pack FILE")


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
