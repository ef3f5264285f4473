"""The data-moving commands: migrate, backup, restore, export-all, import."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)

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
)
from persistence.config import StorageConfig, config_from_url, create_storage
from persistence.storage import SessionStorage
from persistence.transfer import (
    backup_storage,
    export_to_json,
    import_from_json,
    migrate_storage,
    restore_backup,
)

BatchOption = Annotated[int, typer.Option(min=1, help="Sessions per batch (one transaction).")]


@contextmanager
def progress_bar(description: str) -> Iterator[Callable[[int, int], None]]:
    """A progress bar on stderr (a terminal only); yields the progress callback."""
    console = Console(stderr=True)
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,
    ) as progress:
        task = progress.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        yield update


def _counts(sessions: int, messages: int, files: int) -> str:
    return f"{sessions} session(s), {messages} message(s) and {files} file record(s)"


def _same_store(a: StorageConfig, b: StorageConfig) -> bool:
    if a.backend != b.backend:
        return False
    if a.backend == "sqlite":
        return a.database_path.resolve() == b.database_path.resolve()
    return a.display_url == b.display_url


def _verification_problem(result: dict[str, Any]) -> str | None:
    report = result.get("verification")
    if not report or report.get("ok"):
        return None
    first = report["mismatches"][0] if report.get("mismatches") else {}
    detail = ", ".join(f"{key}={value}" for key, value in first.items())
    return f"verification found {report.get('mismatch_count', '?')} mismatch(es); first: {detail}"


def migrate(
    ctx: typer.Context,
    destination_url: Annotated[
        str, typer.Option("--to", help="Destination URL; its schema is brought to head first.")
    ],
    source_url: Annotated[
        str | None,
        typer.Option(
            "--from", help="Source URL (default: the configured store).", show_default=False
        ),
    ] = None,
    verify: Annotated[
        bool, typer.Option("--verify/--no-verify", help="Compare both stores afterwards.")
    ] = True,
    batch_size: BatchOption = 500,
    as_json: JsonOption = False,
    config: ConfigOption = None,
    url: UrlOption = None,
    verbose: VerboseOption = 0,
) -> None:
    """Copy every session, message and file record into another store (idempotent)."""

    async def work(source: SessionStorage, cfg: StorageConfig, target: Target) -> None:
        destination_config = config_from_url(destination_url, base=cfg)
        if _same_store(cfg, destination_config):
            fail("--from and --to name the same store")
        async with create_storage(destination_config) as destination:
            with progress_bar("Migrating sessions") as update:
                result = await migrate_storage(
                    source, destination, verify, progress_callback=update, batch_size=batch_size
                )
        problem = _verification_problem(result)
        if as_json:
            echo_json(result)
        else:
            counts = (result[f"{n}_migrated"] for n in ("sessions", "messages", "files"))
            checked = "; verified" if result["verified"] else ""
            out().print(
                f"Migrated {_counts(*counts)} from {cfg.display_url}"
                f" to {destination_config.display_url} in {result['duration_seconds']:.1f} s"
                f"{checked}",
            )
        if problem:
            fail(problem)

    run(ctx, (config, source_url or url, verbose), work, must_exist=True)


def backup(
    ctx: typer.Context,
    directory: Annotated[Path, typer.Argument(help="Directory for the timestamped file.")],
    as_json: JsonOption = False,
    config: ConfigOption = None,
    url: UrlOption = None,
    verbose: VerboseOption = 0,
) -> None:
    """Write a consistent, timestamped backup file of the whole store into DIRECTORY."""

    async def work(storage: SessionStorage, cfg: StorageConfig, target: Target) -> None:
        with progress_bar("Backing up sessions") as update:
            result = await backup_storage(storage, directory, progress_callback=update)
        if as_json:
            echo_json(result)
            return
        counts = _counts(result["sessions"], result["messages"], result["files"])
        out().print(
            f"Backed up {counts} of {cfg.display_url} to {result['path']}"
            f" ({result['kind']}, {result['bytes']} bytes)",
        )

    run(ctx, (config, url, verbose), work, must_exist=True)


def restore(
    ctx: typer.Context,
    backup_file: Annotated[Path, typer.Argument(help="A file written by `persistence backup`.")],
    as_json: JsonOption = False,
    config: ConfigOption = None,
    url: UrlOption = None,
    verbose: VerboseOption = 0,
) -> None:
    """Load a backup file into the store, keeping what it already holds."""

    async def work(storage: SessionStorage, cfg: StorageConfig, target: Target) -> None:
        with progress_bar("Restoring sessions") as update:
            result = await restore_backup(storage, backup_file, progress_callback=update)
        if as_json:
            echo_json(result)
            return
        counts = (result[f"{n}_restored"] for n in ("sessions", "messages", "files"))
        checked = "; verified" if result.get("verified") else ""
        out().print(
            f"Restored {_counts(*counts)} from {backup_file} into {cfg.display_url}{checked}",
        )

    run(ctx, (config, url, verbose), work)


def export_all(
    ctx: typer.Context,
    output: Annotated[Path, typer.Argument(help="The JSON file to write (atomically).")],
    batch_size: BatchOption = 500,
    as_json: JsonOption = False,
    config: ConfigOption = None,
    url: UrlOption = None,
    verbose: VerboseOption = 0,
) -> None:
    """Write every session, message and file record to one JSON export file."""

    async def work(storage: SessionStorage, cfg: StorageConfig, target: Target) -> None:
        with progress_bar("Exporting sessions") as update:
            result = await export_to_json(
                storage, output, progress_callback=update, batch_size=batch_size
            )
        if as_json:
            echo_json(result)
            return
        counts = _counts(result["sessions"], result["messages"], result["files"])
        out().print(
            f"Exported {counts} of {cfg.display_url} to {result['path']} ({result['bytes']} bytes)",
        )

    run(ctx, (config, url, verbose), work, must_exist=True)


def import_file(
    ctx: typer.Context,
    input_file: Annotated[Path, typer.Argument(help="A file written by `persistence export-all`.")],
    batch_size: BatchOption = 500,
    as_json: JsonOption = False,
    config: ConfigOption = None,
    url: UrlOption = None,
    verbose: VerboseOption = 0,
) -> None:
    """Load a JSON export file into the store (validated first; idempotent)."""

    async def work(storage: SessionStorage, cfg: StorageConfig, target: Target) -> None:
        with progress_bar("Importing sessions") as update:
            result = await import_from_json(
                storage, input_file, progress_callback=update, batch_size=batch_size
            )
        if as_json:
            echo_json(result)
            return
        counts = (result[f"{n}_imported"] for n in ("sessions", "messages", "files"))
        out().print(f"Imported {_counts(*counts)} from {input_file} into {cfg.display_url}")

    run(ctx, (config, url, verbose), work)


def register(app: typer.Typer) -> None:
    """Adds the data-moving commands to the app."""
    app.command("migrate")(migrate)
    app.command("backup")(backup)
    app.command("restore")(restore)
    app.command("export-all")(export_all)
    app.command("import")(import_file)
