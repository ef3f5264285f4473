"""Reading every session of a SQLite store in one state of it, as its backup API does.

As on PostgreSQL (one_state.py), `iter_sessions` read each batch in a transaction of
its own, so a unit of work that committed between two batches (a session moved from one
id to another) showed in one batch and not the other, and `migrate` and `export-all`
copied both sessions, or neither. Every batch is now read in one read transaction, on a
connection the iteration opens for itself:

- in WAL mode a read transaction is a snapshot that writers never wait for, so the
  caller's saves between two batches land, and the batches do not see them;
- the storage's own connection stays free for the caller's calls between batches;
- each batch checks, once begun, that the store's files are still those the storage
  opened (opened_files.py), as every transaction of the storage does;
- the storage's `close()` closes the connections of iterations under way, and a
  resumed one then says the storage is closed;
- an iteration closed early (a `break`, an error of its caller) closes its
  connection, which ends its transaction.

Its cost: while it lasts, no checkpoint copies what is written after its state into the
database, so the `-wal` file grows by every commit meanwhile (about 32 KiB an append of
a 300-character message); the first checkpoint after it starts the file over and cuts it
back to WAL_SIZE_LIMIT (engines.py). A file not in WAL mode (a copy opened for reading) would make
every writer wait for such a reader: its batches are read apart (NotInWalMode).
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import AsyncGenerator, Callable
from contextlib import suppress
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite
from sqlalchemy import Dialect

from persistence.errors import PersistenceError
from persistence.garbage_collection import collection_paused
from persistence.sql.engines import open_sqlite
from persistence.sql.runner import ReadAfter, Work, run_in_sqlite_thread, run_in_thread

T = TypeVar("T")

# What the iteration's connection opens: the target, its pragmas, and whether the
# target is a URI (the storage's own `_opened`).
Opened = tuple[str | Path, dict[str, Any], bool]


class NotInWalMode(PersistenceError):
    """The file's journal is not WAL: a long read would make its writers wait."""


class SqliteOneStateReads:
    """The one-state iterations of a SQLite storage, on connections of their own."""

    def __init__(self, opened: Callable[[], Opened], busy_timeout: float) -> None:
        self._opened = opened
        self._busy_timeout = busy_timeout
        self._under_way: set[aiosqlite.Connection] = set()

    async def batches(
        self,
        dialect: Dialect,
        read: ReadAfter[T],
        check_open: Callable[[], None],
        check_files: Callable[[], None],
    ) -> AsyncGenerator[list[T], None]:
        """Yields every batch `read` returns, after "" and then each batch's last key,
        until one is empty. `check_open` runs in the loop before each batch (the storage
        open), `check_files` in the connection's thread once the batch's read has begun.

        Raises:
            NotInWalMode: before any batch, if the file's journal is not WAL.
        """
        check_open()
        target, pragmas, uri = self._opened()
        try:
            connection = await open_sqlite(target, pragmas, self._busy_timeout, uri=uri)
        except Exception:
            check_files()  # a file removed or replaced says so, as a batch would
            raise
        opened_in = os.getpid()
        self._under_way.add(connection)
        try:
            journal = await run_in_thread(connection, _journal_mode, check_files)
            if journal != "wal":
                raise NotInWalMode(f"the file's journal mode is {journal}, not wal")
            after = ""
            begin: str | None = "BEGIN"  # the first batch begins the read transaction
            while True:
                check_open()
                keys, batch = await run_in_thread(
                    connection, _read_on, dialect, read(after), begin, check_files
                )
                begin = None
                if not keys:
                    return
                yield batch
                after = keys[-1]
        finally:
            self._under_way.discard(connection)
            # Closing ends the read transaction; a connection closed already is left so.
            # In a fork's child the connection's thread is the parent's: a close would
            # wait for it for good (found by attack), so the child lets it go.
            if os.getpid() == opened_in:
                with suppress(Exception):
                    await connection.close()

    async def close(self) -> None:
        """Closes the connections of iterations under way (each ends its read)."""
        for connection in list(self._under_way):
            with suppress(Exception):
                await connection.close()

    def let_go(self) -> None:
        """Drops the iterations' connections without closing them (a fork's child: their
        threads are the parent's)."""
        self._under_way.clear()


def _journal_mode(connection: sqlite3.Connection, check_files: Callable[[], None]) -> str:
    """The journal mode of the file the connection opened, once it is the store's."""
    check_files()
    return str(connection.execute("PRAGMA journal_mode").fetchone()[0]).lower()


def _read_on(
    connection: sqlite3.Connection,
    dialect: Dialect,
    work: Work[T],
    begin: str | None,
    check_files: Callable[[], None],
) -> T:
    """A batch's read in the connection's thread, in the read transaction that `begin`
    begins (the first batch) and that is left open for the next."""
    with collection_paused():
        if begin is not None:
            connection.execute(begin)
        check_files()
        return run_in_sqlite_thread(connection, dialect, work, None)
