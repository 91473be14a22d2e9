"""Writing outputs: atomic files (temp file in the target's directory + rename) and strict JSON.

One writer for every file the package produces: GGUF files, report.json, the evaluation JSONs,
harness A's report, the demo's summary. JSON never holds NaN/Inf: non-finite numbers become null.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from typing import Any

from seeddelta.errors import SeedDeltaError


def _p(path: str | os.PathLike[str]) -> str:
    return os.fspath(path)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def same_file(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """True if the two paths name the same file (also through symlinks or hard links)."""
    pa, pb = _p(a), _p(b)
    if os.path.exists(pa) and os.path.exists(pb):
        try:
            return os.path.samefile(pa, pb)
        except OSError:
            pass
    return os.path.realpath(pa) == os.path.realpath(pb)


class AtomicOutput:
    """A temporary file in the target's directory, renamed over the target on commit."""

    def __init__(self, target: str | os.PathLike[str], what: str = "output") -> None:
        self.target = _p(target)
        directory = os.path.dirname(os.path.abspath(self.target))
        if not os.path.isdir(directory):
            raise SeedDeltaError(f"{what} directory does not exist: {directory}")
        if os.path.isdir(self.target):
            raise SeedDeltaError(f"{what} {self.target} is a directory")
        try:
            fd, self.tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(self.target) + ".",
                                            suffix=".tmp")
        except OSError as exc:
            raise SeedDeltaError(f"cannot create a file in {directory}: {exc.strerror or exc}") from None
        os.close(fd)
        self.committed = False

    def commit(self) -> None:
        with open(self.tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(self.tmp, 0o666 & ~_umask())
        os.replace(self.tmp, self.target)
        self.committed = True

    def discard(self) -> None:
        if not self.committed:
            try:
                os.unlink(self.tmp)
            except FileNotFoundError:
                pass

    def __enter__(self) -> AtomicOutput:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None and not self.committed:
            self.commit()
        self.discard()


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
    with AtomicOutput(path, what) as out:
        with open(out.tmp, "w", encoding="utf-8", newline="") as fh:  # newlines exactly as given
            fh.write(text)


def write_json_atomic(path: str | os.PathLike[str], obj: Any, what: str = "JSON output") -> None:
    write_text_atomic(path, dumps_strict(obj), what)
