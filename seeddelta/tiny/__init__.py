"""Harness B: the tiny transformer (dataset, tokenizer, training, export)."""

from __future__ import annotations

from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent.parent / "data" / "tiny"


def default_model_path() -> Path:
    """The committed tiny model (GGUF F16, package data)."""
    return DATA_DIR / "tiny.gguf"


def default_manifest_path() -> Path:
    return DATA_DIR / "manifest.json"


def default_val_text_path() -> Path:
    return DATA_DIR / "val.txt"


def default_test_pack_path() -> Path:
    return DATA_DIR / "test.jsonl"
