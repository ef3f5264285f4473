"""The data-moving commands: migrate, backup, restore, export-all, import."""

from __future__ import annotations

import asyncio
import errno
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, nullcontext, suppress
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import IO, Annotated, Any, NoReturn, TypeVar, cast

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from persistence.cli.output import (
    STDIO,
    ConfigOption,
    JsonOption,
    Target,
    UrlOption,
    VerboseOption,
    echo_json,
    fail,
    file_path,
    naming_store,
    opened_store,
    os_error_line,
    out,
    output_path,
    refuse_output_into_store,
    refuse_store_file,
    run,
    say,
    stdout_text,
    store_file,
)
from persistence.config import StorageConfig, config_from_url
from persistence.errors import InvalidDataError, PersistenceError
from persistence.storage import SessionStorage
from persistence.store_files import same_file
from persistence.transfer import (
    backup_storage,
    export_to_json,
    export_to_stream,
    import_from_stream,
    restore_backup,
    validate_backup_file,
)
from persistence.transfer.backups import backup_directory
from persistence.transfer.exchange import open_input
from persistence.transfer.exchange_format import DocumentSummary, validate_document
from persistence.transfer.files import NO_ROOM
from persistence.transfer.json_stream import SCAN_CHUNK, check_head
from persistence.transfer.migration import (
    UNCONFIRMED_SESSIONS,
    copy_storage,
    copy_summary,
    verify_copied,
)
from persistence.transfer.sides import FAILED_STORE

T = TypeVar("T")
BatchOption = Annotated[int, typer.Option(min=1, help="Sessions per batch (one transaction).")]
FromOption = Annotated[
    str | None,
    typer.Option("--from", help="Source URL (default: the configured store).", show_default=False),
]


class _Lines:
    """Progress as plain lines, for a stderr that is not a terminal (a log, a pipe)."""

    def __init__(self, console: Console, description: str) -> None:
        self._console = console
        self._description = description
        self._started = time.monotonic()
        self._shown = -1

    def update(self, done: int, total: int) -> None:
        tenth = 10 * done // total if total else 10
        if done == 0 or tenth == self._shown:
            return
        self._shown = tenth
        seconds = time.monotonic() - self._started
        line = f"{self._description}: {done}/{total} sessions ({100 * done // max(total, 1)}%),"
        line += f" {seconds:.0f} s elapsed"
        if done < total:
            line += f", about {seconds * (total - done) / done:.0f} s left"
        self._console.print(line, markup=False, highlight=False, soft_wrap=True)


@dataclass
class Phase:
    """What a progress display last showed: how far the operation got."""

    description: str
    done: int = 0
    total: int = 0


@contextmanager
def progress_bar(description: str, *, stopped: str) -> Iterator[Callable[[int, int], None]]:
    """A progress display on stderr; yields the progress callback.

    On a terminal, a bar with an estimate of the time left; otherwise a line at each
    tenth. If the user interrupts (Ctrl-C), says how far it got, then `stopped`.
    """
    console = Console(stderr=True, emoji=False)
    phase = Phase(description)
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,
    ) as progress:
        task = progress.add_task(description, total=None)
        lines = None if console.is_terminal else _Lines(console, description)

        shown = True

        def update(done: int, total: int) -> None:
            nonlocal shown
            phase.done, phase.total = done, total
            if not shown:
                return
            try:
                progress.update(task, completed=done, total=total)
                if lines is not None:
                    lines.update(done, total)
            except OSError:
                # Found by attack: with stderr closed or full (`2>&-`, `2>/dev/full`) the
                # first progress line raised, and the import stopped after one batch
                # without a word. Progress is a courtesy: the work goes on without it.
                shown = False

        try:
            yield update
        except (KeyboardInterrupt, asyncio.CancelledError) as exc:
            progress.stop()
            unconfirmed = getattr(exc, UNCONFIRMED_SESSIONS, 0)
            perhaps = f" (and perhaps the {unconfirmed} being written)" if unconfirmed else ""
            console.print(
                f"Interrupted during {description.lower()}: {phase.done} of {phase.total}"
                f" sessions done{perhaps}; {stopped}",
                markup=False,
                highlight=False,
                soft_wrap=True,
            )
            raise


RESUMES = "what was written stays, and running the same command again resumes safely"
NOTHING_WRITTEN = "nothing was written (the file only takes its name once complete)"


def _counts(sessions: int, messages: int, files: int) -> str:
    return f"{sessions} session(s), {messages} message(s) and {files} file record(s)"


def _written(result: dict[str, Any], verb: str) -> str:
    """What was written, and what the destination already held: exact counts."""
    written = _counts(*(result[f"{n}_{verb}"] for n in ("sessions", "messages", "files")))
    present = [
        f"{result[f'{n}_already_present']} {label}"
        for n, label in (("sessions", "session(s)"), ("files", "file record(s)"))
        if result.get(f"{n}_already_present")
    ]
    return written + (f" ({' and '.join(present)} already present)" if present else "")


def _two_sources(source_url: str, url: str) -> bool:
    """Whether --from and --url name two stores, not one spelled two ways (found by
    attack: `--url sqlite:///s.db migrate --from sqlite:///./s.db` was refused)."""
    if source_url == url:
        return False
    try:
        return not _same_store(config_from_url(source_url), config_from_url(url))
    except (PersistenceError, ValueError):
        return True


def source_option(
    ctx: typer.Context, source_url: str | None, url: str | None
) -> tuple[str | None, str]:
    """The source a command comparing two stores reads (`--from`, else `--url`, else the
    configured store), and what its errors call it.

    Raises:
        typer.BadParameter: --from and a --url (the command's, or the one before it:
            `persistence --url A migrate`) name two stores.
    """
    given = ctx.find_object(Target)
    url_named = url if url is not None else None if given is None else given.url
    if source_url is not None and url_named is not None and _two_sources(source_url, url_named):
        # Found by attack: `--url a.db --from b.db` copied from b.db without a word.
        raise typer.BadParameter("--url and --from both name the source: give one", ctx)
    source = source_url if source_url is not None else url
    named = "--from" if source_url is not None else "--url" if url_named is not None else "source"
    return source, named


def other_store(destination_url: str, cfg: StorageConfig, source_named: str) -> StorageConfig:
    """The store `--to` names, its options based on the source's `cfg`; an error in its
    URL names `--to`, and the source's own store is refused."""
    with naming_store("--to"):
        destination = config_from_url(destination_url, base=cfg)
    if _same_store(cfg, destination):
        fail(f"{source_named} and --to name the same store")
    return destination


def _same_store(a: StorageConfig, b: StorageConfig) -> bool:
    if a.backend != b.backend:
        return False
    if a.backend == "sqlite":
        return same_file(a.database_path, b.database_path)
    return a.display_url == b.display_url


def _waited_for(function: Callable[[IO[bytes]], T], stream: IO[bytes]) -> T:
    """`function(stream)` run in a thread of its own that this one waits for, so that
    Ctrl-C and SIGTERM land in the wait, never in the C code it runs. Found by a
    flaky test run (test_ctrl_c_while_import_checks_its_file_says_interrupted):
    Ctrl-C inside ijson's parser, as `import` checked its file, was swallowed there
    once in some hundred runs and the check went on to call the file invalid
    (`sessions[0]: session_id missing`), status 1 instead of `interrupted`.

    Interrupted, it stops the thread at its next read and waits for it to end before
    the interrupt goes on (found by attack: a thread still reading at exit aborted
    Python, SIGABRT, once in 15 to 60 runs). Thread.join is not used: interrupted,
    it takes the thread for ended (CPython 3.11).
    """
    stop = threading.Event()
    finished = threading.Event()
    outcome: list[T] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            outcome.append(function(cast(IO[bytes], _StoppableReads(stream, stop))))
        except BaseException as exc:  # raised again in this thread
            failure.append(exc)
        finally:
            finished.set()

    threading.Thread(target=run, name="persistence-check-input", daemon=True).start()
    try:
        finished.wait()
    except BaseException:
        stop.set()
        finished.wait()
        raise
    if failure:
        raise failure[0]
    return outcome[0]


class _ReadsStopped(BaseException):
    """Raised by the reads of a check whose command was interrupted."""


class _StoppableReads:
    """`stream`, whose reads raise _ReadsStopped once `stop` is set."""

    def __init__(self, stream: IO[bytes], stop: threading.Event) -> None:
        self._stream = stream
        self._stop = stop

    def read(self, size: int = -1) -> bytes:
        if self._stop.is_set():
            raise _ReadsStopped
        return self._stream.read(size)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


async def _index_for_search(storage: SessionStorage, *, done: str) -> int:
    """Writes the search documents the load left pending (SessionStorage.index_for_search),
    so that searches of the store, even opened for reading, use the index at once.

    An error, or Ctrl-C or SIGTERM, while it indexes says what `done` says: that the
    work before it is complete. Found by attack: `migrate` whose indexing failed on a
    full disk said only "index messages failed"; stopped while it indexed, only
    `error: terminated`, its unfinished-copy note already gone.
    """
    console = Console(stderr=True, emoji=False)
    try:
        with console.status("Indexing for search") if console.is_terminal else nullcontext():
            return await storage.index_for_search()
    except PersistenceError as exc:
        exc.add_note(done)
        raise
    except (KeyboardInterrupt, asyncio.CancelledError):
        line = f"Interrupted during indexing for search: {done}"
        console.print(line, markup=False, highlight=False, soft_wrap=True)
        raise


# What an import or a restore stopped while it indexes has done.
_LOADED = "the {} itself is complete; the first search indexes the messages left"


def _indexed(result: dict[str, Any]) -> str:
    count = result["indexed_for_search"]
    return f"; {count:,} messages indexed for search" if count else ""


def _verification_problem(result: dict[str, Any]) -> str | None:
    report = result.get("verification")
    if not report or report.get("ok"):
        return None
    first = report["mismatches"][0] if report.get("mismatches") else {}
    detail = ", ".join(f"{key}={value}" for key, value in first.items())
    return f"verification found {report.get('mismatch_count', '?')} mismatch(es); first: {detail}"


@contextmanager
def _naming_each_store(source_named: str) -> Iterator[None]:
    """An error of `migrate`'s copy starts its line with the option that gave the store
    it came from (persistence.transfer.sides); the transfer's own ledger is neither."""
    try:
        yield
    except PersistenceError as exc:
        side = getattr(exc, FAILED_STORE, "")
        with naming_store({"source": source_named, "destination": "--to"}.get(side)):
            raise


def migrate(
    ctx: typer.Context,
    destination_url: Annotated[
        str, typer.Option("--to", help="Destination URL; its schema is brought to head first.")
    ],
    source_url: FromOption = None,
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
        destination_config = other_store(destination_url, cfg, source_named)
        # A copy written as the source's -wal file would be wiped when the source next opens.
        if destination_config.backend == "sqlite" and (
            taken := store_file(destination_config.database_path, cfg)
        ):
            fail(f"--to names {taken}")
        async with opened_store(destination_config, "--to") as destination:
            # migrate_storage's own steps, each with its progress bar.
            with (
                progress_bar("Copying sessions", stopped=RESUMES) as update,
                _naming_each_store(source_named),
            ):
                copy = await copy_storage(
                    source, destination, progress_callback=update, batch_size=batch_size
                )
            try:
                copied = (
                    "the copy itself is complete and unverified: running the same migrate"
                    f" again indexes{' and verifies' if verify else ''} it"
                )
                with naming_store("--to"):
                    indexed = await _index_for_search(destination, done=copied)
                report = None
                if verify:
                    with (
                        progress_bar("Verifying", stopped="the copy itself is complete") as update,
                        _naming_each_store(source_named),
                    ):
                        report = await verify_copied(copy, progress_callback=update)
                result = await copy_summary(copy, report)
            finally:
                copy.close()
            result["indexed_for_search"] = indexed
        problem = _verification_problem(result)
        if as_json:
            echo_json(result)
        else:
            checked = "; verified" if result["verified"] else ""
            say(
                f"Migrated {_written(result, 'migrated')} from {cfg.display_url}"
                f" to {destination_config.display_url} in {result['duration_seconds']:.1f} s"
                f"{checked}{_indexed(result)}",
            )
        if problem:
            fail(problem)

    # The destination's outputs checked before the source is opened (found by attack:
    # `-v migrate ... 2>> dst.db` appended the source's log lines to the destination, and
    # `migrate --to dst.db >> dst.db` its summary).
    with suppress(PersistenceError, ValueError):  # told once the source is loaded
        refuse_output_into_store(config_from_url(destination_url))
    source, source_named = source_option(ctx, source_url, url)
    run(
        ctx,
        (config, source, verbose),
        work,
        must_exist=True,
        read_only=True,
        store_named=source_named,
    )


def backup_path(value: str) -> str:
    """The typer callback of backup's directory: file_path's checks, and `-` refused
    (found by attack: `backup -` made a directory named `-`)."""
    if value == "-":
        raise typer.BadParameter(
            "a backup is a file written into a directory, and - is standard output: name"
            " a directory (./- for one called -), or use `export-all -` to write the store"
            " to standard output"
        )
    return file_path(value)


def backup(
    ctx: typer.Context,
    # A str, not a Path: Path("") would be the current directory, and "" is refused.
    directory: Annotated[
        str, typer.Argument(help="Directory for the timestamped file.", callback=backup_path)
    ],
    as_json: JsonOption = False,
    config: ConfigOption = None,
    url: UrlOption = None,
    verbose: VerboseOption = 0,
) -> None:
    """Write a timestamped backup file of the whole store into DIRECTORY."""

    async def work(storage: SessionStorage, cfg: StorageConfig, target: Target) -> None:
        with progress_bar("Backing up sessions", stopped=NOTHING_WRITTEN) as update:
            result = await backup_storage(storage, directory, progress_callback=update)
        if as_json:
            echo_json(result)
            return
        counts = _counts(result["sessions"], result["messages"], result["files"])
        say(
            f"Backed up {counts} of {cfg.display_url} to {result['path']}"
            f" ({result['kind']}, {result['bytes']} bytes)",
        )

    run(
        ctx,
        (config, url, verbose),
        work,
        must_exist=True,
        read_only=True,
        check_first=partial(backup_directory, directory),
    )


def restore(
    ctx: typer.Context,
    backup_file: Annotated[
        Path, typer.Argument(help="A file written by `persistence backup`.", callback=file_path)
    ],
    as_json: JsonOption = False,
    config: ConfigOption = None,
    url: UrlOption = None,
    verbose: VerboseOption = 0,
) -> None:
    """Load a backup file into the store, keeping what it already holds."""

    async def work(storage: SessionStorage, cfg: StorageConfig, target: Target) -> None:
        with progress_bar("Restoring sessions", stopped=RESUMES) as update:
            result = await restore_backup(storage, backup_file, progress_callback=update)
        result["indexed_for_search"] = await _index_for_search(
            storage, done=_LOADED.format("restore")
        )
        problem = _verification_problem(result)
        if as_json:
            echo_json(result)
        else:
            checked = "; verified" if result.get("verified") else ""
            say(
                f"Restored {_written(result, 'restored')} from {backup_file}"
                f" into {cfg.display_url}{checked}{_indexed(result)}",
            )
        if problem:
            fail(problem)

    run(ctx, (config, url, verbose), work, check_first=partial(validate_backup_file, backup_file))


def export_all(
    ctx: typer.Context,
    output: Annotated[
        Path,
        typer.Argument(
            help="The JSON file to write (atomically); - for standard output.",
            callback=output_path,
        ),
    ],
    batch_size: BatchOption = 500,
    as_json: JsonOption = False,
    config: ConfigOption = None,
    url: UrlOption = None,
    verbose: VerboseOption = 0,
) -> None:
    """Write every session, message and file record to one JSON export file."""

    async def work(storage: SessionStorage, cfg: StorageConfig, target: Target) -> None:
        refuse_store_file(output, cfg)
        if output == STDIO:
            # The document goes to stdout, so the summary goes to stderr.
            try:
                with (
                    progress_bar(
                        "Exporting sessions", stopped="the output is incomplete"
                    ) as update,
                    stdout_text() as stream,
                ):
                    result = await export_to_stream(
                        storage,
                        stream,
                        progress_callback=update,
                        batch_size=batch_size,
                        escape_controls=True,
                    )
            except BrokenPipeError:
                raise  # its reader went away: a quiet end (output.run)
            except OSError as exc:
                # Found by attack: a full device said only "[Errno 28] No space left ...".
                fail(f"cannot write standard output: {os_error_line(exc)}")
            result = {"path": "-", **result}
            where, console = "standard output", Console(stderr=True, highlight=False, emoji=False)
        else:
            with progress_bar("Exporting sessions", stopped=NOTHING_WRITTEN) as update:
                result = await export_to_json(
                    storage, output, progress_callback=update, batch_size=batch_size
                )
            where, console = result["path"], out()
        if as_json:
            echo_json(result, err=output == STDIO)
            return
        counts = _counts(result["sessions"], result["messages"], result["files"])
        say(f"Exported {counts} of {cfg.display_url} to {where} ({result['bytes']} bytes)", console)

    run(ctx, (config, url, verbose), work, must_exist=True, read_only=True)


def import_file(
    ctx: typer.Context,
    input_file: Annotated[
        Path,
        typer.Argument(
            help="A file written by `persistence export-all`; - for standard input.",
            callback=file_path,
        ),
    ],
    batch_size: BatchOption = 500,
    as_json: JsonOption = False,
    config: ConfigOption = None,
    url: UrlOption = None,
    verbose: VerboseOption = 0,
) -> None:
    """Load a JSON export file into the store (validated first; idempotent)."""

    inputs = ExitStack()
    checked: list[tuple[IO[bytes], DocumentSummary]] = []

    def check() -> None:
        # A bad file must leave no new store behind: it is checked, whole, before the
        # store is opened, and that check is the import's own (the file is not read a
        # second time before writing).
        stream = inputs.enter_context(
            _seekable_stdin() if input_file == STDIO else open_input(input_file)
        )
        # Standard input may be a file read part way (`{ read -r header; ...; } < file`):
        # the document starts where it stands, for the check and the writing alike.
        start = stream.tell()
        try:
            summary = _waited_for(validate_document, stream)
        except InvalidDataError as exc:
            # Found by audit: "the file is empty" named no file.
            source = "standard input" if input_file == STDIO else str(input_file)
            raise InvalidDataError(f"{source}: {exc}") from exc
        stream.seek(start)
        checked.append((stream, summary))

    async def work(storage: SessionStorage, cfg: StorageConfig, target: Target) -> None:
        ((stream, summary),) = checked
        with progress_bar("Importing sessions", stopped=RESUMES) as update:
            result = await import_from_stream(
                storage, stream, progress_callback=update, batch_size=batch_size, checked=summary
            )
        result["indexed_for_search"] = await _index_for_search(
            storage, done=_LOADED.format("import")
        )
        if as_json:
            echo_json(result)
            return
        source = "standard input" if input_file == STDIO else input_file
        say(
            f"Imported {_written(result, 'imported')} from {source} into {cfg.display_url}"
            f"{_indexed(result)}"
        )

    with inputs:
        run(ctx, (config, url, verbose), work, check_first=check)


@contextmanager
def _seekable_stdin() -> Iterator[IO[bytes]]:
    """Standard input, copied to an anonymous temp file first if it is a pipe.

    An import reads its file twice (checked whole, then written).
    """
    if sys.stdin is None:
        # Found by attack: `import - <&-` said "unexpected AttributeError".
        fail("standard input is closed: nothing to import (give a file, or - < FILE)")
    stdin = sys.stdin.buffer
    if stdin.seekable():
        yield stdin
        return
    # Checked before spooling: an endless input (`- < /dev/zero`) would fill the disk.
    head = stdin.read(SCAN_CHUNK)
    try:
        check_head(head)
    except InvalidDataError as exc:
        raise InvalidDataError(f"standard input: {exc}") from exc
    with ExitStack() as stack:
        try:
            spool = stack.enter_context(tempfile.TemporaryFile())
        except OSError as exc:
            _spool_failed(exc)
        try:
            spool.write(head)
            shutil.copyfileobj(stdin, spool)
            spool.flush()
        except OSError as exc:
            with suppress(OSError):  # closing writes what it buffered: it fails again
                spool.close()
            if exc.errno not in NO_ROOM:
                fail(f"cannot read standard input: {exc.strerror or type(exc).__name__}")
            _spool_failed(exc)
        spool.seek(0)
        yield spool


def _spool_failed(exc: OSError) -> NoReturn:
    """Names the temporary directory that standard input could not be copied into.
    Found by attack: a full one made `import -` print only "[Errno 28] No space left
    on device"; and a file size limit was then said to want room."""
    said = (
        f"cannot copy standard input into a temporary file in {tempfile.gettempdir()}:"
        f" {exc.strerror or type(exc).__name__} (an import reads its input twice, so"
        " input from a pipe is copied first:"
    )
    if exc.errno == errno.EFBIG:
        fail(f"{said} this process's file size limit, `ulimit -f`, is below the input's size)")
    fail(f"{said} free room there, set TMPDIR to another directory, or give the file itself)")


def register(app: typer.Typer) -> None:
    """Adds the data-moving commands to the app."""
    app.command("migrate")(migrate)
    app.command("backup")(backup)
    app.command("restore")(restore)
    app.command("export-all")(export_all)
    app.command("import")(import_file)
