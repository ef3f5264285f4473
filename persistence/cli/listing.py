"""`sessions list` streamed: rows are printed page by page as they are read.

The first page is small, so the first line appears at once however long the listing;
later pages are larger, so a long listing costs few queries. Each page follows the
last session shown (list_sessions' `after`): a session that stays as it was appears
once; one written while the listing runs moves to the top, ahead of it, and appears
where the listing had already shown it, or not at all.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Generic, TypeVar

import typer

from persistence import formats
from persistence.cli.streams import carried_json
from persistence.formats import json_text, one_line
from persistence.models import ChatSession, Status
from persistence.storage import SessionStorage

FIRST_PAGE = 100
PAGE = 1000

T = TypeVar("T")


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


class JsonRows(Generic[T]):
    """A JSON array written a page at a time (the same text `json.dumps(indent=2)` gives
    of the whole), each element the document `to_document` makes of an item."""

    def __init__(self, to_document: Callable[[T], Any]) -> None:
        self.to_document = to_document
        self.count = 0

    def add(self, page: Sequence[T]) -> None:
        if not page:
            return
        # The page's array without its brackets: "[\n" + elements + "\n]". One dumps a
        # page, not one an element: 40,000 messages took 1.5 s whole, 2.1 s one by one.
        elements = json_text([self.to_document(item) for item in page])[2:-2]
        typer.echo(carried_json(("[\n" if self.count == 0 else ",\n") + elements), nl=False)
        self.count += len(page)

    def close(self) -> None:
        typer.echo("[]" if self.count == 0 else "\n]")


class TextRows(Generic[T]):
    """A line an item under a title and a header, written a page at a time."""

    def __init__(self, title: str, header: str, line: Callable[[T], str]) -> None:
        self.title = title
        self.header = header
        self.line = line
        self.count = 0

    def add(self, page: Sequence[T]) -> None:
        if not page:
            return
        lines = [self.line(item) for item in page]
        if self.count == 0:
            lines[:0] = [one_line(self.title), self.header]
        typer.echo("\n".join(lines))
        self.count += len(page)


SESSIONS_HEADER = (
    f"{'Session ID':<36}  {'Model':<24}  {'Status':<8}  {'Messages':>8}  Updated (UTC)"
)


def session_line(session: ChatSession) -> str:
    """A listed session on one line, control characters shown visibly (found by attack:
    a model name holding a line break printed a row of its own, a forged id in it)."""
    return (
        f"{one_line(session.session_id):<36}  {one_line(session.model):<24}"
        f"  {session.status:<8}  {session.message_count:>8}"
        f"  {formats.wall_time(session.updated_at)}"
    )
