"""Standard output whose every write is done whole, or fails: so that a reader that
goes away (`persistence search --json | head -c 100`) is noticed; and a closed one
that fails every write, as a full one does."""

from __future__ import annotations

import codecs
import errno
import io
import json
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, TYPE_CHECKING

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


def escape_what_output_cannot_encode() -> None:
    """Makes sys.stdout and sys.stderr write what their encoding cannot (an ASCII or
    Latin-1 locale, PYTHONIOENCODING) as backslash escapes, not fail.

    Found by attack: on such a stdout, `sessions delete caf\u00e9-42` deleted the
    session, then failed printing its summary line (status 1 after the work was done),
    and `sessions show`, `search` and `export` of stored text failed.
    """
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper) and not _carries_all_text(stream):
            stream.reconfigure(errors="backslashreplace")


def carried_json(text: str, stream: IO[str] | None = None) -> str:
    """JSON `text` as `stream` (standard output by default) can carry it: where its
    encoding is not a UTF one, every non-ASCII character as a `\\u` escape, the same
    document to a JSON reader (a backslash escape such as `\\xe9` would not be JSON).
    Lone surrogates (a path's undecodable bytes), which no encoding carries, always:
    found by attack, `backup DIR --json` failed after its work where DIR's name was not
    UTF-8."""
    if text.isascii():
        return text
    if _carries_all_text(sys.stdout if stream is None else stream):
        return _SURROGATE.sub(_json_escape, text)
    return _NON_ASCII.sub(_json_escape, text)


def _json_escape(match: re.Match[str]) -> str:
    return json.dumps(match.group())[1:-1]


_NON_ASCII = re.compile("[^\x00-\x7f]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _carries_all_text(stream: IO[str] | None) -> bool:
    """Whether `stream` encodes every character: a UTF encoding (or no stream)."""
    encoding = getattr(stream, "encoding", None)
    try:
        return encoding is None or codecs.lookup(encoding).name.startswith("utf")
    except LookupError:
        return False


def stdout_closed() -> bool:
    """Whether standard output was closed when the command started."""
    return sys.stdout is None or isinstance(sys.stdout, _ClosedStdout)
