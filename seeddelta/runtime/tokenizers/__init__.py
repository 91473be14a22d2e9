"""Tokenizers described by a GGUF's metadata: SentencePiece (`spm`) and GPT-2 byte-level BPE (`bpe`)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol


class Tokenizer(Protocol):
    """What the runtime and the evaluation need of a tokenizer."""

    bos_id: int
    eos_id: int
    add_bos: bool

    @property
    def n_vocab(self) -> int: ...

    def encode(self, text: str, add_bos: bool = False) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...
