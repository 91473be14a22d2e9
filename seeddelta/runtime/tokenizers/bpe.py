"""GPT-2 style byte-level BPE tokenizer built from GGUF metadata (``tokenizer.ggml.model == "gpt2"``).

Used for real models such as SmolLM2 (pre-tokenizer ``smollm``: every digit is its own piece,
then the GPT-2 split). Algorithm, as llama.cpp's BPE tokenizer without special-token parsing:

1. pre-tokenize: for pre-tokenizers that isolate digits, split off each Unicode number character;
   then split each piece with the GPT-2 rule
   ``'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+``
   (implemented as a scanner: Python's ``re`` has no ``\\p{…}`` classes);
2. map the UTF-8 bytes of each piece to GPT-2's printable byte alphabet;
3. merge adjacent symbols by lowest merge rank (leftmost first) until no ranked pair remains;
4. each symbol becomes its token id (per-byte symbols as fallback).

Decoding reverses the byte alphabet; control tokens decode to nothing.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable, Sequence
from typing import Any

from gguf import GGUFReader

from seeddelta.errors import SeedDeltaError

TYPE_NORMAL, TYPE_CONTROL, TYPE_USER_DEFINED = 1, 3, 4
# pre-tokenizer names whose llama.cpp regex list starts with an isolated-digit split "\p{N}"
_DIGIT_SPLIT_PRE = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"}
_CONTRACTIONS = ("re", "ve", "ll", "s", "t", "m", "d")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable character map (printable Latin-1 kept, others shifted)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    mapping: dict[int, str] = {}
    extra = 0
    for b in range(256):
        if b in keep:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _is_letter(ch: str) -> bool:
    return unicodedata.category(ch).startswith("L")


def _is_number(ch: str) -> bool:
    return unicodedata.category(ch).startswith("N")


def _is_other(ch: str) -> bool:
    return not (ch.isspace() or _is_letter(ch) or _is_number(ch))


def gpt2_split(s: str) -> list[str]:
    """The GPT-2 pre-tokenizer regex as a scanner (see module docstring)."""
    out: list[str] = []
    i, n = 0, len(s)
    while i < n:
        ch = s[i]
        if ch == "'":
            hit = next((c for c in _CONTRACTIONS if s.startswith(c, i + 1)), None)
            if hit is not None:
                out.append(s[i: i + 1 + len(hit)])
                i += 1 + len(hit)
                continue
        j = i + 1 if (ch == " " and i + 1 < n and not s[i + 1].isspace()) else i
        c = s[j]
        if not c.isspace():  # ' ?\p{L}+', ' ?\p{N}+' or ' ?[^\s\p{L}\p{N}]+'
            cls = _is_letter if _is_letter(c) else _is_number if _is_number(c) else _is_other
            k = j + 1
            while k < n and cls(s[k]):
                k += 1
            out.append(s[i:k])
            i = k
            continue
        # whitespace run: \s+(?!\S) leaves the last space for the following word, else \s+
        k = i
        while k < n and s[k].isspace():
            k += 1
        if k < n and k - i > 1:
            k -= 1
        out.append(s[i:k])
        i = k
    return out


class BPETokenizer:
    def __init__(self, tokens: Sequence[str], types: Sequence[int], merges: Sequence[str], *, pre: str = "gpt2",
                 bos_id: int = 1, eos_id: int = 2, add_bos: bool = False) -> None:
        self.pieces = list(tokens)
        self.types = [int(t) for t in types]
        self.vocab = {p: i for i, p in reversed(list(enumerate(self.pieces)))}
        self.ranks: dict[tuple[str, str], int] = {}
        for r, m in enumerate(merges):
            a, _, b = m.partition(" ")
            self.ranks.setdefault((a, b), r)
        self.pre = pre
        self.bos_id, self.eos_id = int(bos_id), int(eos_id)
        self.add_bos = bool(add_bos)
        self.byte_map = bytes_to_unicode()
        self.unbyte = {c: b for b, c in self.byte_map.items()}
        self._cache: dict[str, list[int]] = {}

    @property
    def n_vocab(self) -> int:
        return len(self.pieces)

    @classmethod
    def from_gguf(cls, reader: GGUFReader) -> BPETokenizer:
        def get(key: str, default: Any = None) -> Any:
            f = reader.fields.get(key)
            return default if f is None else f.contents()

        if get("tokenizer.ggml.model") != "gpt2":
            raise SeedDeltaError("BPE tokenizer: GGUF tokenizer.ggml.model is not 'gpt2'")
        tokens = get("tokenizer.ggml.tokens")
        merges = get("tokenizer.ggml.merges")
        if tokens is None or merges is None:
            raise SeedDeltaError("BPE tokenizer: GGUF lacks tokenizer.ggml.tokens or tokenizer.ggml.merges")
        types = get("tokenizer.ggml.token_type", [TYPE_NORMAL] * len(tokens))
        return cls(tokens, types, merges, pre=str(get("tokenizer.ggml.pre", "gpt2")),
                   bos_id=int(get("tokenizer.ggml.bos_token_id", 1)), eos_id=int(get("tokenizer.ggml.eos_token_id", 2)),
                   add_bos=bool(get("tokenizer.ggml.add_bos_token", False)))

    def pretokenize(self, text: str) -> list[str]:
        pieces = [text]
        if self.pre in _DIGIT_SPLIT_PRE:
            pieces = []
            cur = ""
            for ch in text:
                if _is_number(ch):
                    if cur:
                        pieces.append(cur)
                    pieces.append(ch)
                    cur = ""
                else:
                    cur += ch
            if cur:
                pieces.append(cur)
        return [w for p in pieces for w in gpt2_split(p)]

    def _bpe(self, word: str) -> list[int]:
        hit = self._cache.get(word)
        if hit is not None:
            return hit
        syms = [self.byte_map[b] for b in word.encode("utf-8")]
        while len(syms) > 1:
            best = None
            best_rank = None
            for k in range(len(syms) - 1):
                r = self.ranks.get((syms[k], syms[k + 1]))
                if r is not None and (best_rank is None or r < best_rank):
                    best, best_rank = (syms[k], syms[k + 1]), r
            if best is None:
                break
            merged: list[str] = []
            k = 0
            while k < len(syms):
                if k + 1 < len(syms) and (syms[k], syms[k + 1]) == best:
                    merged.append(syms[k] + syms[k + 1])
                    k += 2
                else:
                    merged.append(syms[k])
                    k += 1
            syms = merged
        ids: list[int] = []
        for s in syms:
            tid = self.vocab.get(s)
            if tid is not None:
                ids.append(tid)
            else:
                for ch in s:
                    if ch not in self.vocab:
                        raise SeedDeltaError(f"BPE tokenizer: byte symbol {ch!r} missing from the vocabulary")
                    ids.append(self.vocab[ch])
        if len(self._cache) < 100_000:
            self._cache[word] = ids
        return ids

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        out = [self.bos_id] if add_bos else []
        for w in self.pretokenize(text):
            out.extend(self._bpe(w))
        return out

    def decode(self, ids: Iterable[int]) -> str:
        buf = bytearray()
        for t in ids:
            t = int(t)
            if self.types[t] == TYPE_CONTROL:
                continue
            piece = self.pieces[t]
            if self.types[t] == TYPE_USER_DEFINED:
                buf += piece.encode("utf-8")
                continue
            for ch in piece:
                b = self.unbyte.get(ch)
                if b is None:
                    buf += ch.encode("utf-8")
                else:
                    buf.append(b)
        return buf.decode("utf-8", errors="replace")
