"""`sessions list` streamed: rows are printed page by page as they are read.

The first page is small, so the first line appears at once however long the listing;
later pages are larger, so a long listing costs few queries. Each page follows the
last session shown (list_sessions' `after`): a session that stays as it was appears
once; one written while the listing runs moves to the top, ahead of it, and appears
where the listing had already shown it, or not at all.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import typer

from persistence import formats
from persistence.formats import json_text, one_line
from persistence.models import ChatSession, Status
from persistence.storage import SessionStorage

FIRST_PAGE = 100
PAGE = 1000


async def newest_first(
    storage: SessionStorage, status: Status | None, limit: int, offset: int
) -> AsyncIterator[list[ChatSession] | bool]:
    """Yields pages of at most `limit` sessions in all, then whether more follow.

    Each page after the first follows the last session shown (list_sessions' `after`).
    Found by attack: paged by offset, a listing of 3,000 sessions of which 50 older
    ones were written meanwhile showed 50 sessions twice and never showed those 50.
    """
    shown, size, last = 0, FIRST_PAGE, None
    while True:
        want = min(size, limit - shown)
        # One more than asked: "more follow" only when there is more.
        page = await storage.list_sessions(
            status=status, limit=want + 1, offset=offset if last is None else 0, after=last
        )
        more = len(page) > want
        if page[:want]:
            yield page[:want]
            last = page[min(len(page), want) - 1]
        shown += min(len(page), want)
        if not more or shown >= limit:
            yield more
            return
        size = PAGE


def session_row(session: ChatSession) -> dict[str, Any]:
    """A listed session as JSON: the export document without its messages."""
    document = formats.session_document(session)
    document.pop("messages")
    return document


class JsonRows:
    """A JSON array written element by element (the same text `json.dumps(indent=2)` gives)."""

    def __init__(self) -> None:
        self.count = 0

    def add(self, session: ChatSession) -> None:
        text = json_text(session_row(session))
        # Split at "\n" only: json.dumps escapes it inside strings but leaves U+2028,
        # U+2029 and U+0085 raw, at which str.splitlines() would split a value.
        indented = "\n".join("  " + line for line in text.split("\n"))
        typer.echo(("[\n" if self.count == 0 else ",\n") + indented, nl=False)
        self.count += 1

    def close(self) -> None:
        typer.echo("[]" if self.count == 0 else "\n]")


class TextRows:
    """Aligned plain-text rows under a heading, control characters shown visibly."""

    HEADER = f"{'Session ID':<36}  {'Model':<24}  {'Status':<8}  {'Messages':>8}  Updated (UTC)"

    def __init__(self, where: str) -> None:
        self.where = where
        self.count = 0

    def add(self, session: ChatSession) -> None:
        if self.count == 0:
            typer.echo(one_line(f"Sessions in {self.where}"))
            typer.echo(self.HEADER)
        typer.echo(
            # One line a session (found by attack: a model name holding a line break
            # printed a row of its own, a forged session id in it).
            f"{one_line(session.session_id):<36}  {one_line(session.model):<24}"
            f"  {session.status:<8}  {session.message_count:>8}"
            f"  {formats.wall_time(session.updated_at)}"
        )
        self.count += 1
