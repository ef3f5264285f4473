"""What every `persistence` command shares: options, the store, logging, errors."""

from __future__ import annotations

import asyncio
import io
import logging
import os
import shlex
import signal
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import IO, Annotated, Any, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from persistence.cli.streams import (
    STDOUT_CLOSED,
    carried_json,
    stdout_closed,
    whole_writes,
)
from persistence.config import (
    StorageConfig,
    create_storage,
    load_config,
    mask_secrets,
    mask_url,
)
from persistence.config.masking import MaskingFormatter
from persistence.errors import InvalidDataError, PersistenceError
from persistence.formats import json_text, one_line, visible, without_invisible
from persistence.storage import SessionStorage
from persistence.store_files import (
    refuse_database_file,
    sqlite_file_role,
    sqlite_file_roles_of_descriptors,
    sqlite_kind_of_descriptor,
)
from persistence.urls import url_given_as_path

T = TypeVar("T")
logger = logging.getLogger("persistence.cli")

P = TypeVar("P", Path, str, Path | None)


def file_path(value: P) -> P:
    """The typer callback of every parameter that takes a file path: refuses a URL,
    naming only its scheme (persistence.urls.url_given_as_path)."""
    url = None if value is None else url_given_as_path(value)
    if url is not None:
        raise typer.BadParameter(f"takes a file path, and this is {url}; name a store with --url")
    return value


ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        callback=file_path,
        help="YAML or TOML file with a `storage` section (default: $PERSISTENCE_CONFIG,"
        " else ./persistence.yaml|.yml|.toml if present).",
        show_default=False,
    ),
]
UrlOption = Annotated[
    str | None,
    typer.Option(
        "--url",
        help="Database URL: sqlite:///path, postgresql://..., mongodb://...;"
        " overrides the configured store.",
        show_default=False,
    ),
]
VerboseOption = Annotated[
    int, typer.Option("--verbose", "-v", count=True, help="Log to stderr: -v info, -vv debug.")
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
# Bounds of --limit and --offset: a clear usage error instead of an integer no
# database column (64-bit) can hold.
MAX_LIMIT = 1_000_000
MAX_OFFSET = 2**62


@dataclass
class Target:
    """Which store a command works on, from the global and the command's options."""

    config_file: Path | None = None
    url: str | None = None
    verbose: int = 0

    def merged(self, config_file: Path | None, url: str | None, verbose: int) -> Target:
        # `is not None`: an empty --url (an unset variable) is refused, not skipped.
        return Target(
            config_file or self.config_file,
            url if url is not None else self.url,
            verbose or self.verbose,
        )

    def load(self) -> StorageConfig:
        # A --url is the store: the configured store's settings are not even read.
        return load_config(self.config_file, url=self.url)

    def command_prefix(self, *, reveal: bool = False) -> str:
        """How to repeat this store's options on another command line (password masked)."""
        words = ["persistence"]
        if self.config_file is not None:
            words += ["--config", str(self.config_file)]
        if self.url is not None:
            # mask_url: the whole option is one URL, whatever its password holds.
            words += ["--url", self.url if reveal else mask_url(self.url)]
        return shlex.join(words)


@contextmanager
def _logging(verbose: int) -> Iterator[None]:
    """Sends the library's (and alembic's) log records, and every other library's
    warnings, to stderr while a command runs, every URL's password masked."""
    level = logging.WARNING if verbose <= 0 else logging.INFO if verbose == 1 else logging.DEBUG
    handler = logging.StreamHandler(sys.stderr)
    detail = "%(asctime)s " if verbose > 1 else ""
    handler.setFormatter(MaskingFormatter(f"{detail}%(levelname)s %(name)s: %(message)s"))
    handler.setLevel(level)
    # On the root logger: SQLAlchemy's, asyncpg's and PyMongo's records pass it too.
    root = logging.getLogger()
    loggers = [logging.getLogger(name) for name in ("persistence", "alembic")]
    previous = [log.level for log in loggers]
    root.addHandler(handler)
    for log in loggers:
        log.setLevel(level)
    try:
        yield
    finally:
        root.removeHandler(handler)
        for log, old in zip(loggers, previous, strict=True):
            log.setLevel(old)


def out() -> Console:
    """The console for results on stdout: no markup and no emoji codes (found by attack:
    rich wrote the id `invoice:warning:2024` as `invoice\u26a02024`), so stored text prints
    as it is."""
    console = Console(highlight=False, soft_wrap=True, markup=False, emoji=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        # Piped output: room for full session ids instead of rich's 80 columns.
        console.width = 160
    return console


def say(line: str, console: Console | None = None) -> None:
    """Prints a summary line on stdout (or `console`) as one line: the URLs, paths and
    ids in it may hold line breaks and terminal controls (found by attack: a directory
    named with `ESC]0;...` set the terminal's title, and its line break forged a line)."""
    (console or out()).print(one_line(line), markup=False, emoji=False, soft_wrap=True)


def warn(line: str) -> None:
    """Prints a warning line on stderr, as `say` prints a summary line."""
    say(f"warning: {line}", Console(stderr=True, highlight=False, emoji=False))


STDIO = Path("-")


def output_path(value: P) -> P:
    """The typer callback of an output file: file_path's checks, and a path to this
    process's standard output taken for `-` (found by attack: `export-all /dev/stdout`,
    the README's example, was refused as a symbolic link; written through, its summary
    line would join the document). Told by the file, not the name: a link to
    /dev/stdout, `//dev/stdout` or /proc/thread-self/fd/1 is standard output too."""
    value = file_path(value)
    if isinstance(value, Path) and value != STDIO and _is_standard_output(value):
        return STDIO
    return value


def _is_standard_output(path: Path) -> bool:
    try:
        return os.path.samestat(os.stat(path), os.fstat(1))
    except (OSError, ValueError):
        return False


@contextmanager
def stdout_text() -> Iterator[IO[str]]:
    """Standard output as a UTF-8 text stream, for data written where `-` is given."""
    stream = io.TextIOWrapper(sys.stdout.buffer, encoding="utf-8", newline="")
    sys.stdout.flush()
    try:
        yield stream
        stream.flush()
    finally:
        stream.detach()  # leaves sys.stdout open


def fail(message: str, status: int = 1) -> NoReturn:
    """Prints one error line on stderr and exits with `status`."""
    line = _one_line(message)
    Console(stderr=True, highlight=False, emoji=False).print(
        f"[red]error:[/] {escape(line)}", soft_wrap=True
    )
    raise typer.Exit(status)


def _one_line(message: str) -> str:
    """An error message as its line shows it: secrets masked, line breaks joined,
    controls and what shows as nothing made visible (found by attack: `session
    'vic\u034ftim' not found` read as `victim`, repr() keeping U+034F)."""
    return without_invisible(visible(" ".join(mask_secrets(message).splitlines())))


def os_error_line(exc: OSError) -> str:
    """An OSError as an error line says it: its reason, and the file it names if any."""
    return f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc)


def store_file(path: Path, config: StorageConfig) -> str | None:
    """Which file of the configured SQLite store `path` is (the store or one of its
    journals), or None."""
    return None if config.backend != "sqlite" else sqlite_file_role(path, config.database_path)


def refuse_store_file(output: Path, config: StorageConfig) -> None:
    """Fails if writing `output` would replace the SQLite store's file or a journal of
    it, or any other SQLite database or journal (`-`: every command's
    _refuse_output_into_store has checked it)."""
    if output == STDIO:
        return
    if (what := store_file(output, config)) is not None:
        fail(f"refusing to write {output}: it is {what} (give another file name)")
    try:
        refuse_database_file(output)
    except InvalidDataError as exc:
        fail(str(exc))


def refuse_output_into_store(config: StorageConfig) -> None:
    """Fails, before the store is opened, if standard output or standard error is the
    SQLite store's file or a journal of it: what a command prints, logs or reports
    would be appended to it. Found by attack: `export-all /dev/stdout >> store.db`
    appended the export to the store, `sessions list --json >> store.db` its listing,
    `-v stats 2>> store.db` its log lines. Told by the open file itself (found by
    attack: a /proc path named another process's in a PID namespace). A store file
    that already holds a database was refused before the arguments were parsed
    (refuse_output_into_sqlite_files); this also tells an empty one, or its -shm."""
    if config.backend != "sqlite":
        return
    into_output, into_errors = sqlite_file_roles_of_descriptors((1, 2), config.database_path)
    _refuse_outputs(into_output, into_errors)


def refuse_output_into_sqlite_files() -> None:
    """Fails if standard output or standard error is any SQLite database, write-ahead
    log or rollback journal, told by how the file begins: checked before the arguments
    are parsed, since a usage error, help or version text is said before any store is
    known (found by attack: `sessions lst 2>> store.db` and `--help >> store.db` were
    appended to the store), and nothing a command prints belongs in any database."""
    _refuse_outputs(sqlite_kind_of_descriptor(1), sqlite_kind_of_descriptor(2))


def _refuse_outputs(into_output: str | None, into_errors: str | None) -> None:
    """Fails if standard output or error is the file named (what it is), else nothing.

    Refused for standard error, the error line goes to standard output (unless that is
    such a file too, or closed: then nothing is said, and the status is 1)."""
    if into_errors is not None:
        if into_output is None and not stdout_closed():
            line = f"refusing to write standard error: it is {into_errors} (redirect it elsewhere)"
            # Straight to the descriptor, and let go if it fails: a failed write through
            # sys.stdout would leave its text buffered, and Python reports that at exit
            # on standard error (found by attack: with stdout /dev/full, a traceback of
            # 1.7 KB went into the database, which `2<>` destroyed). A path that is not
            # UTF-8 holds surrogates: escaped, never an error (found by attack too).
            text = f"error: {_one_line(line)}\n"
            with suppress(OSError):
                os.write(1, text.encode("utf-8", "backslashreplace"))
        raise typer.Exit(1)
    if into_output is not None:
        fail(f"refusing to write standard output: it is {into_output} (redirect it elsewhere)")


def echo_json(value: Any, *, err: bool = False) -> None:
    typer.echo(carried_json(json_text(value), sys.stderr if err else None), err=err)


# The attribute naming_store sets on an error: what the command line calls the store.
_STORE_NAMED = "persistence_store_named"


@contextmanager
def naming_store(name: str | None) -> Iterator[None]:
    """An error of a store's URL, checks or opening inside starts its error line with
    `name`, the option that gave the store (`migrate`'s `--to`, `--from`): found by
    attack, `error: initialize: MongoDB unreachable` did not say which side it was."""
    try:
        yield
    except (PersistenceError, ValueError) as exc:
        if name is not None and not hasattr(exc, _STORE_NAMED):
            setattr(exc, _STORE_NAMED, name)
        raise


@asynccontextmanager
async def opened_store(
    config: StorageConfig, name: str, *, read_only: bool = False
) -> AsyncIterator[SessionStorage]:
    """The store of `config`, its schema brought to head, closed after; an error while
    opening it names it as `name` (naming_store). With `read_only`, a store that is
    already a persistence store at head, opened without writing (open_for_reading)."""
    with naming_store(name):
        storage = create_storage(config)
    try:
        with naming_store(name):
            await (storage.open_for_reading() if read_only else storage.initialize())
        yield storage
    finally:
        await storage.close()


def error_line(exc: BaseException) -> str:
    """An expected error as its line says it: the store it names, its message, and the
    notes that say how far a long operation got."""
    line = "; ".join([str(exc), *getattr(exc, "__notes__", [])])
    named = getattr(exc, _STORE_NAMED, None)
    return line if named is None else f"{named}: {line}"


def run(
    ctx: typer.Context,
    options: tuple[Path | None, str | None, int],
    work: Callable[[SessionStorage, StorageConfig, Target], Awaitable[T]],
    *,
    must_exist: bool = False,
    read_only: bool = False,
    check_first: Callable[[], object] | None = None,
    unopened: bool = False,
    store_named: str | None = None,
) -> T:
    """Runs `work` on the configured store, turning every expected error into one line.

    With `must_exist`, the store must already be a persistence store at head (a SQLite
    file is not created, no schema is created or migrated): with `read_only` it is
    opened without writing, else checked without writing, then opened to write.
    Without `must_exist`, the store is created if need be, its schema brought to
    head. `check_first` runs before the store is opened (validating an input file),
    so that a bad input leaves no new database behind. With `unopened`, `work` gets
    the storage as created, not opened (`stamp`: a store initialize() refuses).
    `store_named` starts the error line of a store that cannot be loaded or opened
    (naming_store).
    """
    target = (ctx.find_object(Target) or Target()).merged(*options)
    with _logging(target.verbose), whole_writes(), _terminated_as_interrupted() as terminated:
        try:
            return _run(
                target, work, must_exist, read_only, check_first, unopened, store_named, terminated
            )
        except KeyboardInterrupt:
            _forget_interrupts_of_exec_code()
            # What a shell reports of a process its signal stopped: 128 + its number.
            if terminated:
                fail("terminated", 128 + signal.SIGTERM)
            fail("interrupted", 128 + signal.SIGINT)


def _forget_interrupts_of_exec_code() -> None:
    """Clears CPython's mark of a KeyboardInterrupt that left code `exec` ran from a
    string (dataclasses and namedtuples make their methods so, at import), which makes
    `python -m` end by SIGINT at exit, after whatever status was asked for, even once
    the interrupt was caught. Found by attack: SIGTERM at start-up ended `python -m
    persistence` with `error: terminated` and then a death by SIGINT (a shell's 130,
    not 143). exec clears the mark as it starts any string."""
    exec("pass")  # noqa: S102


@contextmanager
def _terminated_as_interrupted() -> Iterator[list[bool]]:
    """SIGTERM (`kill`, a service manager stopping a job) stops a command as Ctrl-C
    does: its clean-up runs, and it says how far it got. Found by attack: `export-all
    FILE` killed so left its temp file, and a listing stopped with nothing said.
    Yields a list that holds True once SIGTERM came."""
    if threading.current_thread() is not threading.main_thread():
        yield []
        return
    terminated: list[bool] = []

    def stop(signum: int, frame: FrameType | None) -> None:
        terminated.append(True)
        interrupt = signal.getsignal(signal.SIGINT)
        if callable(interrupt):
            # asyncio.run's handler while it runs: it cancels the main task, and raises
            # KeyboardInterrupt once that task has ended. Else Python's, which raises it.
            interrupt(signal.SIGINT, frame)
            return
        raise KeyboardInterrupt  # SIGINT ignored (a job started without job control)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield terminated
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(
    target: Target,
    work: Callable[[SessionStorage, StorageConfig, Target], Awaitable[T]],
    must_exist: bool,
    read_only: bool = False,
    check_first: Callable[[], object] | None = None,
    unopened: bool = False,
    store_named: str | None = None,
    terminated: list[bool] | None = None,
) -> T:
    try:
        with naming_store(store_named):
            config = target.load()
        # Before anything is printed (found by attack: a closed stdout's error line and
        # an input file's error went into a store that stderr was appended to).
        refuse_output_into_store(config)
        if stdout_closed():
            # Found by attack: `sessions list >&-` printed nothing and exited 0.
            fail(STDOUT_CLOSED)
        if check_first is not None:
            check_first()
        with naming_store(store_named):
            logger.info("store: %s", config.display_url)
            if must_exist and config.backend == "sqlite" and not _sqlite_file_exists(config):
                raise PersistenceError(
                    f"no database at {config.database_path}: nothing stored yet"
                    " (create one with `persistence upgrade` or `persistence demo`)"
                )
            # Opened, too, only if there: it may be removed after the check.
            storage = create_storage(config, must_exist=must_exist)
        return asyncio.run(
            _open_and_run(
                storage,
                config,
                target,
                work,
                read_only,
                unopened,
                must_exist,
                store_named,
                terminated or [],
            )
        )
    except typer.Exit:
        raise
    except (PersistenceError, ValueError) as exc:
        fail(error_line(exc))
    except BrokenPipeError:
        # The output's reader went away (`| head`): typer ends the command quietly with
        # status 1, as rich does for what it prints. Not an error line (found by attack).
        raise
    except OSError as exc:
        fail(os_error_line(exc))
    except KeyboardInterrupt:
        raise  # run() says which signal stopped it
    except Exception as exc:
        if _interrupted(exc):
            raise KeyboardInterrupt from exc
        logger.debug("unexpected error", exc_info=True)
        fail(f"unexpected {type(exc).__name__}: {exc} (run with -vv for the traceback)")


def _interrupted(exc: BaseException) -> bool:
    """Whether `exc` came of a KeyboardInterrupt (Ctrl-C, or SIGTERM: _terminated_as_
    interrupted) raised inside C code that called back into Python and did not pass it
    on as it was. Found by attack: Ctrl-C while `import` checked its file, in ijson's
    parser, ended in `error: unexpected SystemError: <method '__contains__' of 'dict'
    objects> returned a result with an exception set`, status 1, not `interrupted`."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, KeyboardInterrupt):
            return True
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return False


def _sqlite_file_exists(config: StorageConfig) -> bool:
    """Whether the SQLite file exists; a path no database can be at (a dangling symlink,
    a symlink loop, a parent that is a file) is refused with its own reason."""
    # Imported here: the SQL layer loads SQLAlchemy, which `persistence --help` must not.
    from persistence.sql.engines import check_sqlite_path

    return check_sqlite_path(config.database_path, must_exist=False)


async def _open_and_run(
    storage: SessionStorage,
    config: StorageConfig,
    target: Target,
    work: Callable[[SessionStorage, StorageConfig, Target], Awaitable[T]],
    read_only: bool = False,
    unopened: bool = False,
    must_exist: bool = False,
    store_named: str | None = None,
    terminated: Sequence[bool] = (),
) -> T:
    if terminated:
        # SIGTERM came before the event loop ran, and the KeyboardInterrupt it raised
        # was swallowed where Python ignores exceptions (an import lock's or a weakref's
        # callback): found by attack, the command then ran to its end and exited 0.
        # In the loop, SIGTERM cancels the work (asyncio.run's SIGINT handler).
        raise KeyboardInterrupt
    if unopened:
        return await work(storage, config, target)
    try:
        with naming_store(store_named):
            if read_only:
                await storage.open_for_reading()
            else:
                if must_exist:
                    # Found by attack: `sessions delete` (even of an id not there)
                    # migrated an older store to head, where `stats` refuses it. Checked
                    # as a reading command checks it, writing nothing; then opened to
                    # write.
                    checked = create_storage(config)
                    try:
                        await checked.open_for_reading()
                    finally:
                        await checked.close()
                await storage.initialize()
        return await work(storage, config, target)
    finally:
        await storage.close()
