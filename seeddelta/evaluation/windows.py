"""llama-perplexity's windows over a text: tokenize the whole text once, cut it into windows of
n_ctx tokens with BOS first, score the second half of each (see `Windows`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from seeddelta.errors import SeedDeltaError
from seeddelta.runtime.tokenizers import Tokenizer


@dataclass(frozen=True)
class Windows:
    inputs: np.ndarray  # (n_chunk, n_ctx) int64, first token replaced by BOS when the vocab adds BOS
    targets: np.ndarray  # (n_chunk, n_ctx - 1 - first) int64
    n_ctx: int
    first: int
    n_text_tokens: int

    @property
    def n_chunk(self) -> int:
        return int(self.inputs.shape[0])

    @property
    def n_scored(self) -> int:
        return int(self.targets.size)


def make_windows(tokens: Sequence[int] | np.ndarray, n_ctx: int, chunks: int | None = None,
                 bos_id: int | None = None, what: str = "text") -> Windows:
    toks = np.asarray(tokens, dtype=np.int64)
    if n_ctx < 4:
        raise SeedDeltaError(f"context size -c {n_ctx} is too small (need >= 4)")
    if toks.size < 2 * n_ctx:
        raise SeedDeltaError(f"{what} has {toks.size} tokens; llama-perplexity's method needs at least "
                             f"2·n_ctx = {2 * n_ctx} (use a smaller -c or a longer text)")
    n_chunk = toks.size // n_ctx
    if chunks is not None and chunks > 0:
        n_chunk = min(n_chunk, chunks)
    first = n_ctx // 2
    inputs = toks[: n_chunk * n_ctx].reshape(n_chunk, n_ctx).copy()
    targets = inputs[:, first + 1:].copy()
    if bos_id is not None:
        inputs[:, 0] = bos_id
    return Windows(inputs, targets, n_ctx, first, int(toks.size))


def tokenize_text(tokenizer: Tokenizer, text: str) -> list[int]:
    """Tokenize the whole text once, with BOS first when the vocabulary adds BOS (llama-perplexity)."""
    return list(tokenizer.encode(text, add_bos=bool(getattr(tokenizer, "add_bos", True))))


def window_bos(tokenizer: Tokenizer) -> int | None:
    return int(tokenizer.bos_id) if getattr(tokenizer, "add_bos", True) else None


def read_text(path: str | Path) -> str:
    p = Path(path)
    try:
        with open(p, encoding="utf-8", newline="") as f:
            return f.read()
    except FileNotFoundError:
        raise SeedDeltaError(f"text file not found: {p}") from None
    except UnicodeDecodeError as exc:
        raise SeedDeltaError(f"text file {p} is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise SeedDeltaError(f"cannot read text file {p}: {exc.strerror or exc}") from None


class TextWindows(NamedTuple):
    path: Path
    text: str
    tokens: list[int]
    windows: Windows


def text_windows(text_path: Path, n_ctx: int, chunks: int | None, tokenizer: Tokenizer) -> TextWindows:
    """A text file, its tokens and its llama-perplexity windows under `tokenizer`."""
    text = read_text(text_path)
    tokens = tokenize_text(tokenizer, text)
    windows = make_windows(tokens, n_ctx, chunks, window_bos(tokenizer), what=str(text_path))
    return TextWindows(text_path, text, tokens, windows)
