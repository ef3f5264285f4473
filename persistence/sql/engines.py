"""Engines and URLs for SQLite (aiosqlite) and PostgreSQL (asyncpg)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiosqlite
from sqlalchemy import URL, Dialect, event, make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from persistence.errors import InvalidDataError
from persistence.sql.types import json_dumps, json_loads
from persistence.urls import mask_url, userinfo_problem

_POSTGRESQL_SCHEMES = {"postgresql", "postgres", "postgresql+asyncpg"}
_SQLITE_SCHEMES = {"sqlite", "sqlite+aiosqlite"}


def postgresql_url(connection_string: str) -> URL:
    """Accepts `postgresql://`, `postgres://` and `postgresql+asyncpg://`; returns asyncpg's.

    Raises:
        InvalidDataError: for any other scheme, or a user name or password that is not
            percent-encoded (the password is never repeated).
    """
    problem = userinfo_problem(connection_string)
    if problem is not None:
        raise InvalidDataError(f"connection_string: {problem}")
    try:
        url = make_url(connection_string)
    except (ArgumentError, ValueError):  # ValueError: a port that is not a number
        raise InvalidDataError(
            "connection_string: not a database URL (expected postgresql://user@host/db)"
        ) from None
    if url.drivername not in _POSTGRESQL_SCHEMES:
        raise InvalidDataError(
            f"connection_string: scheme {url.drivername!r} is not PostgreSQL"
            " (use postgresql://, postgres:// or postgresql+asyncpg://)"
        )
    return url.set(drivername="postgresql+asyncpg")


def displayed(url: URL) -> str:
    """The URL for reprs and messages: password and `password=` parameters masked."""
    return mask_url(url.render_as_string(hide_password=False))


def sqlite_path_from_url(connection_string: str) -> Path:
    """Returns the file of a `sqlite:///path` or `sqlite+aiosqlite:///path` URL.

    Raises:
        InvalidDataError: for another scheme or a URL without a file path.
    """
    try:
        url = make_url(connection_string)
    except (ArgumentError, ValueError):  # ValueError: a port that is not a number
        raise InvalidDataError("connection_string: not a sqlite:///path URL") from None
    if url.drivername not in _SQLITE_SCHEMES:
        raise InvalidDataError(f"connection_string: scheme {url.drivername!r} is not SQLite")
    if not url.database or url.database == ":memory:":
        raise InvalidDataError("connection_string: a SQLite URL must name a file (sqlite:///path)")
    return Path(url.database)


def sqlite_url(path: Path) -> URL:
    return URL.create("sqlite+aiosqlite", database=str(path))


def sqlite_pragmas(synchronous: str, cache_size: int | None, busy_timeout: float) -> dict[str, Any]:
    """The settings of every connection to the file, in the order they are applied."""
    pragmas: dict[str, Any] = {
        "journal_mode": "WAL",
        "foreign_keys": "ON",
        "busy_timeout": int(busy_timeout * 1000),
        "synchronous": synchronous,
    }
    if cache_size is not None:
        pragmas["cache_size"] = int(cache_size)
    return pragmas


def _apply_pragmas(connection: Any, pragmas: dict[str, Any]) -> None:
    for name, value in pragmas.items():
        connection.execute(f"PRAGMA {name}={value}")


async def open_sqlite(
    path: Path, pragmas: dict[str, Any], busy_timeout: float
) -> aiosqlite.Connection:
    """Opens the connection that runs each call whole in its own thread.

    isolation_level=None: the library, not the sqlite3 module, begins transactions.
    """
    connection = await aiosqlite.connect(path, isolation_level=None, timeout=busy_timeout)
    try:
        for name, value in pragmas.items():
            await connection.execute(f"PRAGMA {name}={value}")
    except BaseException:
        await connection.close()
        raise
    return connection


def sqlite_engine(url: URL, pragmas: dict[str, Any], busy_timeout: float) -> AsyncEngine:
    """The engine of migrations and units of work, set up like `open_sqlite`."""
    engine = create_async_engine(
        url,
        connect_args={"timeout": busy_timeout},
        hide_parameters=True,
        json_deserializer=json_loads,
        json_serializer=json_dumps,
    )

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
    connect_args: dict[str, Any] = {"timeout": connect_timeout}
    if command_timeout is not None:
        connect_args["command_timeout"] = command_timeout
    # asyncpg prepares and caches every statement. A generic plan made while a table
    # was nearly empty keeps scanning it whole once it is large, until ANALYZE runs
    # (never, with autovacuum off): a bulk load into a fresh database went quadratic.
    # Sent in the startup packet, so it costs no round trip.
    server_settings = {"plan_cache_mode": "force_custom_plan"}
    if statement_timeout is not None:
        server_settings["statement_timeout"] = str(int(statement_timeout * 1000))
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
) -> AsyncEngine:
    connect_args = postgresql_connect_args(
        statement_timeout=statement_timeout,
        command_timeout=command_timeout,
        connect_timeout=connect_timeout,
    )
    integers = _integer_query_options(url)
    if integers:
        url = url.difference_update_query(integers)
        connect_args.update(integers)
    return create_async_engine(
        url,
        pool_size=max(min_pool_size, 1),
        max_overflow=max_pool_size - max(min_pool_size, 1),
        pool_timeout=pool_timeout,
        connect_args=connect_args,
        hide_parameters=True,
        json_deserializer=json_loads,
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
