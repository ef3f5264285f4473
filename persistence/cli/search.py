"""`persistence search QUERY`: the messages a person's words find, newest first."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from persistence import formats
from persistence.cli.output import (
    MAX_LIMIT,
    ConfigOption,
    JsonOption,
    Target,
    UrlOption,
    VerboseOption,
    echo_json,
    out,
    run,
)
from persistence.config import StorageConfig
from persistence.formats import visible
from persistence.storage import SessionStorage

# Characters of a message shown in the table; --json prints the whole content.
_EXCERPT = 120
# The longest session id the table keeps on one line (a uuid has 36 characters).
_WHOLE_ID = 48


class RoleChoice(StrEnum):
    user = "user"
    assistant = "assistant"
    system = "system"
    tool = "tool"


def _excerpt(content: str) -> str:
    # "...", not "…": found by attack, an output that is not UTF-8 (PYTHONIOENCODING=ascii,
    # the C locale) failed on the ellipsis though every stored character was ASCII.
    line = visible(" ".join(content.split()))
    return line if len(line) <= _EXCERPT else line[: _EXCERPT - 3] + "..."


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
        found = await storage.search_messages(
            query, limit + 1, session_id=session, role=role.value if role else None
        )
        more, found = len(found) > limit, found[:limit]
        if as_json:
            echo_json([formats.message_document(message) for message in found])
            return
        if not found:
            out().print("No messages found.")
            return
        table = Table(title=visible(f"Messages matching {query!r}"), title_justify="left")
        ids = [formats.one_line(message.session_id) for message in found]
        # Ids of up to _WHOLE_ID characters on one line; longer ones fold. Found by
        # attack: one id of 151 characters left Role and Content no width in any row.
        whole = max(map(len, ids)) <= _WHOLE_ID
        table.add_column("Created (UTC)", no_wrap=True)
        table.add_column(
            "Session ID", no_wrap=whole, overflow="fold", max_width=None if whole else _WHOLE_ID
        )
        table.add_column("Role")
        table.add_column("Content", overflow="fold")
        for message, shown_id in zip(found, ids, strict=True):
            table.add_row(
                formats.wall_time(message.created_at),
                Text(shown_id),
                message.role,
                Text(_excerpt(message.content)),
            )
        console = out()
        console.print(table)
        if more:
            console.print(f"More may match: --limit {limit * 2}")

    run(ctx, (config, url, verbose), work, must_exist=True, read_only=True)


def register(app: typer.Typer) -> None:
    """Adds `search` to the application."""
    app.command()(search)
