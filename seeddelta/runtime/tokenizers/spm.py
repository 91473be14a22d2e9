"""Tokenizers built from GGUF metadata: a faithful Python port of llama.cpp's SPM ("llama") tokenizer.

The same class is used at training time (built from the tiny model's vocabulary), in our runtime
(read back from a GGUF) and must agree with stock llama.cpp. Algorithm (llama.cpp `llm_tokenizer_spm`):

1. spaces are escaped to U+2581 ("▁"); no space prefix is added (``tokenizer.ggml.add_space_prefix``
   is written as false, and honoured when read);
2. the text is split into UTF-8 characters, each a symbol;
3. repeatedly, the adjacent pair whose concatenation is a vocabulary piece with the highest score is
   merged (ties: leftmost pair first);
4. each final symbol becomes its token; a symbol that is not a piece falls back to one ``<0xNN>``
   byte token per UTF-8 byte (``<unk>`` if the vocabulary has no byte pieces).

Decoding: NORMAL pieces with "▁" turned back into spaces, BYTE pieces into their byte, CONTROL and
UNKNOWN pieces into nothing (llama.cpp's detokenizer without ``special``).
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from gguf import GGUFReader

from seeddelta.errors import SeedDeltaError
from seeddelta.gguf_format.reader import open_gguf

SPACE = "\u2581"

# llama.cpp token types (llama_token_type / gguf.TokenType)
TYPE_NORMAL = 1
TYPE_UNKNOWN = 2
TYPE_CONTROL = 3
TYPE_USER_DEFINED = 4
TYPE_UNUSED = 5
TYPE_BYTE = 6


def byte_piece(b: int) -> str:
    return f"<0x{b:02X}>"


class SPMTokenizer:
    """llama.cpp-compatible SPM tokenizer over an explicit vocabulary (pieces, scores, types)."""

    def __init__(
        self,
        pieces: Sequence[str],
        scores: Sequence[float],
        types: Sequence[int],
        *,
        bos_id: int = 1,
        eos_id: int = 2,
        unk_id: int = 0,
        add_space_prefix: bool = False,
        add_bos: bool = True,
        add_eos: bool = False,
    ) -> None:
        if not (len(pieces) == len(scores) == len(types)):
            raise SeedDeltaError("tokenizer: pieces, scores and types differ in length")
        self.pieces = list(pieces)
        self.scores = [float(s) for s in scores]
        self.types = [int(t) for t in types]
        self.bos_id, self.eos_id, self.unk_id = int(bos_id), int(eos_id), int(unk_id)
        self.add_space_prefix = bool(add_space_prefix)
        self.add_bos, self.add_eos = bool(add_bos), bool(add_eos)
        self._piece_to_id: dict[str, int] = {}
        for i, p in enumerate(self.pieces):
            self._piece_to_id.setdefault(p, i)  # llama.cpp keeps the first id of a duplicated text
        self._byte_to_id: dict[int, int] = {}
        for i, (p, t) in enumerate(zip(self.pieces, self.types, strict=True)):
            if t == TYPE_BYTE:
                self._byte_to_id[int(p[3:5], 16)] = i
        # encode cache: the tiny dataset repeats the same short texts often
        self._cache: dict[str, tuple[int, ...]] = {}

    # ------------------------------------------------------------------ properties
    @property
    def n_vocab(self) -> int:
        return len(self.pieces)

    def token_to_piece(self, token_id: int) -> str:
        return self.pieces[token_id]

    def piece_to_id(self, piece: str) -> int | None:
        return self._piece_to_id.get(piece)

    # ------------------------------------------------------------------ encode
    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        out = [self.bos_id] if add_bos else []
        cached = self._cache.get(text)
        if cached is None:
            cached = tuple(self._encode_spm(text))
            if len(self._cache) < 200_000:
                self._cache[text] = cached
        out.extend(cached)
        return out

    def _encode_spm(self, text: str) -> list[int]:
        if not text:
            return []
        if self.add_space_prefix:
            text = " " + text
        text = text.replace(" ", SPACE)
        syms = list(text)  # UTF-8 characters (Python str iterates code points)
        n = len(syms)
        prev = list(range(-1, n - 1))
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        alive = [True] * n
        heap: list[tuple[float, int, int, str]] = []  # (-score, left index, right index, merged text)
        vocab, scores = self._piece_to_id, self.scores

        def try_add(left: int, right: int) -> None:
            if left < 0 or right < 0:
                return
            merged = syms[left] + syms[right]
            tok = vocab.get(merged)
            if tok is None:
                return
            heapq.heappush(heap, (-scores[tok], left, right, merged))

        for i in range(1, n):
            try_add(i - 1, i)
        while heap:
            _, left, right, merged = heapq.heappop(heap)
            # stale entry: one side already merged away or changed since the pair was queued
            if not alive[left] or not alive[right] or nxt[left] != right or syms[left] + syms[right] != merged:
                continue
            syms[left] = merged
            alive[right] = False
            nxt[left] = nxt[right]
            if nxt[right] >= 0:
                prev[nxt[right]] = left
            try_add(prev[left], left)
            try_add(left, nxt[left])

        ids: list[int] = []
        i = 0
        while i >= 0 and i < n:
            if alive[i]:
                tok = vocab.get(syms[i])
                if tok is not None:
                    ids.append(tok)
                else:
                    for b in syms[i].encode("utf-8"):
                        ids.append(self._byte_to_id.get(b, self.unk_id))
            i = nxt[i]
        return ids

    # ------------------------------------------------------------------ decode
    def decode(self, ids: Iterable[int]) -> str:
        buf = bytearray()
        for t in ids:
            t = int(t)
            typ = self.types[t]
            if typ == TYPE_NORMAL or typ == TYPE_USER_DEFINED:
                buf += self.pieces[t].replace(SPACE, " ").encode("utf-8")
            elif typ == TYPE_BYTE:
                buf.append(int(self.pieces[t][3:5], 16))
            # CONTROL / UNKNOWN / UNUSED: nothing, as llama.cpp without `special`
        return buf.decode("utf-8", errors="replace")

    # ------------------------------------------------------------------ GGUF
    def add_to_gguf(self, writer: Any) -> None:
        """Write the vocabulary as a llama.cpp SPM ("llama") tokenizer into a gguf.GGUFWriter."""
        writer.add_tokenizer_model("llama")
        writer.add_token_list(self.pieces)
        writer.add_token_scores(self.scores)
        writer.add_token_types(self.types)
        writer.add_bos_token_id(self.bos_id)
        writer.add_eos_token_id(self.eos_id)
        writer.add_unk_token_id(self.unk_id)
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(self.add_eos)
        writer.add_add_space_prefix(self.add_space_prefix)

    @classmethod
    def from_gguf(cls, reader_or_path: GGUFReader | str | Path) -> SPMTokenizer:
        reader = open_gguf(reader_or_path, "model") if isinstance(reader_or_path, (str, Path)) else reader_or_path

        def field(key: str) -> Any:
            return reader.fields.get(key)

        def scalar(key: str, default: Any) -> Any:
            f = field(key)
            if f is None:
                return default
            return f.contents()

        model = scalar("tokenizer.ggml.model", None)
        if model != "llama":
            raise SeedDeltaError(f"tokenizer: GGUF tokenizer.ggml.model is {model!r}, only 'llama' (SPM) is supported")
        pieces = list(field("tokenizer.ggml.tokens").contents())
        n = len(pieces)
        scores = list(scalar("tokenizer.ggml.scores", [0.0] * n))
        types = list(scalar("tokenizer.ggml.token_type", [TYPE_NORMAL] * n))
        return cls(
            pieces, scores, types,
            bos_id=int(scalar("tokenizer.ggml.bos_token_id", 1)),
            eos_id=int(scalar("tokenizer.ggml.eos_token_id", 2)),
            unk_id=int(scalar("tokenizer.ggml.unknown_token_id", 0)),
            # llama.cpp's default for SPM vocabularies is true when the key is absent
            add_space_prefix=bool(scalar("tokenizer.ggml.add_space_prefix", True)),
            add_bos=bool(scalar("tokenizer.ggml.add_bos_token", True)),
            add_eos=bool(scalar("tokenizer.ggml.add_eos_token", False)),
        )


# ---------------------------------------------------------------------- the tiny model's vocabulary

# Characters of the task alphabet (copy payload, digits, template, brackets) — one piece each.
TINY_CHARS = (
    SPACE
    + "abcdefghijklmnopqrstuvwxyz0123456789"
    + "#:+()"
    + "ABCDEGIKLMNOPSTU"
)
# Multi-character pieces for template words. Every one starts with '#' or an upper-case letter, so
# none can form inside a copy payload (lower case, digits, spaces): copying stays per character.
TINY_WORDS = ("###" + SPACE + "TASK", "###" + SPACE + "INPUT", "###" + SPACE + "OUTPUT",
              "IN:" + SPACE, "SUM:" + SPACE, "BAL:" + SPACE, "OK", "BAD")


def tiny_vocab() -> tuple[list[str], list[float], list[int]]:
    """The tiny model's vocabulary: <unk>, <s>, </s>, 256 byte pieces, characters, word pieces.

    Word pieces are reachable by merges because every prefix of length >= 2 is also a piece; the
    scores make longer prefixes merge later (score -len), ties resolved leftmost like llama.cpp.
    """
    pieces = ["<unk>", "<s>", "</s>"]
    scores = [0.0, 0.0, 0.0]
    types = [TYPE_UNKNOWN, TYPE_CONTROL, TYPE_CONTROL]
    for b in range(256):
        pieces.append(byte_piece(b))
        scores.append(0.0)
        types.append(TYPE_BYTE)
    for c in TINY_CHARS:
        pieces.append(c)
        scores.append(-1000.0)
        types.append(TYPE_NORMAL)
    prefixes: list[str] = []
    for w in TINY_WORDS:
        for k in range(2, len(w) + 1):
            if w[:k] not in prefixes:
                prefixes.append(w[:k])
    for p in prefixes:
        pieces.append(p)
        scores.append(-float(len(p)))
        types.append(TYPE_NORMAL)
    assert len(set(pieces)) == len(pieces)
    return pieces, scores, types


def tiny_tokenizer() -> SPMTokenizer:
    pieces, scores, types = tiny_vocab()
    return SPMTokenizer(pieces, scores, types, bos_id=1, eos_id=2, unk_id=0,
                        add_space_prefix=False, add_bos=True, add_eos=False)
