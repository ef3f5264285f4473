"""Driver errors -> PersistenceError, at the SQL backend boundary."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy.exc import (
    DBAPIError,
    InterfaceError,
    OperationalError,
    SQLAlchemyError,
)
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from persistence.errors import PersistenceError, StorageConnectionError

# SQLite result codes that mean the file cannot be reached at all.
_SQLITE_UNREACHABLE = {sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_PERM, sqlite3.SQLITE_AUTH}
# Where a full disk may be: SQLite writes temporary files as well as the database's.
# Found by attack: a full temporary directory was reported as the store's disk.
_WHERE_SQLITE_WRITES = (
    "the database's, or that of SQLite's temporary files: SQLITE_TMPDIR, TMPDIR or /var/tmp"
)
_SQLITE_DESCRIPTIONS = {
    sqlite3.SQLITE_FULL: (
        f"the disk is full ({_WHERE_SQLITE_WRITES}) or the file size limit was reached"
    ),
    sqlite3.SQLITE_NOTADB: "the file is not a SQLite database",
    sqlite3.SQLITE_CORRUPT: "the database file is corrupt",
    sqlite3.SQLITE_BUSY: "the database stayed locked by another writer past the busy timeout",
    sqlite3.SQLITE_IOERR: "a disk I/O error occurred",
    sqlite3.SQLITE_READONLY: "the database is read-only",
}


# PostgreSQL SQLSTATEs of a lost or refused connection: class 08 (connection exception)
# and 57P01-57P03 (server shut down, crashed, or not accepting connections yet).
_PG_UNREACHABLE_STATES = ("08", "57P01", "57P02", "57P03")


# Extended result codes said more exactly than their base code. Found by attack: a file
# whose -journal held a transaction its writer never finished (killed mid-write, in
# rollback-journal mode) was "read-only" to every open, which reads it first read-only.
_SQLITE_EXTENDED_DESCRIPTIONS = {
    sqlite3.SQLITE_READONLY_ROLLBACK: (
        "the file's -journal holds a transaction a program did not finish (it was stopped"
        " mid-write), which opening it read-only cannot roll back: open it once with a"
        " program that writes SQLite files (`sqlite3 PATH 'PRAGMA quick_check'`)"
    ),
}


# I/O errors that a full disk (or a file size limit) also gives: SQLite reports its
# own call that failed, not the system's reason. Found by attack: a store reopened on
# a full disk said only "a disk I/O error occurred" (it could not grow its -shm).
_IO_ERRORS_OF_A_FULL_DISK = {
    # Not named more exactly: a virtual table's (FTS5's) failed write, found by attack.
    "SQLITE_IOERR",
    "SQLITE_IOERR_WRITE",
    "SQLITE_IOERR_FSYNC",
    "SQLITE_IOERR_TRUNCATE",
    "SQLITE_IOERR_SHMSIZE",
    "SQLITE_IOERR_SHMMAP",
}


class ReadApart(PersistenceError):
    """An iteration cannot read one state of the store here (its message says why): its
    batches are read apart, each one state (SqlSessionStorage._pages)."""


def _io_error(name: str) -> str:
    said = f"a disk I/O error occurred ({name})" if name else "a disk I/O error occurred"
    if name in _IO_ERRORS_OF_A_FULL_DISK:
        return f"{said}: is the disk full ({_WHERE_SQLITE_WRITES}), or a file at its size limit?"
    return said


def _driver_detail(exc: BaseException) -> str:
    """Names the driver's error without its SQL or parameters (never a password)."""
    orig = exc.orig if isinstance(exc, DBAPIError) else exc
    code = getattr(orig, "sqlite_errorcode", None)
    if code is not None:
        if code in _SQLITE_EXTENDED_DESCRIPTIONS:
            return _SQLITE_EXTENDED_DESCRIPTIONS[code]
        base = code & 0xFF
        if base == sqlite3.SQLITE_IOERR:
            return _io_error(getattr(orig, "sqlite_errorname", ""))
        return _SQLITE_DESCRIPTIONS.get(base, f"{type(orig).__name__}: {orig}")
    first_line = str(orig).strip().splitlines()[0] if str(orig).strip() else ""
    return f"{type(orig).__name__}: {first_line[:200]}" if first_line else type(orig).__name__


try:
    from asyncpg import InterfaceError as _AsyncpgInterfaceError
    from asyncpg import PostgresError as _PostgresError
    from asyncpg.exceptions import (
        AdminShutdownError,
        CannotConnectNowError,
        CrashShutdownError,
        InternalClientError,
    )
    from asyncpg.exceptions import DataError as _AsyncpgDataError
    from asyncpg.exceptions import PostgresConnectionError as _PostgresConnectionError
    from asyncpg.exceptions import UniqueViolationError as _AsyncpgUniqueViolation

    _UNIQUE_VIOLATIONS: tuple[type[BaseException], ...] = (_AsyncpgUniqueViolation,)
    _ASYNCPG_ERRORS: tuple[type[BaseException], ...] = (
        _PostgresError,
        _AsyncpgInterfaceError,
        InternalClientError,
    )
    # After these the connection cannot be lent again: the server ended the session
    # (pg_terminate_backend, shutdown, crash) or the protocol state is broken.
    _ASYNCPG_LOST: tuple[type[BaseException], ...] = (
        _AsyncpgInterfaceError,
        _PostgresConnectionError,
        AdminShutdownError,
        CrashShutdownError,
        CannotConnectNowError,
        InternalClientError,
    )
    _ASYNCPG_DATA: tuple[type[BaseException], ...] = (_AsyncpgDataError,)
except ImportError:  # asyncpg is the optional postgresql extra
    _ASYNCPG_ERRORS = _ASYNCPG_LOST = _UNIQUE_VIOLATIONS = _ASYNCPG_DATA = ()

_SQLITE_UNIQUE = {sqlite3.SQLITE_CONSTRAINT_UNIQUE, sqlite3.SQLITE_CONSTRAINT_PRIMARYKEY}


_DRIVER_ERRORS: tuple[type[BaseException], ...] = (
    SQLAlchemyError,
    sqlite3.Error,
    OSError,
    TimeoutError,
    *_ASYNCPG_ERRORS,
)


def unique_violation(exc: BaseException | None) -> bool:
    """True if the error (or the driver error it wraps) is a unique-key violation."""
    while exc is not None:
        orig = exc.orig if isinstance(exc, DBAPIError) else exc
        if isinstance(orig, _UNIQUE_VIOLATIONS):
            return True
        if isinstance(orig, sqlite3.IntegrityError):
            return getattr(orig, "sqlite_errorcode", None) in _SQLITE_UNIQUE
        exc = exc.__cause__
    return False


def connection_lost(exc: BaseException) -> bool:
    """True if the error means the connection it came from cannot be used again."""
    return isinstance(exc, (OSError, TimeoutError, *_ASYNCPG_LOST)) or (
        isinstance(exc, DBAPIError) and exc.connection_invalidated
    )


def connection_unusable(exc: BaseException) -> bool:
    """True if, after `exc`, the connection it came from must be dropped, never lent
    again: it was lost, or a cancel (or another BaseException) stopped a call midway."""
    return connection_lost(exc) or not isinstance(exc, Exception) or _left_unsynced(exc)


def _left_unsynced(exc: BaseException) -> bool:
    """True for an argument asyncpg could not encode: the server never answered it
    (no severity), and asyncpg (0.32) had sent the statement's parse without a Sync,
    so the connection stays inside an implicit transaction that the next statement
    joins. Found by attack: after one such error, every snapshot read on that pooled
    connection failed ("SET TRANSACTION ISOLATION LEVEL must be called before any
    query")."""
    return isinstance(exc, _ASYNCPG_DATA) and getattr(exc, "severity", None) is None


def lock_not_available(exc: BaseException) -> bool:
    """Whether `exc` (or what it was raised from) is PostgreSQL's lock timeout."""
    return _sqlstate_in_chain(exc, "55P03")


def deadlock_detected(exc: BaseException) -> bool:
    """Whether `exc` (or what it was raised from) is PostgreSQL's deadlock_detected: the
    server rolled the transaction back whole, so nothing of it landed."""
    return _sqlstate_in_chain(exc, "40P01")


def _sqlstate_in_chain(exc: BaseException, sqlstate: str) -> bool:
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return False
        found = seen.orig if isinstance(seen, DBAPIError) else seen
        if getattr(found, "sqlstate", None) == sqlstate:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _unreachable(exc: BaseException) -> bool:
    if isinstance(exc, OSError | TimeoutError | PoolTimeoutError | InterfaceError):
        return True
    sqlstate = getattr(exc.orig if isinstance(exc, DBAPIError) else exc, "sqlstate", None)
    if isinstance(sqlstate, str) and sqlstate.startswith(_PG_UNREACHABLE_STATES):
        return True
    if isinstance(exc, _ASYNCPG_ERRORS):
        return connection_lost(exc)
    if isinstance(exc, DBAPIError):
        if exc.connection_invalidated:
            return True
        code = getattr(exc.orig, "sqlite_errorcode", None)
        if code is not None:
            return code & 0xFF in _SQLITE_UNREACHABLE
        return isinstance(exc, OperationalError) or isinstance(exc.orig, OSError)
    return False


def translate(exc: BaseException, action: str) -> PersistenceError:
    """Returns the library error for a driver or SQLAlchemy error (chain it with `from`)."""
    if isinstance(exc, PoolTimeoutError):
        return StorageConnectionError(
            f"{action}: no database connection free within the pool timeout (pool exhausted)"
        )
    if _unreachable(exc):
        return StorageConnectionError(f"{action}: database unreachable ({_driver_detail(exc)})")
    return PersistenceError(f"{action} failed: {_driver_detail(exc)}")


@contextmanager
def sql_errors(action: str) -> Iterator[None]:
    """Translates what the driver raises inside the block.

    Raises:
        StorageConnectionError: the server or file cannot be reached.
        PersistenceError: any other backend failure, with the driver's error chained.
    """
    try:
        yield
    except PersistenceError:
        raise
    except _DRIVER_ERRORS as exc:
        raise translate(exc, action) from exc
