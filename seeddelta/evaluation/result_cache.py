"""Results of long evaluation steps cached on disk, so an interrupted run resumes where it stopped.

One JSON file per result under a directory, named by the step and a key: the sha256 of the
step's settings together with the run's context (the model's sha256, the evaluation text's
tokens, …) and a fingerprint of the seeddelta source code — a result is reused only when the
same code measured the same thing, so editing the codec never serves stale figures.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

from seeddelta.outputs import write_json_atomic

PACKAGE_DIR = Path(__file__).resolve().parent.parent
# Sources that cannot change a cached figure: command-line parsing, tests' helpers, harness A, the plots,
# and the regress suite's planning and analysis (what to measure is part of every cache key already;
# how a measurement is made — regress/measure.py, codec, builder, runtime, evaluation — is fingerprinted);
# the v1 experiments (v1/) only choose what to measure (their specs are the keys) and analyse the results.
NOT_MEASURING = ("commands/", "testing/", "harness_a/", "cli.py", "evaluation/plots.py", "regress/report.py",
                 "regress/suite.py", "regress/units.py", "regress/presets.py", "regress/criteria.py",
                 "regress/stats.py", "v1/")


@lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """sha256 over the seeddelta package's Python sources that take part in measuring (path and
    bytes, sorted by path)."""
    h = hashlib.sha256()
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        rel = path.relative_to(PACKAGE_DIR).as_posix()
        if not rel.startswith(NOT_MEASURING):
            h.update(rel.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def settings_key(*parts: Any) -> str:
    """A stable key of JSON-able parts."""
    text = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:20]


class ResultCache:
    """Step results under `directory`, valid for one `context` (e.g. model sha256 + text + windows)."""

    def __init__(self, directory: Path, context: Mapping[str, Any], *, enabled: bool = True) -> None:
        self.directory = directory
        self.context = dict(context)
        self.enabled = enabled
        self.hits = 0
        self.misses = 0

    def _path(self, step: str, settings: Any) -> Path:
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", step)[:60]
        return self.directory / f"{safe}-{settings_key(self.context, code_fingerprint(), step, settings)}.json"

    def get(self, step: str, settings: Any) -> dict[str, Any] | None:
        if not self.enabled:
            return None
        path = self._path(step, settings)
        try:
            value = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            self.misses += 1
            return None
        if not isinstance(value, dict) or value.get("settings") != json.loads(json.dumps(settings, default=str)):
            self.misses += 1
            return None
        self.hits += 1
        return dict(value["result"])

    def put(self, step: str, settings: Any, result: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self._path(step, settings), {"step": step, "settings": settings, "result": dict(result)})
