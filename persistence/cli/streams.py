"""Standard output whose every write is done whole, or fails: so that a reader that
goes away (`persistence search --json | head -c 100`) is noticed."""

from __future__ import annotations

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
