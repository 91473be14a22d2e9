"""Atomic output (temp file in the target's directory + rename) and strict JSON (never NaN/Inf).

One writer for every text the package produces: report.json, the evaluation JSONs, harness A's
report, the demo's summary. Non-finite numbers become null, so a reader never meets `NaN`.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any


def finite_or_null(value: Any) -> Any:
    """`value` with every non-finite float replaced by None and numpy scalars made plain."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy scalar
        return finite_or_null(value.item())
    return value


def dumps_strict(obj: Any) -> str:
    """JSON text: 2-space indent, key order kept, UTF-8 as is, non-finite numbers as null."""
    return json.dumps(finite_or_null(obj), indent=2, allow_nan=False, ensure_ascii=False) + "\n"


def write_text_atomic(path: str | os.PathLike[str], text: str, what: str = "output") -> None:
    """Write `text` (UTF-8) so that `path` holds either its old content or all of the new one."""
    from seeddelta.gguf_io import AtomicOutput

    with AtomicOutput(path, what) as out:
        with open(out.tmp, "w", encoding="utf-8") as fh:
            fh.write(text)


def write_json_atomic(path: str | os.PathLike[str], obj: Any, what: str = "JSON output") -> None:
    write_text_atomic(path, dumps_strict(obj), what)
