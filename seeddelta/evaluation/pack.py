"""Greedy task packs: JSON lines with `id`, `task`, `prompt` and `answer` (all strings), read strictly.

A malformed line, a missing or non-string field, an empty prompt or a repeated id is one error
naming the file and the line (`pack.jsonl:12: ...`), never a record silently skipped or coerced.
Blank lines are allowed; other keys are ignored. Light module (no torch): the CLI reads defaults here.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from seeddelta.errors import SeedDeltaError

DEFAULT_MAX_NEW = 48
DEFAULT_TOLERANCE = 0.05
FIELDS = ("id", "task", "prompt", "answer")


@dataclass(frozen=True)
class PackItem:
    id: str
    task: str
    prompt: str
    answer: str


def limit_per_task(items: Sequence[PackItem], n: int) -> list[PackItem]:
    """The first n prompts of each task (all with n <= 0), in pack order."""
    if n <= 0:
        return list(items)
    seen: dict[str, int] = {}
    out = []
    for it in items:
        if seen.get(it.task, 0) < n:
            out.append(it)
            seen[it.task] = seen.get(it.task, 0) + 1
    return out


def load_pack(path: str | Path | None = None) -> list[PackItem]:
    """A pack in the tiny test-pack format (default: the tiny model's held-out test pack)."""
    from seeddelta.assets import tiny_test_pack

    p = Path(path) if path is not None else tiny_test_pack()
    if not p.is_file():
        raise SeedDeltaError(f"pack file not found: {p}")
    try:
        with open(p, encoding="utf-8") as fh:
            lines = fh.read().splitlines()
    except UnicodeDecodeError as exc:
        raise SeedDeltaError(f"pack {p} is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise SeedDeltaError(f"cannot read pack {p}: {exc.strerror or exc}") from None
    items: list[PackItem] = []
    first_line: dict[str, int] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"pack {p}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SeedDeltaError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(record, dict):
            raise SeedDeltaError(f"{where}: expected a JSON object with {', '.join(FIELDS)}, "
                                 f"got {type(record).__name__}")
        for key in FIELDS:
            if key not in record:
                raise SeedDeltaError(f"{where}: field {key!r} is missing")
            if not isinstance(record[key], str):
                raise SeedDeltaError(f"{where}: field {key!r} must be a string, got "
                                     f"{json.dumps(record[key])[:40]} ({type(record[key]).__name__})")
        if not record["prompt"]:
            raise SeedDeltaError(f"{where}: field 'prompt' is empty")
        if record["id"] in first_line:
            raise SeedDeltaError(f"{where}: id {record['id']!r} repeats line {first_line[record['id']]}")
        first_line[record["id"]] = number
        items.append(PackItem(record["id"], record["task"], record["prompt"], record["answer"]))
    if not items:
        raise SeedDeltaError(f"pack {p} has no prompts")
    return items
