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
database, so the `-wal` file grows by every commit meanwhile (32-42 KiB an append of a
short message), and appends were about 1.3x slower; the first checkpoint after it starts
the file over and cuts it back to WAL_SIZE_LIMIT (engines.py). Found by attack: on a
nearly full filesystem that -wal took the last free space, and a checkpoint could then
not grow the database: every save failed, after the iteration and after a reopen too.
So a thread of the iteration's own looks every WATCH_SECONDS, while the iteration is
paused too (and its loop busy, or blocked on a full pipe): where the filesystem has less
than FREE_MARGIN free beyond the -wal's size (what a checkpoint may need to grow the
database by), it ends the iteration's read, and the batches after it are each read in
a state of their own, with a warning.

A file not in WAL mode (a copy opened for reading) would make every writer wait for
such a reader: its batches are read apart (NotInWalMode).
"""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3
import threading
from collections.abc import AsyncGenerator, Callable
from contextlib import suppress
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite
from sqlalchemy import Dialect

from persistence.garbage_collection import collection_paused
from persistence.sql.engines import open_sqlite
from persistence.sql.errors import ReadApart
from persistence.sql.runner import (
    ReadAfter,
    Work,
    end_sqlite_transaction,
    run_in_sqlite_thread,
    run_in_thread,
)
from persistence.sql.wal_reserve import file_size

T = TypeVar("T")
logger = logging.getLogger(__name__)

# The free space, beyond the -wal's size, below which an iteration lets its state go (at
# most an eighth of the filesystem), and how often its thread looks.
FREE_MARGIN = 64 * 1024 * 1024
WATCH_SECONDS = 0.25

# What the iteration's connection opens: the target, its pragmas, and whether the
# target is a URI (the storage's own `_opened`).
Opened = tuple[str | Path, dict[str, Any], bool]


class NotInWalMode(ReadApart):
    """The file's journal is not WAL: a long read would make its writers wait."""


class SqliteOneStateReads:
    """The one-state iterations of a SQLite storage, on connections of their own."""

    def __init__(self, database: Path, opened: Callable[[], Opened], busy_timeout: float) -> None:
        self._database = database
        self._opened = opened
        self._busy_timeout = busy_timeout
        # The connections of iterations under way, and the process that opened each.
        self._under_way: dict[aiosqlite.Connection, int] = {}

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
        self._under_way[connection] = os.getpid()
        try:
            journal = await run_in_thread(connection, _journal_mode, check_files)
            if journal != "wal":
                raise NotInWalMode(f"the file's journal mode is {journal}, not wal")
            watch = _SpaceWatch(connection, self._database)
            try:
                after = ""
                warned = False
                while True:
                    check_open()
                    renewed, (keys, batch) = await run_in_thread(
                        connection, _read_on, dialect, read(after), watch.apart, check_files
                    )
                    if renewed and after and not warned:  # the watch let the state go
                        warned = True
                        logger.warning(
                            "an iteration of %s let go of the one state it read in (%s):"
                            " its later batches are each read in a state of their own, so"
                            " a session moved meanwhile may be read twice or not at all",
                            self._database,
                            watch.reason,
                        )
                    if not keys:
                        return
                    yield batch
                    after = keys[-1]
            finally:
                watch.stop()
        finally:
            await self._close(connection)  # which ends the read transaction

    async def close(self) -> None:
        """Closes the connections of iterations under way (each ends its read)."""
        for connection in list(self._under_way):
            await self._close(connection)

    async def _close(self, connection: aiosqlite.Connection) -> None:
        """Closes `connection` once, whoever asks first, and only in the process that
        opened it. Found by attack: `export-all -` whose reader went away waited for good
        when the iteration (cancelled mid-batch) and the storage's close() closed it at
        once, since aiosqlite queued the second close's stop behind the first's, on a
        thread that had ended; and in a fork's child the connection's thread is the
        parent's, so a close there waited for good too."""
        if self._under_way.pop(connection, None) != os.getpid():
            return
        with suppress(Exception):
            await connection.close()

    def let_go(self) -> None:
        """Drops the iterations' connections without closing them (a fork's child: their
        threads are the parent's)."""
        self._under_way.clear()


class _SpaceWatch:
    """Ends an iteration's read where the filesystem runs short of space (FREE_MARGIN),
    from a thread of its own, through the connection's queue: the iteration may be
    paused, and its loop busy or blocked."""

    def __init__(self, connection: aiosqlite.Connection, database: Path) -> None:
        self._connection = connection
        # Through any symlink, once: SQLite names the -wal after the file itself.
        self._database = os.path.realpath(database)
        self._stopped = threading.Event()
        self.reason: str | None = None
        threading.Thread(target=self._run, name="persistence-space-watch", daemon=True).start()

    def apart(self) -> bool:
        """Whether the read was let go: each batch's read then ends with the batch."""
        return self.reason is not None

    def stop(self) -> None:
        self._stopped.set()

    def _run(self) -> None:
        while not self._stopped.wait(WATCH_SECONDS):
            if not self._connection._running:
                # Closed (the storage's close(), found by attack: the watches of
                # iterations left half-read looked on for the process's life).
                return
            reason = space_left_short(self._database)
            if reason is None:
                continue
            self.reason = reason
            sqlite_connection = self._connection._connection
            if self._connection._running and sqlite_connection is not None:
                # Queued: the connection's thread runs it between two of its calls.
                end = partial(end_sqlite_transaction, sqlite_connection, "ROLLBACK")
                self._connection._tx.put_nowait((None, end))
            return


def space_left_short(database: str) -> str | None:
    """What is short, if the filesystem holding `database` (a real path) has less free
    than its -wal's size and a margin: FREE_MARGIN, or an eighth of a smaller filesystem
    (found by attack: on a filesystem of less than 64 MiB no iteration kept its state);
    None if not, or if it cannot tell."""
    wal = file_size(Path(database + "-wal"))
    space = _space(os.path.dirname(database))
    if space is None:
        return None
    free, total = space
    if free >= min(FREE_MARGIN, total // 8) + wal:
        return None
    mib = 1024 * 1024
    return f"its -wal holds {wal / mib:.0f} MiB and the filesystem has {free / mib:.0f} MiB free"


def _space(directory: str) -> tuple[int, int] | None:
    """The free and the total bytes of the filesystem holding `directory`."""
    try:
        usage = shutil.disk_usage(directory)
    except OSError:
        return None
    return usage.free, usage.total


def _journal_mode(connection: sqlite3.Connection, check_files: Callable[[], None]) -> str:
    """The journal mode of the file the connection opened, once it is the store's."""
    check_files()
    return str(connection.execute("PRAGMA journal_mode").fetchone()[0]).lower()


def _read_on(
    connection: sqlite3.Connection,
    dialect: Dialect,
    work: Work[T],
    apart: Callable[[], bool],
    check_files: Callable[[], None],
) -> tuple[bool, T]:
    """A batch's read in the connection's thread, in the read transaction left open by the
    batch before, or in a new one (the first batch's, or once the read was let go:
    returned True). Once `apart()`, the transaction ends with the batch."""
    with collection_paused():
        renewed = not connection.in_transaction
        if renewed:
            connection.execute("BEGIN")
        check_files()
        result = run_in_sqlite_thread(connection, dialect, work, None)
        if apart():
            end_sqlite_transaction(connection, "ROLLBACK")
        return renewed, result
