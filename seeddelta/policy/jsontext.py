"""Reading a JSON file so that every problem names its place.

* malformed JSON → `FILE:LINE:COL: malformed JSON: <parser message>` (json.JSONDecodeError's position);
* duplicate keys in one object, `NaN`/`Infinity` and numbers that overflow to infinity are not
  rejected by Python's parser; they are kept as markers (`JSONObject.duplicates`, `NonFinite`)
  so that validation can reject them with their JSON path;
* JSON paths are written `ranges[1].tensors.ffn_down.K`, the form used for provenance too.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Any

from seeddelta.errors import SeedDeltaError


class JSONObject(dict[str, Any]):
    """A JSON object that remembers the keys it saw more than once (the last value is kept)."""

    duplicates: list[str]

    def __init__(self) -> None:
        super().__init__()
        self.duplicates = []


@dataclass(frozen=True)
class NonFinite:
    """A number JSON cannot hold (NaN, Infinity, or a literal that overflows a float)."""

    text: str


def _pairs(pairs: list[tuple[str, Any]]) -> JSONObject:
    obj = JSONObject()
    for key, value in pairs:
        if key in obj and key not in obj.duplicates:
            obj.duplicates.append(key)
        obj[key] = value
    return obj


def _float(text: str) -> float | NonFinite:
    value = float(text)
    return value if math.isfinite(value) else NonFinite(text)


def parse_json_text(text: str, source: str) -> Any:
    """Parse JSON text; a syntax error becomes one SeedDeltaError line `source:LINE:COL: ...`."""
    try:
        return json.loads(text, object_pairs_hook=_pairs, parse_float=_float, parse_constant=NonFinite)
    except json.JSONDecodeError as exc:
        raise SeedDeltaError(f"{source}:{exc.lineno}:{exc.colno}: malformed JSON: {exc.msg}") from None
    except RecursionError:
        raise SeedDeltaError(f"{source}: malformed JSON: nested too deeply") from None
    except ValueError as exc:  # e.g. an integer literal beyond Python's digit limit
        raise SeedDeltaError(f"{source}: malformed JSON: {exc}") from None


def read_json_file(path: str | os.PathLike[str], what: str) -> tuple[bytes, Any]:
    """(raw bytes, parsed value) of a UTF-8 JSON file; every failure is one SeedDeltaError line."""
    p = os.fspath(path)
    if not os.path.exists(p):
        raise SeedDeltaError(f"{what} not found: {p}")
    if os.path.isdir(p):
        raise SeedDeltaError(f"{what} is a directory: {p}")
    try:
        with open(p, "rb") as fh:
            raw = fh.read()
    except OSError as exc:
        raise SeedDeltaError(f"cannot read {what} {p}: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SeedDeltaError(f"{p}: {what} is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    if text.startswith("\ufeff"):
        raise SeedDeltaError(f"{p}:1:1: malformed JSON: UTF-8 byte order mark (save the file without BOM)")
    return raw, parse_json_text(text, p)


def json_type(value: Any) -> str:
    """JSON's name for the type of a parsed value (for messages)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, (float, NonFinite)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def join(path: str, key: str | int) -> str:
    """`path` extended by an object key or an array index."""
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key
