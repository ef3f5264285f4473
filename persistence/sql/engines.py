"""Engines and URLs for SQLite (aiosqlite) and PostgreSQL (asyncpg)."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import stat
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiosqlite
from sqlalchemy import URL, Dialect, event, make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool, PoolResetState

from persistence.errors import InvalidDataError, StorageConnectionError
from persistence.sql.connects import Connects
from persistence.sql.runner import run_in_thread
from persistence.sql.thread_answers import answer_safely
from persistence.sql.types import json_dumps, json_value_loads
from persistence.sql.wal_reserve import file_size
from persistence.store_files import (
    database_in_a_journals_place,
    journal_beside_a_database,
    journal_is_hot,
    journal_not_a_file,
    wal_mode_header,
)
from persistence.urls import (
    asyncpg_url,
    postgresql_url_problem,
    userinfo_problem,
)

_POSTGRESQL_SCHEMES = {"postgresql", "postgres", "postgresql+asyncpg"}
_SQLITE_SCHEMES = {"sqlite", "sqlite+aiosqlite"}


def postgresql_url(connection_string: str) -> URL:
    """Accepts `postgresql://`, `postgres://` and `postgresql+asyncpg://`; returns asyncpg's,
    with libpq's query parameters (`sslmode`, `application_name`...) as asyncpg takes them.

    Raises:
        InvalidDataError: for any other scheme, a user name or password that is not
            percent-encoded (the password is never repeated), or a query parameter
            asyncpg cannot use.
    """
    problem = userinfo_problem(connection_string) or postgresql_url_problem(connection_string)
    if problem is not None:
        raise InvalidDataError(f"connection_string: {problem}")
    try:
        url = make_url(asyncpg_url(connection_string))
    except (ArgumentError, ValueError):  # ValueError: a port that is not a number
        raise InvalidDataError(
            "connection_string: not a database URL (expected postgresql://user@host/db)"
        ) from None
    # Schemes are case-insensitive (RFC 3986), as the configuration reads them.
    if url.drivername.lower() not in _POSTGRESQL_SCHEMES:
        raise InvalidDataError(
            f"connection_string: scheme {url.drivername!r} is not PostgreSQL"
            " (use postgresql://, postgres:// or postgresql+asyncpg://)"
        )
    return url.set(drivername="postgresql+asyncpg")


def sqlite_path_from_url(connection_string: str) -> Path:
    """Returns the file of a `sqlite:///path` or `sqlite+aiosqlite:///path` URL.

    Raises:
        InvalidDataError: for another scheme or a URL without a file path.
    """
    try:
        url = make_url(connection_string)
    except (ArgumentError, ValueError):  # ValueError: a port that is not a number
        raise InvalidDataError("connection_string: not a sqlite:///path URL") from None
    if url.drivername.lower() not in _SQLITE_SCHEMES:
        raise InvalidDataError(f"connection_string: scheme {url.drivername!r} is not SQLite")
    if not url.database or url.database == ":memory:":
        raise InvalidDataError("connection_string: a SQLite URL must name a file (sqlite:///path)")
    return Path(url.database)


def sqlite_url(path: Path) -> URL:
    return URL.create("sqlite+aiosqlite", database=str(path))


def milliseconds(seconds: float) -> int:
    """A timeout in whole milliseconds, never 0 for a positive one: SQLite's busy_timeout
    and PostgreSQL's statement_timeout read 0 as "no timeout" (found by attack: 0.0009 s
    was sent as 0, and a statement ran unbounded)."""
    return max(1, round(seconds * 1000))


# The size a -wal file is cut back to when a checkpoint starts it over. SQLite keeps a
# -wal at the largest it ever grew to while any connection is open: a long read (an
# iteration's one state, sqlite_one_state.py) lets it grow by every commit meanwhile,
# about 32 KiB an append, and a service kept that space for its whole life. Four times
# the file wal_reserve.py grows once, so an ordinary store's -wal is never cut; with
# large pages, twice the -wal of a checkpoint's cycle (wal_size_limit).
WAL_SIZE_LIMIT = 16 * 1024 * 1024
_WAL_FRAME_HEADER = 24


def wal_size_limit(page_size: int, checkpoint_pages: int) -> int:
    """The `journal_size_limit` of a store's connections, by its page size and
    `wal_autocheckpoint`. Found by attack: with 64 KiB pages a checkpoint's cycle grows
    the -wal to 65 MB, which a limit of 16 MiB cut at every cycle, to be grown again:
    appends 22% slower."""
    return max(WAL_SIZE_LIMIT, 2 * checkpoint_pages * (page_size + _WAL_FRAME_HEADER))


def sqlite_pragmas(synchronous: str, cache_size: int | None, busy_timeout: float) -> dict[str, Any]:
    """The settings of every connection to the file, in the order they are applied."""
    pragmas: dict[str, Any] = {
        "journal_mode": "WAL",
        "foreign_keys": "ON",
        "busy_timeout": milliseconds(busy_timeout),
        "synchronous": synchronous,
    }
    if cache_size is not None:
        pragmas["cache_size"] = int(cache_size)
    return pragmas


def reading_pragmas(pragmas: dict[str, Any]) -> dict[str, Any]:
    """The settings of a read-only connection: the journal mode is the file's own."""
    return {name: value for name, value in pragmas.items() if name != "journal_mode"}


def _apply_pragmas(connection: Any, pragmas: dict[str, Any]) -> None:
    """Sets `pragmas`, then the -wal's size limit (wal_size_limit), on a DB-API cursor."""
    for name, value in pragmas.items():
        connection.execute(f"PRAGMA {name}={value}")
    sizes = []
    for name in _WAL_SIZES:
        connection.execute(f"PRAGMA {name}")
        sizes.append(int(connection.fetchone()[0]))
    connection.execute(f"PRAGMA journal_size_limit={wal_size_limit(*sizes)}")


def _configure(connection: sqlite3.Connection, pragmas: dict[str, Any]) -> None:
    """_apply_pragmas on a sqlite3 connection, in its thread."""
    cursor = connection.cursor()
    try:
        _apply_pragmas(cursor, pragmas)
    finally:
        cursor.close()


# What wal_size_limit reads of a connection, in its order.
_WAL_SIZES = ("page_size", "wal_autocheckpoint")


def _first_file_ancestor(path: Path) -> Path | None:
    for ancestor in reversed(path.absolute().parents):
        if ancestor.exists() and not ancestor.is_dir():
            return ancestor
    return None


def check_sqlite_path(path: Path, *, must_exist: bool) -> bool:
    """Refuses a path SQLite must not open or create; returns whether the file exists.

    A symlink to a regular file is followed (SQLite keeps its journal beside the
    target); anything that is not a regular file is refused, never replaced. So is a
    file with several hard links (found by attack: two storages through two names of one
    file each kept their own -wal, and the store was corrupt after 1,600 saves).

    Raises:
        StorageConnectionError: for a directory, a FIFO, device or socket, a dangling
            symlink, a file with several hard links, a parent that is not a directory,
            or (with `must_exist`) no file.
    """
    if (named := journal_beside_a_database(path)) is not None:
        # Found by attack: a leftover empty `store.db-wal` given as the store got a whole
        # database written into it, which the next open of store.db threw away.
        kind, database = named
        real = os.path.realpath(path)
        shown = path if os.path.abspath(path) == real else f"{path} (a link to {real})"
        raise StorageConnectionError(
            f"{shown} is named as the {kind} of the SQLite database {database}: refusing"
            " to open it as a database (give the database's own path)"
        )
    if (taken := database_in_a_journals_place(path)) is not None:
        kind, journal, what = taken
        raise StorageConnectionError(
            f"{journal} is {what} where {path} keeps its {kind}: SQLite would take it for"
            " that and throw it away; refusing to open the store (move or rename it first)"
        )
    if (odd := journal_not_a_file(path)) is not None:
        kind, journal, what = odd
        raise StorageConnectionError(
            f"{journal} is {what} where {path} keeps its {kind}: SQLite cannot use it;"
            " refusing to open the store (move it away)"
        )
    try:
        found = os.stat(path)
    except FileNotFoundError:
        if path.is_symlink():
            raise StorageConnectionError(
                f"{path} is a symlink to {os.readlink(path)}, which does not exist:"
                " refusing to create a database through it"
            ) from None
        ancestor = _first_file_ancestor(path)
        if ancestor is not None:
            raise StorageConnectionError(
                f"cannot open {path}: {ancestor} is a file, not a directory"
            ) from None
        if must_exist:
            raise StorageConnectionError(f"no database at {path}: nothing stored yet") from None
        return False
    except NotADirectoryError:
        ancestor = _first_file_ancestor(path)
        raise StorageConnectionError(
            f"cannot open {path}: {ancestor or 'a parent'} is a file, not a directory"
        ) from None
    except OSError as exc:
        raise StorageConnectionError(
            f"cannot open {path}: {exc.strerror or type(exc).__name__}"
        ) from None
    mode = found.st_mode
    if stat.S_ISDIR(mode):
        raise StorageConnectionError(
            f"{path} is a directory, not a database file (name a file: sqlite:///dir/name.db)"
        )
    if not stat.S_ISREG(mode):
        kind = (
            "a FIFO"
            if stat.S_ISFIFO(mode)
            else "a socket"
            if stat.S_ISSOCK(mode)
            else "a device"
            if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
            else "not a regular file"
        )
        raise StorageConnectionError(f"{path} is {kind}, not a database file: refusing to open it")
    if found.st_nlink > 1:
        raise StorageConnectionError(
            f"{path} has {found.st_nlink} hard links: SQLite keeps a database's -wal and"
            " -shm files beside the name it was opened by, so writers through two names"
            " corrupt it; give the file one name (a symlink to it is fine)"
        )
    return True


def sqlite_reading_target(path: Path) -> str:
    """The URI that opens the file read-only (`mode=ro`): nothing is ever written.

    A WAL database needs its -shm file: where the file's directory (a symlink's
    target's: SQLite keeps the journals there) is read-only, a database in WAL mode
    without a -wal is opened as immutable, which needs neither; no writer can be at
    work in it (it would need to create a -wal there; found by attack: beside an empty
    -wal, a writer in EXCLUSIVE locking mode needs no -shm). The choice holds while the
    storage is open: a directory made writable meanwhile is not seen. Not a file with a
    hot -journal, whose unfinished transaction immutable would read, nor a database in
    rollback mode, which needs no -shm and whose writers (TRUNCATE, PERSIST) can work
    there: those open read-only with their locks. Found by attack: immutable was
    chosen by the symlink's own directory (a committed -wal beside the target ignored:
    a backup lost a session), and where a -journal was hot, or a writer at work.
    """
    absolute = path.absolute()
    target = _file_uri(absolute, "ro")
    real = os.path.realpath(absolute)
    if os.access(os.path.dirname(real), os.W_OK):
        return target
    if os.path.lexists(f"{real}-wal"):
        # What SQLite reads through a -shm: a -wal that holds frames, or any -wal of a
        # WAL database. A stray empty one beside a rollback database it reads without
        # (found by attack: refusing that was a regression).
        if not os.path.lexists(f"{real}-shm") and (
            file_size(Path(f"{real}-wal")) or wal_mode_header(real)
        ):
            raise _no_wal_index(path, real)
    elif not journal_is_hot(real) and wal_mode_header(real):
        target += "&immutable=1"
    return target


def _no_wal_index(path: Path, real: str) -> StorageConnectionError:
    """SQLite reads a -wal through its -shm (the wal-index), which it cannot make in a
    directory it cannot write. Found by attack: such a store, its -shm removed, gave
    SQLite's "unable to open database file", naming neither file nor cause."""
    shown = path if os.path.abspath(path) == real else f"{path} (a link to {real})"
    return StorageConnectionError(
        f"cannot read {shown}: it has a -wal, which SQLite reads through its -shm file,"
        f" and {real}-shm is missing and cannot be made ({os.path.dirname(real)} is not"
        " writable): open the store once where its directory can be written (that makes"
        " the -shm), or copy the database with its -wal to a writable directory"
    )


def sqlite_writing_target(path: Path) -> str:
    """The URI that opens an existing file to write (`mode=rw`), never creating one.

    Found by attack: `cleanup` checked that the file was there, then opened its path;
    removed in between, SQLite created a new empty database there.
    """
    return _file_uri(path.absolute(), "rw")


def _file_uri(absolute: Path, mode: str) -> str:
    # The file name's bytes, not its str: a name that is not UTF-8 holds surrogates.
    return f"file:{quote(os.fsencode(absolute))}?mode={mode}"


async def connect_sqlite(
    target: str | Path, *, uri: bool = False, busy_timeout: float
) -> aiosqlite.Connection:
    """Opens an aiosqlite connection; a failed open leaves no thread behind.

    isolation_level=None: the library, not the sqlite3 module, begins transactions.
    """
    connection = aiosqlite.connect(target, isolation_level=None, timeout=busy_timeout, uri=uri)
    # Its thread a daemon, like SQLAlchemy's own aiosqlite adapter's (a forgotten
    # connection never blocks exit), that survives a closed loop (thread_answers).
    answer_safely(connection)
    try:
        return await connection
    except BaseException:
        # aiosqlite then stops its thread, which reports back to this event loop: wait
        # for it, or it reports to a closed loop ("Event loop is closed") at exit.
        await asyncio.shield(asyncio.to_thread(connection._thread.join, 5))
        raise


async def open_sqlite(
    target: str | Path, pragmas: dict[str, Any], busy_timeout: float, *, uri: bool = False
) -> aiosqlite.Connection:
    """Opens the connection that runs each call whole in its own thread."""
    connection = await connect_sqlite(target, uri=uri, busy_timeout=busy_timeout)
    try:
        await run_in_thread(connection, _configure, pragmas)
    except BaseException:
        await connection.close()
        raise
    return connection


def sqlite_engine(
    url: URL,
    pragmas: dict[str, Any],
    busy_timeout: float,
    *,
    target: str | Path | None = None,
    uri: bool = False,
) -> AsyncEngine:
    """The engine of migrations and units of work, set up like `open_sqlite`.

    `target` (a path, or a `file:` URI with `uri`) is what is opened; `url` only
    names the dialect and the file.
    """
    opened = target if target is not None else url.database or ""

    async def connect() -> Any:
        return await connect_sqlite(opened, uri=uri, busy_timeout=busy_timeout)

    engine = create_async_engine(
        url,
        async_creator=connect,
        hide_parameters=True,
        json_deserializer=json_value_loads,
        json_serializer=json_dumps,
        # The pool's own reset rolls back every connection it takes back, a hop to the
        # connection's thread even after a unit of work's COMMIT: `_reset` instead.
        pool_reset_on_return=None,
    )

    @event.listens_for(engine.sync_engine, "reset")
    def _reset(dbapi_connection: Any, _record: Any, state: PoolResetState) -> None:
        # Where the pool's reset would (not for a connection collected as garbage), and
        # only when a transaction is open: sqlite3 answers that from its own state,
        # without the connection's thread, which has no call of ours running by now.
        sqlite = dbapi_connection.driver_connection._connection
        if state.asyncio_safe and sqlite is not None and sqlite.in_transaction:
            dbapi_connection.rollback()

    @event.listens_for(engine.sync_engine, "connect")
    def _configure(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        _apply_pragmas(cursor, pragmas)
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _begin(connection: Any) -> None:
        # Writers take the lock up front: a concurrent writer then waits on the busy
        # timeout instead of failing when a deferred transaction tries to upgrade.
        write = connection.get_execution_options().get("persistence_write")
        connection.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

    return engine


WRITE_OPTIONS: dict[str, Any] = {"persistence_write": True}


def postgresql_connect_args(
    *, statement_timeout: float | None, command_timeout: float | None, connect_timeout: float
) -> dict[str, Any]:
    """Keyword arguments of `asyncpg.connect` shared by the primary and the replicas."""
    from persistence.sql.bound_connections import ProcessBoundConnection

    # A fork's child never closes them: the parent's sockets and epoll set (forks.py).
    connect_args: dict[str, Any] = {
        "timeout": connect_timeout,
        "connection_class": ProcessBoundConnection,
    }
    if command_timeout is not None:
        connect_args["command_timeout"] = command_timeout
    # asyncpg prepares and caches every statement. A generic plan made while a table
    # was nearly empty keeps scanning it whole once it is large, until ANALYZE runs
    # (never, with autovacuum off): a bulk load into a fresh database went quadratic.
    # Sent in the startup packet, so it costs no round trip.
    # READ COMMITTED whatever the database's default: the writes are built on a snapshot
    # per statement (revision 0013's catch-up locks, then reads; a conflict waits and
    # goes on). Found by attack: under `default_transaction_isolation = 'repeatable read'`
    # or 'serializable' a catch-up that waited on a row another writer changed, a
    # delete beside a catch-up, and two units of work appending to one session failed
    # with a serialization error. A snapshot's read still asks for REPEATABLE READ.
    server_settings = {
        "plan_cache_mode": "force_custom_plan",
        "default_transaction_isolation": "read committed",
    }
    if statement_timeout is not None:
        server_settings["statement_timeout"] = str(milliseconds(statement_timeout))
    connect_args["server_settings"] = server_settings
    return connect_args


# asyncpg's own options that a URL may carry (`?statement_cache_size=0` behind PgBouncer
# in transaction mode): a URL's query gives strings, asyncpg compares numbers.
_ASYNCPG_INTEGER_OPTIONS = (
    "statement_cache_size",
    "max_cached_statement_lifetime",
    "max_cacheable_statement_size",
)


def _integer_query_options(url: URL) -> dict[str, int]:
    options: dict[str, int] = {}
    for name in _ASYNCPG_INTEGER_OPTIONS:
        value = url.query.get(name)
        if isinstance(value, str):
            try:
                options[name] = int(value)
            except ValueError:
                raise InvalidDataError(
                    f"connection_string: {name}={value!r} is not a whole number"
                ) from None
    return options


def postgresql_engine(
    url: URL,
    min_pool_size: int,
    max_pool_size: int,
    *,
    statement_timeout: float | None,
    command_timeout: float | None,
    connect_timeout: float,
    pool_timeout: float,
    connects: Connects,
    pooled: bool = True,
) -> AsyncEngine:
    """The storage's engine; not `pooled`, one that opens a connection for each checkout
    and closes it on return (NullPool), with the same settings."""
    connect_args = postgresql_connect_args(
        statement_timeout=statement_timeout,
        command_timeout=command_timeout,
        connect_timeout=connect_timeout,
    )
    integers = _integer_query_options(url)
    if integers:
        url = url.difference_update_query(integers)
        connect_args.update(integers)
    # SQLAlchemy's asyncpg dialect connects through this (its `async_creator_fn`).
    connect_args["async_creator_fn"] = connects
    pool: dict[str, Any] = (
        {
            "pool_size": max(min_pool_size, 1),
            "max_overflow": max_pool_size - max(min_pool_size, 1),
            "pool_timeout": pool_timeout,
        }
        if pooled
        else {"poolclass": NullPool}
    )
    return create_async_engine(
        url,
        **pool,
        connect_args=connect_args,
        hide_parameters=True,
        json_deserializer=json_value_loads,
        json_serializer=json_dumps,
    )


def replica_connect_args(
    url: URL, dialect: Dialect, *, statement_timeout: float | None, connect_timeout: float
) -> dict[str, Any]:
    """Keyword arguments of `asyncpg.connect` for a read replica at `url`.

    The same host, credentials, TLS and server settings as the engine would use,
    with the replica's own short connect timeout. Queries are timed by the caller,
    which drops a connection that hangs rather than asking the server to cancel.
    """
    _, given = dialect.create_connect_args(url)
    options = dict(given)
    # SQLAlchemy's adapter takes these; asyncpg itself knows other names.
    options.pop("prepared_statement_name_func", None)
    cache_size = options.pop("prepared_statement_cache_size", None)
    options.update(_integer_query_options(url))
    if cache_size is not None and "statement_cache_size" not in options:
        options["statement_cache_size"] = int(cache_size)
    options.update(
        postgresql_connect_args(
            statement_timeout=statement_timeout,
            command_timeout=None,
            connect_timeout=connect_timeout,
        )
    )
    return options


def async_driver_url(connection_string: str) -> URL:
    """Returns the async-driver URL for any SQLite or PostgreSQL URL form of the library.

    Raises:
        InvalidDataError: for a scheme that is neither.
    """
    scheme = connection_string.split(":", 1)[0].lower()
    if scheme in _SQLITE_SCHEMES:
        return sqlite_url(sqlite_path_from_url(connection_string))
    return postgresql_url(connection_string)
