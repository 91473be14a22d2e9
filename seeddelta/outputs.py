"""Writing outputs: the guard every command runs before any work, atomic files (temp file in the
target's directory + rename) and strict JSON.

* `check_paths` — every output against every input and every other output (the same file also
  through symlinks and hard links), output directories existing and writable, and temporary files
  left behind by an interrupted earlier run of the same output removed (or named). Called once per
  command from `seeddelta.cli` with the paths the command declared (`commands.common.add_input`,
  `add_output`), before anything is loaded or computed.
* `AtomicOutput` — one writer for every file the package produces (GGUF files, report.json, the
  evaluation JSONs, harness A's report, the demo's summary). Its temporary file carries the
  writer's process id, so a later run can tell a stale one from one being written right now;
  it is removed on any exception, including the `Terminated` that `seeddelta.cli` raises on
  SIGTERM/SIGHUP, and a full disk becomes one sentence (`write_error`).
* JSON never holds NaN/Inf: non-finite numbers become null.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

from seeddelta.errors import SeedDeltaError

PathArg = tuple[str, "str | os.PathLike[str] | None"]  # (flag as the user typed it, path or None)


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


# ------------------------------------------------------------------------------------ full disk
_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def is_full_disk(exc: OSError) -> bool:
    return exc.errno in _FULL


def _free_bytes(directory: str) -> int | None:
    try:
        return int(shutil.disk_usage(directory).free)
    except OSError:
        return None


def write_error(exc: OSError, path: str | os.PathLike[str], what: str = "output") -> SeedDeltaError:
    """One line for a failed write: a full disk or quota says so in words; anything else names the cause."""
    target = _p(path)
    directory = os.path.dirname(os.path.abspath(target))
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        free = _free_bytes(directory)
        left = f" ({free:,} bytes free there)" if free is not None else ""
        return SeedDeltaError(f"the disk is full: {what} {target} could not be written to {directory}{left}; "
                              "free some space or write it elsewhere (nothing was written)")
    if exc.errno == errno.EFBIG:
        return SeedDeltaError(f"{what} {target} is larger than this file system or your file size limit allows "
                              "(nothing was written)")
    return SeedDeltaError(f"cannot write {what} {target}: {exc.strerror or exc}")


# ------------------------------------------------------------------------------------ temp files
_TMP = re.compile(r"^\.(?P<base>.+)\.(?P<pid>\d+)-[^.]*\.tmp$")
_TMP_NO_PID = re.compile(r"^\.(?P<base>.+)\.[a-z0-9_]{8}\.tmp$")  # written by versions without the pid


def _temp_prefix(target: str) -> str:
    return f".{os.path.basename(target)}.{os.getpid()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def clean_stale_temps(target: str | os.PathLike[str], note: Any = None) -> list[str]:
    """Remove temporary files of `target` left by a run that no longer exists (killed while writing).

    Temporary files carry their writer's pid; a file whose writer is alive is left alone (another
    run is writing the same output right now). Returns the paths removed; `note(text)` hears of each."""
    t = _p(target)
    directory = os.path.dirname(os.path.abspath(t))
    base = os.path.basename(t)
    removed: list[str] = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        path = os.path.join(directory, name)
        m = _TMP.match(name)
        if m is None:
            old = _TMP_NO_PID.match(name)
            if old is not None and old.group("base") == base and note is not None:
                note(f"{path} looks like a temporary file left by an interrupted run; remove it unless another "
                     f"seeddelta is writing {t} right now")
            continue
        if m.group("base") != base or _alive(int(m.group("pid"))):
            continue
        try:
            os.unlink(path)
        except OSError:
            continue
        removed.append(path)
        if note is not None:
            note(f"removed {path}, a temporary file left by an interrupted run")
    return removed


# ------------------------------------------------------------------------------------ the guard
def _writable_dir(flag: str, path: str, directory: str) -> None:
    if not os.path.isdir(directory):
        raise SeedDeltaError(f"{flag} {path}: directory {directory} does not exist")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise SeedDeltaError(f"{flag} {path}: directory {directory} is not writable")


def _creatable_dir(flag: str, path: str) -> None:
    """An output directory: an existing writable directory, or one that can be created."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise SeedDeltaError(f"{flag} {path} is a file, not a directory")
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        raise SeedDeltaError(f"{flag} {path}: {probe} is a file, so the directory cannot be created")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise SeedDeltaError(f"{flag} {path}: directory {probe} is not writable")


def check_paths(inputs: Sequence[PathArg], outputs: Sequence[PathArg], out_dirs: Sequence[PathArg] = (),
                note: Any = None) -> None:
    """Refuse, before any work, outputs that would replace an input or each other, or cannot be written.

    `inputs`/`outputs`/`out_dirs` are (flag, path) pairs; None paths are skipped. Stale temporary files
    of each output are removed (see `clean_stale_temps`)."""
    ins = [(flag, _p(p)) for flag, p in inputs if p is not None and _p(p) != ""]
    outs = [(flag, _p(p)) for flag, p in outputs if p is not None and _p(p) != ""]
    seen: list[tuple[str, str]] = []
    for flag, path in outs:
        if os.path.isdir(path):
            raise SeedDeltaError(f"{flag} {path} is a directory; give a file name")
        for in_flag, in_path in ins:
            if same_file(path, in_path):
                raise SeedDeltaError(f"{flag} {path} is the input {in_flag} {in_path}; inputs are never "
                                     f"overwritten, choose another {flag}")
        for other_flag, other in seen:
            if same_file(path, other):
                raise SeedDeltaError(f"{flag} and {other_flag} both name {path}; give each output its own file")
        _writable_dir(flag, path, os.path.dirname(os.path.abspath(path)))
        seen.append((flag, path))
    for flag, path in [(f, _p(p)) for f, p in out_dirs if p is not None]:
        _creatable_dir(flag, path)
    for _flag, path in outs:
        clean_stale_temps(path, note)


# ------------------------------------------------------------------------------------ atomic files
class AtomicOutput:
    """A temporary file in the target's directory, renamed over the target on commit."""

    def __init__(self, target: str | os.PathLike[str], what: str = "output") -> None:
        self.target = _p(target)
        self.what = what
        directory = os.path.dirname(os.path.abspath(self.target))
        if not os.path.isdir(directory):
            raise SeedDeltaError(f"{what} directory does not exist: {directory}")
        if os.path.isdir(self.target):
            raise SeedDeltaError(f"{what} {self.target} is a directory")
        try:
            fd, self.tmp = tempfile.mkstemp(dir=directory, prefix=_temp_prefix(self.target), suffix=".tmp")
        except OSError as exc:
            raise SeedDeltaError(f"cannot create a file in {directory}: {exc.strerror or exc}") from None
        os.close(fd)
        self.committed = False

    def commit(self) -> None:
        try:
            with open(self.tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            os.chmod(self.tmp, 0o666 & ~_umask())
            os.replace(self.tmp, self.target)
        except OSError as exc:
            self.discard()
            raise write_error(exc, self.target, self.what) from None
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
        try:
            if exc_type is None and not self.committed:
                self.commit()
        finally:
            self.discard()
        if isinstance(exc, OSError) and exc.errno in _FULL:  # the disk filled up while writing: one sentence
            raise write_error(exc, self.target, self.what) from None


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


def stderr_note(text: str) -> None:
    print(f"note: {text}", file=sys.stderr, flush=True)
