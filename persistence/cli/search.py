"""`persistence search QUERY`: the messages a person's words find, newest first."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

import typer

from persistence import formats
from persistence.cli.listing import JsonRows, TextRows
from persistence.cli.output import (
    MAX_LIMIT,
    ConfigOption,
    JsonOption,
    Target,
    UrlOption,
    VerboseOption,
    run,
)
from persistence.config import StorageConfig
from persistence.formats import one_line, visible
from persistence.models import ChatMessage
from persistence.storage import SessionStorage

# Characters of a message shown in a row; --json prints the whole content.
_EXCERPT = 120


class RoleChoice(StrEnum):
    user = "user"
    assistant = "assistant"
    system = "system"
    tool = "tool"


def _excerpt(content: str) -> str:
    """The start of `content` on one line: its whitespace runs one space, its controls
    escaped, cut to _EXCERPT characters. Made of a prefix of it, longer only while the
    prefix gives too few (found by attack: made of the whole content, a row of a 16 MB
    message took 212 MB and 1.3 s). The line of a prefix is a prefix of the line."""
    size = 4 * _EXCERPT
    while True:
        part = content[:size]
        line = visible(" ".join(part.split()))
        if len(line) > _EXCERPT or len(part) == len(content):
            break
        size *= 4
    # "...", not "…": found by attack, an output that is not UTF-8 (PYTHONIOENCODING=ascii,
    # the C locale) failed on the ellipsis though every stored character was ASCII.
    return line if len(line) <= _EXCERPT else line[: _EXCERPT - 3] + "..."


FOUND_HEADER = f"{'Created (UTC)':<19}  {'Session ID':<36}  {'Role':<9}  Content"
# Matches printed at a time.
_PAGE = 1000


def found_line(message: ChatMessage) -> str:
    """A match on one line: the whole session id, however long (`sessions show` needs
    it), and the start of the content."""
    return (
        f"{formats.wall_time(message.created_at):<19}  {one_line(message.session_id):<36}"
        f"  {message.role:<9}  {_excerpt(message.content)}"
    )


def search(
    ctx: typer.Context,
    query: Annotated[str, typer.Argument(help="Words to find; each begins a word of a match.")],
    session: Annotated[
        str | None, typer.Option("--session", help="Only messages of this session.")
    ] = None,
    role: Annotated[
        RoleChoice | None,
        typer.Option(case_sensitive=False, help="Only messages of this role."),
    ] = None,
    limit: Annotated[
        int, typer.Option(min=1, max=MAX_LIMIT, help="How many messages to show.")
    ] = 20,
    as_json: JsonOption = False,
    config: ConfigOption = None,
    url: UrlOption = None,
    verbose: VerboseOption = 0,
) -> None:
    """Search message content, newest first (the rule of the README's Search section)."""

    async def work(storage: SessionStorage, cfg: StorageConfig, target: Target) -> None:
        # Lines, a page at a time as each is found (iter_search_messages), as `sessions
        # list` prints. Found by attack: a rich table of 40,000 matches took 16 s and
        # 310 MB before its first line; then all matches were read before the first.
        rows: JsonRows[ChatMessage] | TextRows[ChatMessage] = (
            JsonRows(formats.message_document)
            if as_json
            else TextRows(f"Messages matching {query!r}", FOUND_HEADER, found_line)
        )
        # One more than asked: "more may match" only when there is more.
        pages = storage.iter_search_messages(
            query, _PAGE, session_id=session, role=role.value if role else None, limit=limit + 1
        )
        more = False
        async for page in pages:
            shown = page[: limit - rows.count]
            more = len(shown) < len(page)
            rows.add(shown)
        if isinstance(rows, JsonRows):
            rows.close()
        elif rows.count == 0:
            typer.echo("No messages found.")
        elif more:
            typer.echo(f"More may match: --limit {limit * 2}")

    run(ctx, (config, url, verbose), work, must_exist=True, read_only=True)


def register(app: typer.Typer) -> None:
    """Adds `search` to the application."""
    app.command()(search)
