"""The tiny model's dataset: three verifiable tasks in the original's text template.

Every sample is

    ### TASK\\n<task>\\n### INPUT\\n<input line>\\n### OUTPUT\\n<answer>\\n

with tasks ``copy`` (``IN: s``, 8–32 characters of ``a–z0–9`` and space, no leading/trailing space),
``sum`` (``SUM: a+b``, a, b in 0…999, answer ``str(a+b)``) and ``brackets`` (``BAL: s``, s of
``()`` with length 6–20, answer ``OK`` iff balanced, else ``BAD``; balanced strings are drawn
explicitly and uniformly among balanced strings of their length, so the classes are ~50/50).

Splits: validation and test are drawn from their own seeded streams, deduplicated (no text appears
twice or in both); the training stream is infinite, deterministic in (seed, step), and skips every
validation/test text.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from seeddelta.assets import TINY_TEST_PACK, TINY_VAL_TEXT
from seeddelta.outputs import write_text_atomic

TASKS = ("copy", "sum", "brackets")
COPY_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789 "
VAL_FILE = "val.txt"
TEST_FILE = "test.jsonl"

DEFAULT_SEED = 20261123
VAL_SAMPLES = 720          # ≈ 27k tokens: ≥ 8 windows at ctx 2048 (checked by a test)
TEST_PER_TASK = 100


@dataclass(frozen=True)
class Sample:
    task: str
    input_line: str
    answer: str

    @property
    def prompt(self) -> str:
        return f"### TASK\n{self.task}\n### INPUT\n{self.input_line}\n### OUTPUT\n"

    @property
    def text(self) -> str:
        return f"{self.prompt}{self.answer}\n"


@dataclass(frozen=True)
class TestRecord:
    id: str
    task: str
    prompt: str
    answer: str


# ---------------------------------------------------------------------- labels
def brackets_balanced(s: str) -> bool:
    depth = 0
    for c in s:
        depth += 1 if c == "(" else -1
        if depth < 0:
            return False
    return depth == 0


@cache
def _completions(remaining: int, depth: int) -> int:
    """Number of ways to finish a bracket string with `remaining` characters from `depth` to 0."""
    if depth < 0 or depth > remaining:
        return 0
    if remaining == 0:
        return 1
    return _completions(remaining - 1, depth + 1) + _completions(remaining - 1, depth - 1)


def _random_balanced(rng: random.Random, n: int) -> str:
    """Uniform draw among the balanced strings of even length n (counting completions)."""
    out, depth = [], 0
    for pos in range(n):
        rem = n - pos - 1
        w_open = _completions(rem, depth + 1)
        w_close = _completions(rem, depth - 1)
        if rng.randrange(w_open + w_close) < w_open:
            out.append("(")
            depth += 1
        else:
            out.append(")")
            depth -= 1
    return "".join(out)


def _random_unbalanced(rng: random.Random) -> str:
    """Half hard negatives (a balanced string with two adjacent characters swapped or one flipped),
    half uniform strings of length 6–20 that are not balanced."""
    if rng.random() < 0.5:
        n = rng.randrange(6, 21, 2)
        s = list(_random_balanced(rng, n))
        if rng.random() < 0.5:
            i = rng.randrange(n)
            s[i] = ")" if s[i] == "(" else "("
        else:
            # swap an adjacent "()" into ")(" — keeps the count, breaks the prefix condition
            idx = [i for i in range(n - 1) if s[i] == "(" and s[i + 1] == ")"]
            i = rng.choice(idx)
            s[i], s[i + 1] = ")", "("
        cand = "".join(s)
        if not brackets_balanced(cand):
            return cand
    while True:
        n = rng.randint(6, 20)
        cand = "".join(rng.choice("()") for _ in range(n))
        if not brackets_balanced(cand):
            return cand


def make_sample(rng: random.Random, task: str) -> Sample:
    if task == "copy":
        n = rng.randint(8, 32)
        inner = "".join(rng.choice(COPY_ALPHABET) for _ in range(n - 2))
        edge = COPY_ALPHABET[:-1]
        s = rng.choice(edge) + inner + rng.choice(edge)
        return Sample("copy", f"IN: {s}", s)
    if task == "sum":
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        return Sample("sum", f"SUM: {a}+{b}", str(a + b))
    if task == "brackets":
        if rng.random() < 0.5:
            s = _random_balanced(rng, rng.randrange(6, 21, 2))
        else:
            s = _random_unbalanced(rng)
        return Sample("brackets", f"BAL: {s}", "OK" if brackets_balanced(s) else "BAD")
    raise ValueError(f"unknown task {task!r}")


# ---------------------------------------------------------------------- splits
def _split_rng(seed: int, split: str) -> random.Random:
    return random.Random(f"seeddelta-tiny/{seed}/{split}")


def make_heldout(seed: int = DEFAULT_SEED, n_val: int = VAL_SAMPLES,
                 n_test_per_task: int = TEST_PER_TASK) -> tuple[list[Sample], list[Sample]]:
    """Validation (tasks in turn) and test (n per task) samples; no text repeats within or across."""
    seen: set[str] = set()
    test: list[Sample] = []
    rng = _split_rng(seed, "test")
    for task in TASKS:
        k = 0
        while k < n_test_per_task:
            s = make_sample(rng, task)
            if s.text in seen:
                continue
            seen.add(s.text)
            test.append(s)
            k += 1
    val: list[Sample] = []
    rng = _split_rng(seed, "val")
    while len(val) < n_val:
        s = make_sample(rng, TASKS[len(val) % 3])
        if s.text in seen:
            continue
        seen.add(s.text)
        val.append(s)
    return val, test


def train_samples(seed: int, step: int, heldout: set[str],
                  task_weights: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> Iterator[Sample]:
    """Infinite deterministic stream of training samples for one step; held-out texts are skipped."""
    rng = _split_rng(seed, f"train/{step}")
    while True:
        task = rng.choices(TASKS, weights=task_weights)[0]
        s = make_sample(rng, task)
        if s.text in heldout:
            continue
        yield s


# ---------------------------------------------------------------------- shipped files
def write_heldout(outdir: Path, seed: int = DEFAULT_SEED) -> tuple[Path, Path]:
    """Write val.txt (concatenated validation texts) and test.jsonl; returns the two paths."""
    outdir.mkdir(parents=True, exist_ok=True)
    val, test = make_heldout(seed)
    val_path, test_path = outdir / VAL_FILE, outdir / TEST_FILE
    write_text_atomic(val_path, "".join(s.text for s in val))
    counters = dict.fromkeys(TASKS, 0)
    lines = []
    for s in test:
        rid = f"{s.task}-{counters[s.task]:03d}"
        counters[s.task] += 1
        lines.append(json.dumps({"id": rid, "task": s.task, "prompt": s.prompt, "answer": s.answer},
                                ensure_ascii=True) + "\n")
    write_text_atomic(test_path, "".join(lines))
    return val_path, test_path


def load_test_pack(path: Path | str | None = None) -> list[TestRecord]:
    """The shipped test pack (or another file in its format) as (id, task, prompt, answer) records."""
    p = Path(path) if path is not None else TINY_TEST_PACK
    out = []
    with open(p, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                d = json.loads(line)
                out.append(TestRecord(d["id"], d["task"], d["prompt"], d["answer"]))
    return out


def load_val_text(path: Path | str | None = None) -> str:
    p = Path(path) if path is not None else TINY_VAL_TEXT
    with open(p, encoding="utf-8", newline="") as f:
        return f.read()


def heldout_texts(seed: int = DEFAULT_SEED) -> set[str]:
    val, test = make_heldout(seed)
    return {s.text for s in val} | {s.text for s in test}
