"""Standard output whose every write is done whole, or fails: so that a reader that
goes away (`persistence search --json | head -c 100`) is noticed; and a closed one
that fails every write, as a full one does."""

from __future__ import annotations

import errno
import io
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer


class _WholeWrites(io.BufferedIOBase):
    """A file descriptor whose every write is done whole, or raises."""

    def __init__(self, descriptor: int) -> None:
        super().__init__()
        self._descriptor = descriptor

    @property
    def name(self) -> str:
        return "<stdout>"

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._descriptor

    def write(self, data: ReadableBuffer) -> int:
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            done += os.write(self._descriptor, view[done:])
        return done


@contextmanager
def whole_writes() -> Iterator[None]:
    """Makes sys.stdout finish every write, or raise, while the command runs.

    Found by attack: with PYTHONUNBUFFERED (or `python -u`), sys.stdout writes to its
    raw file, and a write the pipe took only part of (its reader gone) was dropped
    without an error: `search --json | head -c 100` exited 0. A buffered stdout
    already finishes its writes.
    """
    stdout = sys.stdout
    if stdout is None or not isinstance(getattr(stdout, "buffer", None), io.RawIOBase):
        yield
        return
    stdout.flush()
    whole = io.TextIOWrapper(
        _WholeWrites(stdout.fileno()),
        encoding=stdout.encoding,
        errors=stdout.errors,
        line_buffering=bool(stdout.line_buffering),
        write_through=True,
    )
    sys.stdout = whole
    try:
        yield
    finally:
        sys.stdout = stdout
        whole.detach()  # leaves the descriptor open: it is stdout's


STDOUT_CLOSED = "standard output is closed: nowhere to write the result (send it to /dev/null)"


class StdoutClosedError(OSError):
    """A write to standard output closed when the command started (`>&-`)."""

    def __str__(self) -> str:
        return STDOUT_CLOSED


class _ClosedStdout(io.TextIOBase):
    """What sys.stdout is when standard output was closed at start (Python leaves it
    None): every write raises StdoutClosedError."""

    encoding = "utf-8"

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        raise StdoutClosedError(errno.EBADF, STDOUT_CLOSED)


def closed_stdout_fails() -> None:
    """Makes writes to a closed standard output fail, not vanish.

    Found by attack: click's echo writes nothing to a None sys.stdout, so
    `persistence --help >&-` printed nothing and exited 0.
    """
    if sys.stdout is None:
        sys.stdout = _ClosedStdout()


def stdout_closed() -> bool:
    """Whether standard output was closed when the command started."""
    return sys.stdout is None or isinstance(sys.stdout, _ClosedStdout)
