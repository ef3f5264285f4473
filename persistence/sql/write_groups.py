"""SQLite writes queued at once on one connection, committed together (group commit).

Every SQLite write is a transaction whose COMMIT waits for the disk (synchronous=FULL):
tasks of one process writing different sessions each paid that wait, one after the
other, on the connection's one thread. Writes that queue up while that thread is busy
now run as one transaction when it comes to them, each inside a SAVEPOINT of its own,
and share one COMMIT.

What each caller sees is what running them one after the other would give:
- a work that raises is rolled back to its savepoint: the others are kept, and it
  raises as it would have alone;
- each is answered only once the COMMIT that holds it has returned, so a write is
  acknowledged when it is on disk, as before;
- if the group cannot begin or commit, or SQLite rolls the whole transaction back (a
  full disk, an I/O error), every work of it raises, none reported written.

A write queued alone runs exactly as it did before (no savepoint). Calls queue in
order on the thread; a write joins the group that the next drain takes, so it may
run before a read queued after it, which no caller can tell from timing: both were
waiting at once. A cancelled write still waiting never runs; one running is waited
for (`after_queued`), as for every call on the thread.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar

import aiosqlite
from sqlalchemy import Dialect

from persistence.sql.runner import (
    Work,
    answer_of,
    end_sqlite_transaction,
    run_in_sqlite_thread,
)
from persistence.sql.thread_answers import answer_from_thread

T = TypeVar("T")

# How a group's transaction begins, and the savepoint each write of it runs in.
_BEGIN = "BEGIN IMMEDIATE"
_SAVEPOINT = "grouped_write"

Outcome = tuple[bool, Any]  # (True, result) or (False, the exception raised)


class WriteGroups:
    """The writes of one aiosqlite connection, drained in groups on its thread."""

    def __init__(
        self,
        connection: aiosqlite.Connection,
        dialect: Dialect,
        check: Callable[[], None] | None,
    ) -> None:
        self._connection = connection
        self._dialect = dialect
        self._check = check
        self._lock = threading.Lock()
        self._waiting: list[tuple[asyncio.Future[Any], Work[Any]]] = []
        self._drain_queued = False

    async def run(self, work: Work[T]) -> T:
        """Runs `work` as a write transaction, or as part of one shared with the writes
        waiting beside it; returns its result once committed."""
        connection = self._connection
        sqlite_connection = connection._connection
        if not connection._running or sqlite_connection is None:
            raise ValueError("Connection closed")  # as aiosqlite's own calls say
        answer: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        with self._lock:
            self._waiting.append((answer, work))
            queue_drain = not self._drain_queued
            self._drain_queued = True
        if queue_drain:
            # No future: the drain answers each write itself. The sqlite3 connection as
            # it is now, as run_in_thread takes it (found by attack: a close() cancelled
            # meanwhile let go of aiosqlite's reference before the drain ran, and the
            # writes waiting failed with a bare ValueError).
            connection._tx.put_nowait((None, partial(self._drain, sqlite_connection)))
        return await answer_of(connection, answer)

    def _drain(self, sqlite_connection: sqlite3.Connection) -> None:
        """Runs every write waiting now as one group; in the connection's thread."""
        with self._lock:
            taken, self._waiting = self._waiting, []
            self._drain_queued = False
        group = []
        for answer, work in taken:
            if answer.cancelled():
                work.close()  # cancelled while waiting: it never runs
            else:
                group.append((answer, work))
        if not group:
            return
        try:
            outcomes = run_write_group(
                sqlite_connection,
                self._dialect,
                [work for _, work in group],
                self._check,
                lambda index: not group[index][0].cancelled(),
            )
        except BaseException as exc:  # never leave a caller unanswered
            outcomes = [(False, exc)] * len(group)
        # Every caller answered, whichever loop has closed (found by attack: one
        # caller's closed loop left the callers after it unanswered, their writes
        # committed).
        for (answer, _), (succeeded, value) in zip(group, outcomes, strict=True):
            answer_from_thread(answer, succeeded, value)


def run_write_group(
    connection: sqlite3.Connection,
    dialect: Dialect,
    works: list[Work[Any]],
    check: Callable[[], None] | None,
    wanted: Callable[[int], bool] = lambda index: True,
) -> list[Outcome]:
    """Runs `works` in one write transaction, each in a savepoint; synchronous, in the
    connection's thread. One work alone runs as run_in_sqlite_thread runs it.

    `wanted(index)` is asked before each work of a group starts: a work no longer
    wanted (its caller cancelled while the group waited for the write lock, or ran the
    works before it) never runs.
    """
    if len(works) == 1:
        try:
            result = run_in_sqlite_thread(connection, dialect, works[0], _BEGIN, check=check)
        except BaseException as exc:
            return [(False, exc)]
        return [(True, result)]
    try:
        connection.execute(_BEGIN)
        if check is not None:
            check()
    except BaseException as exc:
        return _all_failed(connection, works, exc)
    outcomes: list[Outcome] = []
    for index, work in enumerate(works):
        if not wanted(index):
            # Found by attack: a write cancelled while its group waited for the lock ran.
            work.close()
            outcomes.append((False, asyncio.CancelledError()))
            continue
        try:
            connection.execute(f"SAVEPOINT {_SAVEPOINT}")
        except BaseException as exc:
            return _all_failed(connection, works[index:], exc, len(outcomes))
        try:
            result = run_in_sqlite_thread(connection, dialect, work, None)
        except BaseException as exc:
            if not connection.in_transaction:
                # SQLite rolled the whole transaction back (SQLITE_FULL, an I/O error):
                # the writes before this one are gone with it.
                return _all_failed(connection, works[index + 1 :], exc, len(outcomes) + 1)
            try:
                connection.execute(f"ROLLBACK TO {_SAVEPOINT}")
                connection.execute(f"RELEASE {_SAVEPOINT}")
            except BaseException as failed:
                return _all_failed(connection, works[index + 1 :], failed, len(outcomes) + 1)
            outcomes.append((False, exc))
        else:
            try:
                connection.execute(f"RELEASE {_SAVEPOINT}")
            except BaseException as exc:
                return _all_failed(connection, works[index + 1 :], exc, len(outcomes) + 1)
            outcomes.append((True, result))
    try:
        connection.execute("COMMIT")
    except BaseException as exc:
        if connection.in_transaction:
            end_sqlite_transaction(connection, "ROLLBACK")
        return [(False, exc) if succeeded else (succeeded, value) for succeeded, value in outcomes]
    return outcomes


def _all_failed(
    connection: sqlite3.Connection, unrun: list[Work[Any]], exc: BaseException, ran: int = 0
) -> list[Outcome]:
    """Every work of the group failed with `exc`: the transaction is rolled back, the
    `ran` works that ran before lost with it, and the `unrun` never start."""
    for work in unrun:
        work.close()
    if connection.in_transaction:
        end_sqlite_transaction(connection, "ROLLBACK")
    return [(False, exc)] * (ran + len(unrun))
