"""The `persistence` command line: look at, export, clean and move stored sessions."""

from __future__ import annotations

import shlex
from datetime import timedelta
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from persistence import formats
from persistence.cli import search as search_command
from persistence.cli import sessions, transfer, verify
from persistence.cli.output import (
    ConfigOption,
    JsonOption,
    Target,
    UrlOption,
    VerboseOption,
    echo_json,
    fail,
    out,
    run,
    say,
    warn,
)
from persistence.cli.usage import MaskingGroup
from persistence.clock import DELETION_RECORD_DAYS, MAX_EXPIRY_HOURS, utc_now
from persistence.config import StorageConfig
from persistence.manager import SessionManager
from persistence.models import UploadedFileRecord
from persistence.storage import SessionStorage
from persistence.transfer.unfinished import copy_json, unfinished_copies

app = typer.Typer(
    name="persistence",
    cls=MaskingGroup,
    help="Chat sessions, messages and file records on SQLite, PostgreSQL or MongoDB.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            number = version("persistence")
        except PackageNotFoundError:  # run from a checkout that is not installed
            number = "unknown (not installed)"
        typer.echo(f"persistence {number}")
        raise typer.Exit()


@app.callback()
def main(
    ctx: typer.Context,
    _version: Annotated[
        bool,
        typer.Option(
            "--version",
            callback=_print_version,
            is_eager=True,
            help="Print the version and exit.",
        ),
    ] = False,
    config: ConfigOption = None,
    url: UrlOption = None,
    verbose: VerboseOption = 0,
) -> None:
    """Chat sessions, messages and file records on SQLite, PostgreSQL or MongoDB.

    The store comes from --url, else STORAGE_* variables, else the config file,
    else ./gemini_sessions.db. --config, --url and -v also work after the command.
    """
    ctx.obj = Target(config, url, verbose)


@app.command()
def upgrade(
    ctx: typer.Context,
    config: ConfigOption = None,
    url: UrlOption = None,
    verbose: VerboseOption = 0,
) -> None:
    """Bring the store's schema to head (as `alembic upgrade head` does)."""

    async def work(storage: SessionStorage, cfg: StorageConfig, target: Target) -> None:
        if cfg.backend == "mongodb":
            say(f"{cfg.display_url}: collections and indexes are in place")
            return
        from persistence.sql.revisions import HEAD

        say(f"{cfg.display_url}: schema is at head (revision {HEAD})")

    run(ctx, (config, url, verbose), work)


@app.command()
def stamp(
    ctx: typer.Context,
    revision: Annotated[
        str, typer.Argument(help="The revision the tables are at (as a refusal names it), or head.")
    ],
    config: ConfigOption = None,
    url: UrlOption = None,
    verbose: VerboseOption = 0,
) -> None:
    """Record the revision the store's tables are at (as `alembic stamp` does), after
    checking that they are; then `persistence upgrade` brings it to head."""

    async def work(storage: SessionStorage, cfg: StorageConfig, target: Target) -> None:
        from persistence.sql.sql_storage import SqlSessionStorage

        if not isinstance(storage, SqlSessionStorage):
            await storage.close()
            fail(f"{cfg.display_url}: MongoDB has no schema revision to stamp")
        before, now = await storage.stamp_schema(revision)
        was = ", ".join(before) or "none"
        say(f"{cfg.display_url}: schema revision recorded as {now} (was {was})")

    run(ctx, (config, url, verbose), work, must_exist=True, unopened=True)


@app.command()
def stats(
    ctx: typer.Context,
    as_json: JsonOption = False,
    config: ConfigOption = None,
    url: UrlOption = None,
    verbose: VerboseOption = 0,
) -> None:
    """Count sessions by status, messages and file records (inside the database)."""

    async def work(storage: SessionStorage, cfg: StorageConfig, target: Target) -> None:
        statistics = await SessionManager(storage).get_statistics()
        statistics = {"database": cfg.display_url, **statistics}
        for key in ("cached_sessions", "unsaved_sessions", "auto_save_enabled", "expiry_hours"):
            statistics.pop(key, None)
        unfinished = await unfinished_copies(storage)
        if as_json:
            echo_json({**statistics, "unfinished_copies": [copy_json(c) for c in unfinished]})
            return
        table = Table(title="Store statistics", title_justify="left", show_header=False)
        table.add_column("What")
        table.add_column("Value", justify="right")
        for key, value in statistics.items():
            table.add_row(key.replace("_", " "), Text(formats.one_line(str(value))))
        out().print(table)
        for copy in unfinished:
            warn(f"{cfg.display_url}: {copy.shown()}")

    run(ctx, (config, url, verbose), work, must_exist=True, read_only=True)


@app.command()
def cleanup(
    ctx: typer.Context,
    expiry_hours: Annotated[
        float | None,
        typer.Option(help="Expire active sessions idle this many hours (default: config)."),
    ] = None,
    deletion_record_days: Annotated[
        float,
        typer.Option(
            help="Forget the records of sessions deleted more than this many days ago"
            " (a save retrying a creation of unknown outcome older than that could bring"
            " such a session back)."
        ),
    ] = DELETION_RECORD_DAYS,
    as_json: JsonOption = False,
    config: ConfigOption = None,
    url: UrlOption = None,
    verbose: VerboseOption = 0,
) -> None:
    """Mark idle active sessions expired, delete expired file records and forget old
    deletions."""

    def check_spans() -> None:
        # Not nan, inf or a span no date can be that far back from: one line naming it.
        if expiry_hours is not None and not 0 < expiry_hours <= MAX_EXPIRY_HOURS:
            fail(
                f"--expiry-hours: must be more than 0 and at most {MAX_EXPIRY_HOURS:,},"
                f" got {expiry_hours:g}"
            )
        if not 0 < deletion_record_days <= MAX_EXPIRY_HOURS // 24:
            fail(
                "--deletion-record-days: must be more than 0 and at most"
                f" {MAX_EXPIRY_HOURS // 24:,}, got {deletion_record_days:g}"
            )

    async def work(storage: SessionStorage, cfg: StorageConfig, target: Target) -> None:
        hours = cfg.expiry_hours if expiry_hours is None else expiry_hours
        manager = SessionManager(storage, auto_save_enabled=False, expiry_hours=hours)
        expired = await manager.cleanup_expired_sessions()
        files = await storage.delete_expired_files()
        forgotten = await storage.forget_deletions(utc_now() - timedelta(days=deletion_record_days))
        if as_json:
            echo_json(
                {
                    "database": cfg.display_url,
                    "expired_sessions": expired,
                    "expired_files_deleted": files,
                    "deletion_records_forgotten": forgotten,
                }
            )
            return
        line = (
            f"Expired {expired} session(s) of {cfg.display_url} not updated for {hours:g} hours;"
            f" deleted {files} expired file record(s); forgot {forgotten} record(s) of"
            f" sessions deleted more than {deletion_record_days:g} days ago."
        )
        say(line)

    run(ctx, (config, url, verbose), work, must_exist=True, check_first=check_spans)


DEMO_CONVERSATION = (
    ("user", "Hello! Can you summarise the file I just uploaded?"),
    ("assistant", "Sure. It lists three tasks: buy milk, write the report, call Sam."),
    ("user", "Which one is the most urgent?"),
    ("assistant", "Writing the report: its deadline is today."),
)


@app.command()
def demo(
    ctx: typer.Context,
    config: ConfigOption = None,
    url: UrlOption = None,
    verbose: VerboseOption = 0,
) -> None:
    """Store a short conversation and a file record, then show how to look at them."""

    async def work(storage: SessionStorage, cfg: StorageConfig, target: Target) -> None:
        # No startup(): found by attack, its expiry sweep and deletion of expired file
        # records changed the store the demo was pointed at, saying nothing of it.
        manager = SessionManager(
            storage, auto_save_enabled=cfg.auto_save, expiry_hours=cfg.expiry_hours
        )
        session = await manager.create_session(
            "gemini-2.5-flash", metadata={"source": "persistence demo"}
        )
        for role, content in DEMO_CONVERSATION:
            session.add_message(role, content)
        await manager.save_session(session)
        now = utc_now()
        record = UploadedFileRecord(
            file_id=f"demo-{session.session_id[:8]}",
            gemini_file_name=f"files/demo-{session.session_id[:8]}",
            gemini_file_uri=f"https://example.invalid/files/demo-{session.session_id[:8]}",
            display_name="tasks.txt",
            size=52,
            mime_type="text/plain",
            uploaded_at=now,
            expires_at=now + timedelta(hours=48),
            metadata={"session_id": session.session_id},
        )
        await storage.save_file_record(record)
        await manager.shutdown()
        where = str(cfg.database_path.resolve()) if cfg.backend == "sqlite" else cfg.display_url
        prefix = target.command_prefix()
        sid = shlex.quote(session.session_id)
        console = out()
        say(f"Stored in {cfg.backend} at {where}:", console)
        console.print(
            f"  session {session.session_id} (model {session.model})"
            f" with {len(session.messages)} messages"
        )
        console.print(
            f"  file record {record.file_id} ({record.display_name}, {record.size} bytes,"
            f" expires {formats.wall_time(record.expires_at, 'minutes')} UTC)"
        )
        console.print("Look at them with:")
        for command in (
            "sessions list",
            f"sessions show {sid}",
            f"export {sid} --format markdown",
            "stats --json",
        ):
            say(f"  {prefix} {command}", console)
        if prefix != target.command_prefix(reveal=True):
            console.print("  (*** stands for the password of --url)")

    run(ctx, (config, url, verbose), work)


sessions.register(app)
transfer.register(app)
verify.register(app)
search_command.register(app)
