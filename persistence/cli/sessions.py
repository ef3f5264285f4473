"""`persistence sessions list|show` and `persistence export`: looking at stored sessions."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator, Sequence
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.control import strip_control_codes
from rich.text import Span, Text

from persistence import formats
from persistence.cli.listing import (
    SESSIONS_HEADER,
    JsonRows,
    TextRows,
    newest_first,
    session_line,
    session_row,
)
from persistence.cli.output import (
    MAX_LIMIT,
    MAX_OFFSET,
    STDIO,
    ConfigOption,
    JsonOption,
    Target,
    UrlOption,
    VerboseOption,
    fail,
    out,
    output_path,
    refuse_store_file,
    run,
    say,
)
from persistence.cli.streams import carried_json
from persistence.config import StorageConfig
from persistence.formats import visible
from persistence.manager import SessionManager
from persistence.models import ChatMessage, ChatSession
from persistence.storage import SessionStorage
from persistence.transfer.files import write_text

sessions_app = typer.Typer(
    help="List, show, archive and delete stored sessions.", no_args_is_help=True
)


@sessions_app.callback()
def sessions_options(
    ctx: typer.Context,
    config: ConfigOption = None,
    url: UrlOption = None,
    verbose: VerboseOption = 0,
) -> None:
    """List, show, archive and delete stored sessions.

    --config, --url and -v work before `sessions`, after it, or after the command.
    """
    ctx.obj = (ctx.find_object(Target) or Target()).merged(config, url, verbose)


class StatusChoice(StrEnum):
    active = "active"
    archived = "archived"
    expired = "expired"


class FormatChoice(StrEnum):
    json = "json"
    text = "text"
    markdown = "markdown"


@sessions_app.command("list")
def sessions_list(
    ctx: typer.Context,
    status: Annotated[
        StatusChoice | None,
        typer.Option(case_sensitive=False, help="Only sessions with this status."),
    ] = None,
    limit: Annotated[
        int, typer.Option(min=1, max=MAX_LIMIT, help="How many sessions to show.")
    ] = 20,
    offset: Annotated[
        int, typer.Option(min=0, max=MAX_OFFSET, help="How many to skip (newest first).")
    ] = 0,
    as_json: JsonOption = False,
    config: ConfigOption = None,
    url: UrlOption = None,
    verbose: VerboseOption = 0,
) -> None:
    """List sessions, most recently updated first."""

    async def work(storage: SessionStorage, cfg: StorageConfig, target: Target) -> None:
        rows: JsonRows[ChatSession] | TextRows[ChatSession] = (
            JsonRows(session_row)
            if as_json
            else TextRows(f"Sessions in {cfg.display_url}", SESSIONS_HEADER, session_line)
        )
        more = False
        async for page in newest_first(
            storage, status.value if status else None, limit=limit, offset=offset
        ):
            if isinstance(page, bool):
                more = page  # the last item
                continue
            rows.add(page)
        if isinstance(rows, JsonRows):
            rows.close()
        elif rows.count == 0:
            typer.echo("No sessions." if offset == 0 else "No sessions at this offset.")
        elif more:
            typer.echo(f"More follow: --offset {offset + limit}")

    run(ctx, (config, url, verbose), work, must_exist=True, read_only=True)


# A print of `sessions show` writes up to SHOWN_PER_PRINT messages, and ends after the
# message that brings it to SHOWN_LINES_PER_PRINT lines or SHOWN_CHARACTERS_PER_PRINT
# characters: rich holds a printed Text's every line at once (about 1 KB a line).
SHOWN_PER_PRINT = 256
SHOWN_LINES_PER_PRINT = 1024
SHOWN_CHARACTERS_PER_PRINT = 1 << 18


@sessions_app.command("show")
def sessions_show(
    ctx: typer.Context,
    session_id: Annotated[str, typer.Argument(help="The session's id.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the JSON export.")] = False,
    config: ConfigOption = None,
    url: UrlOption = None,
    verbose: VerboseOption = 0,
) -> None:
    """Show one session and its messages."""

    async def work(storage: SessionStorage, cfg: StorageConfig, target: Target) -> None:
        session = await storage.load_session(session_id)
        if session is None:
            fail(f"session {session_id!r} not found in {cfg.display_url}")
        if as_json:
            typer.echo(carried_json(formats.render_json(session)), nl=False)
            return
        console = out()
        # Found by attack: line breaks in the model and message lines shaped like this
        # command's own headers printed as they were, a forged session or reply.
        console.print(Text(f"Session {formats.one_line(session.session_id)}", style="bold"))
        fields = [
            ("Model", formats.one_line(session.model)),
            ("Status", session.status),
            ("Created", f"{formats.wall_time(session.created_at)} UTC"),
            ("Updated", f"{formats.wall_time(session.updated_at)} UTC"),
            ("Messages", str(session.message_count)),
        ]
        if session.metadata:
            fields.append(("Metadata", visible(json.dumps(session.metadata, ensure_ascii=False))))
        for name, value in fields:
            console.print(Text.assemble((f"{name}: ", "bold"), value))
        for part in _parts_shown(session.messages):
            console.print(part)

    run(ctx, (config, url, verbose), work, must_exist=True, read_only=True)


def _parts_shown(messages: Sequence[ChatMessage]) -> Iterator[Text]:
    """`messages` as `sessions show` writes them, a Text for each print: a blank line,
    the header (its time dim, its role bold cyan), the text, for each message.

    A Text is one string and its styled spans, printed once for many messages: three
    prints a message, a Text each, took 10.8 s for 20,000 messages, most of it rich's
    work per print and per Text; this, 4.9 s, the same bytes. The control codes a Text
    drops (BEL, BS, VT, FF, CR) are dropped first, so that the spans' offsets hold.
    A part is bounded in lines and characters too (found by attack: 256 messages of
    2,000 line breaks each, held as one Text, took 569 MB where one message at a time
    took 87).
    """
    pieces: list[str] = []
    spans: list[Span] = []
    at = lines = shown = 0
    for message in messages:
        time = f"\n[{formats.wall_time(message.created_at)}] "
        role = formats.shown_role(message.role)
        body = strip_control_codes(formats.text_body(message.content))
        spans.append(Span(at + 1, at + len(time), "dim"))
        at += len(time)
        spans.append(Span(at, at + len(role), "bold cyan"))
        at += len(role) + 1 + len(body) + 1
        lines += 3 + body.count("\n")
        pieces += (time, role, "\n", body, "\n")
        shown += 1
        if (
            shown >= SHOWN_PER_PRINT
            or lines >= SHOWN_LINES_PER_PRINT
            or at >= SHOWN_CHARACTERS_PER_PRINT
        ):
            yield Text("".join(pieces)[:-1], spans=spans)
            pieces, spans, at, lines, shown = [], [], 0, 0, 0
    if pieces:
        yield Text("".join(pieces)[:-1], spans=spans)


@sessions_app.command("delete")
def sessions_delete(
    ctx: typer.Context,
    session_id: Annotated[str, typer.Argument(help="The session's id.")],
    config: ConfigOption = None,
    url: UrlOption = None,
    verbose: VerboseOption = 0,
) -> None:
    """Delete one session and its messages (no question asked; exit 1 if not found)."""

    async def work(storage: SessionStorage, cfg: StorageConfig, target: Target) -> None:
        if not await storage.delete_session(session_id):
            fail(f"session {session_id!r} not found in {cfg.display_url}: nothing deleted")
        say(f"Deleted session {session_id} and its messages from {cfg.display_url}.")

    run(ctx, (config, url, verbose), work, must_exist=True)


@sessions_app.command("archive")
def sessions_archive(
    ctx: typer.Context,
    session_id: Annotated[str, typer.Argument(help="The session's id.")],
    config: ConfigOption = None,
    url: UrlOption = None,
    verbose: VerboseOption = 0,
) -> None:
    """Set one session's status to archived (exit 1 if not found)."""

    async def work(storage: SessionStorage, cfg: StorageConfig, target: Target) -> None:
        if await storage.set_status([session_id], "archived"):
            say(f"Archived session {session_id} in {cfg.display_url}.")
            return
        # Nothing changed: already archived, or no such session.
        if await storage.load_session(session_id, last=0) is None:
            fail(f"session {session_id!r} not found in {cfg.display_url}")
        say(f"Session {session_id} in {cfg.display_url} was already archived.")

    run(ctx, (config, url, verbose), work, must_exist=True)


def export(
    ctx: typer.Context,
    session_id: Annotated[str, typer.Argument(help="The session's id.")],
    format: Annotated[
        FormatChoice, typer.Option("--format", "-f", case_sensitive=False, help="Export format.")
    ] = (FormatChoice.json),
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="Write to this file (atomically; a FIFO or device is written through,"
            " a symlink refused), not stdout; - is stdout.",
            callback=output_path,
        ),
    ] = None,
    config: ConfigOption = None,
    url: UrlOption = None,
    verbose: VerboseOption = 0,
) -> None:
    """Export one session as JSON, plain text or markdown."""

    async def work(storage: SessionStorage, cfg: StorageConfig, target: Target) -> None:
        refuse_store_file(output or STDIO, cfg)
        rendered = await SessionManager(storage, auto_save_enabled=False).export_session(
            session_id, format.value
        )
        if rendered is None:
            fail(f"session {session_id!r} not found in {cfg.display_url}")
        if output is None or output == STDIO:
            if format == FormatChoice.json:
                rendered = carried_json(rendered)
            typer.echo(rendered, nl=False)
            return
        await asyncio.to_thread(write_text, output, rendered)
        # One line, as every summary (found by attack: an id's line break forged a line).
        say(f"Wrote the {format.value} export of session {session_id} to {output}")

    run(ctx, (config, url, verbose), work, must_exist=True, read_only=True)


def register(app: typer.Typer) -> None:
    """Adds the `sessions` group and `export` to the application."""
    app.add_typer(sessions_app, name="sessions")
    app.command()(export)
