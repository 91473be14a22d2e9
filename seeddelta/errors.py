"""User-facing errors: one clear line, non-zero exit, no traceback (see cli.main)."""

from __future__ import annotations


class SeedDeltaError(Exception):
    """A problem with the user's input or request. The message names the problem and the place."""

    exit_code: int = 2

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code

    def __reduce__(self) -> tuple[type[SeedDeltaError], tuple[str, int]]:
        # pickled with its exit code: a build's worker process raises it, the parent reports it
        return type(self), (str(self), self.exit_code)


class Terminated(BaseException):
    """SIGTERM/SIGHUP arrived (raised by the handler seeddelta.cli installs), so that every `finally`
    and `with` block runs — temporary files are removed — before the process exits 128 + signal."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"signal {signum}")
        self.signum = signum
