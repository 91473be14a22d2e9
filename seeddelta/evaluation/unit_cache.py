"""Unit results cached on disk, keyed by everything that determines them.

A *unit evaluation* is a pure function: (model file, the tensors encoded and their K, the encoding
flags, the evaluation settings) → figures. Its **key** is the SHA-256 of a canonical JSON of
exactly those inputs — the model and text by their SHA-256, an imatrix by its SHA-256, never by
path — plus this package's version (a new version may compute differently). Thread counts and
file names are not part of it: they do not change the result.

    spec = unit_spec(model_sha256=..., unit=[(3, "ffn_gate", 32)], encoding={...}, evaluation={...})
    key = unit_key(spec)
    cache = UnitCache(directory)
    result = cache.get(key)            # None when absent (or unreadable: recomputed, never trusted)
    cache.put(key, spec, result)       # atomic: a crash leaves the old entry or none

Entries are one JSON file each (`<dir>/<key[:2]>/<key>.json`, holding the spec, so a cache
directory explains itself), so any number of processes — or machines sharing the directory — can
fill one cache; two writers of the same key write the same content. A scan or an autogate run
that is interrupted resumes by reading what is already there.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from seeddelta import __version__
from seeddelta.errors import SeedDeltaError
from seeddelta.outputs import finite_or_null, write_json_atomic

CACHE_FORMAT = 2  # 2: unit files visit every layer (file_bytes as `build --policy`)
ENV_VAR = "SEEDDELTA_CACHE"


def default_cache_dir() -> Path:
    """$SEEDDELTA_CACHE, else $XDG_CACHE_HOME/seeddelta/units, else ~/.cache/seeddelta/units."""
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "seeddelta" / "units"


def canonical_json(obj: Any) -> str:
    """Sorted keys, no whitespace, plain numbers: equal inputs give equal text."""
    return json.dumps(finite_or_null(obj), sort_keys=True, separators=(",", ":"), allow_nan=False, ensure_ascii=True)


def unit_spec(*, model_sha256: str, unit: Iterable[tuple[int, str, int]], encoding: Mapping[str, Any],
              evaluation: Mapping[str, Any]) -> dict[str, Any]:
    """The inputs that determine a unit's figures. `unit`: (layer, kind, K) of every tensor encoded
    (order does not matter); `encoding`: the build flags that change the encoded tensors;
    `evaluation`: what is measured and how (text hash, ctx, chunks, runtime, greedy settings)."""
    return {
        "format": CACHE_FORMAT,
        "seeddelta_py_version": __version__,
        "model_sha256": model_sha256,
        "unit": sorted([int(layer), str(kind), int(K)] for layer, kind, K in unit),
        "encoding": dict(encoding),
        "evaluation": dict(evaluation),
    }


def unit_key(spec: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical_json(spec).encode("ascii")).hexdigest()


class UnitCache:
    """A directory of cached unit results; `UnitCache(None)` caches nothing."""

    def __init__(self, directory: str | os.PathLike[str] | None) -> None:
        self.directory = Path(directory) if directory is not None else None
        if self.directory is not None:
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise SeedDeltaError(f"cannot use cache directory {self.directory}: {exc.strerror or exc}") from None
            if not os.access(self.directory, os.W_OK):
                raise SeedDeltaError(f"cache directory is not writable: {self.directory}")

    def path(self, key: str) -> Path | None:
        return None if self.directory is None else self.directory / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        """The cached result, or None (absent, unreadable, or written for other inputs)."""
        path = self.path(key)
        if path is None or not path.is_file():
            return None
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(doc, dict) or doc.get("key") != key or unit_key(doc.get("spec", {})) != key:
            return None
        result = doc.get("result")
        return result if isinstance(result, dict) else None

    def put(self, key: str, spec: Mapping[str, Any], result: Mapping[str, Any]) -> None:
        path = self.path(key)
        if path is None:
            return
        if unit_key(spec) != key:
            raise ValueError("cache key does not match its spec")
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, {"key": key, "spec": dict(spec), "result": dict(result)}, "cache entry")
