"""File checks shared by tests: proof that an input was left untouched."""

from __future__ import annotations

import os
import stat


def file_fingerprint(path: str | os.PathLike[str]) -> tuple[int, int, int]:
    """(size, mtime_ns, inode) — equal before and after a command proves it did not touch the file."""
    st = os.stat(os.fspath(path))
    return st.st_size, st.st_mtime_ns, st.st_ino if stat.S_ISREG(st.st_mode) else 0
