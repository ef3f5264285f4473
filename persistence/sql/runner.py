"""Drives the repositories' work on a connection: one code path, two ways to run it.

A unit of work is a generator that yields requests (Fetch, Execute, ExecuteMany) and
receives their results, so the logic of a save or a load is written once and run:

- on SQLite, whole, inside the aiosqlite connection's own thread: one thread hop for a
  whole transaction instead of several per statement;
- on PostgreSQL, on the asyncpg connection the SQLAlchemy pool lends.

A unit of work runs its works the same ways, on a connection it holds until it ends.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Generator,
    Iterator,
    Mapping,
    Sequence,
)
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import aiosqlite
from sqlalchemy import Dialect

from persistence.errors import PersistenceError
from persistence.garbage_collection import collection_paused
from persistence.sql import plans
from persistence.sql.bulk import BulkInsert, copied_parts
from persistence.sql.checkout import Lent
from persistence.sql.statements import Statement

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Fetch:
    """Runs a statement that returns rows; the reply is a list of decoded tuples."""

    statement: Statement
    params: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Execute:
    """Runs a statement that returns no rows; the reply is the number of rows it changed."""

    statement: Statement
    params: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class ExecuteMany:
    """Runs one statement for each parameter set; the reply is None."""

    statement: Statement
    rows: Sequence[Mapping[str, Any]]


@dataclass(frozen=True, slots=True)
class WhichDialect:
    """Asks which database the work runs on; the reply is the dialect's name."""


# What the runners send to the database; a request is one of these or a question.
Query = Fetch | Execute | ExecuteMany
Request = Query | WhichDialect
Work = Generator[Request, Any, T]
# A page of keyset paging: read after this key, return the page's keys and its items.
ReadAfter = Callable[[str], Work[tuple[list[str], list[T]]]]


# Callbacks that see the SQL of every request the runners send (tests count statements).
_tracers: list[Callable[[str], None]] = []


@contextmanager
def traced(callback: Callable[[str], None]) -> Iterator[None]:
    """Calls `callback(sql)` for every statement the runners send inside the block."""
    _tracers.append(callback)
    try:
        yield
    finally:
        _tracers.remove(callback)


def _trace(sql: str) -> None:
    for callback in _tracers:
        callback(sql)


def _finish(work: Work[T], step: Any, dialect: Dialect) -> T:
    """Feeds replies to `work` until it returns; `step` answers each request."""
    reply: Any = None
    try:
        while True:
            request = work.send(reply)
            reply = dialect.name if isinstance(request, WhichDialect) else step(request)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]
    finally:
        work.close()


def _sqlite_step(connection: sqlite3.Connection, dialect: Dialect) -> Callable[[Query], Any]:
    """Answers each query of a work on a sqlite3 connection, in its own thread."""

    def step(request: Query) -> Any:
        if isinstance(request, ExecuteMany) and isinstance(request.statement, BulkInsert):
            # A few multi-row statements instead of one per row (see bulk.py).
            for bulk_sql, values in request.statement.multirow(dialect, request.rows):
                _trace(bulk_sql)
                connection.execute(bulk_sql, values)
            return None
        compiled = request.statement.compile(dialect)
        if isinstance(request, ExecuteMany):
            _trace(compiled.sql)
            connection.executemany(compiled.sql, [compiled.values(row) for row in request.rows])
            return None
        sql, params = compiled.bind(request.params)
        _trace(sql)
        cursor = connection.execute(sql, params)
        if isinstance(request, Fetch):
            rows = cursor.fetchall()
            try:
                return compiled.decode(rows)
            except (ValueError, TypeError) as exc:
                # A hand edit (or a damaged file) left a value its column cannot read
                # back. Found by attack: an updated_at edited to '2026-13-45 99:00' was
                # reported as a corrupt file, naming nothing, though integrity_check
                # passed.
                raise PersistenceError(
                    f"a stored value cannot be read: {compiled.unreadable(rows)}; it was"
                    " written outside persistence, or the file is damaged (PRAGMA"
                    " integrity_check tells the two apart)"
                ) from exc
        return cursor.rowcount

    return step


def run_in_sqlite_thread(
    connection: sqlite3.Connection,
    dialect: Dialect,
    work: Work[T],
    begin: str | None,
    end: bool = True,
    check: Callable[[], None] | None = None,
) -> T:
    """Runs `work` synchronously; meant to run in the aiosqlite connection's thread.

    With `begin` (BEGIN IMMEDIATE for writes, BEGIN for reads) the work is one
    transaction: committed if it returns, rolled back if anything raises. Without
    `end` the transaction is left open (a unit of work's first work), for
    end_sqlite_transaction. `check` runs once the transaction has begun, before the
    work: if it raises, the transaction is rolled back and the work never runs.
    """

    if begin is not None:
        connection.execute(begin)
        if check is not None:
            _check_begun(connection, work, check)
        if end:
            return _finish_transaction(connection, dialect, work)
    return _finish(work, _sqlite_step(connection, dialect), dialect)


def _check_begun(
    connection: sqlite3.Connection, work: Work[Any], check: Callable[[], None]
) -> None:
    try:
        check()
    except BaseException:
        work.close()
        end_sqlite_transaction(connection, "ROLLBACK")
        raise


def end_sqlite_transaction(
    connection: sqlite3.Connection, verb: str, check: Callable[[], None] | None = None
) -> None:
    """COMMIT or ROLLBACK the connection's open transaction, if it has one.

    Before a COMMIT, `check` (run_in_sqlite_thread's) runs again: if it raises, the
    transaction is rolled back instead. Found by attack: a unit of work whose file was
    replaced or removed after its first statement committed into the old, unlinked file
    and reported success.
    """
    if not connection.in_transaction:
        return
    if verb == "COMMIT" and check is not None:
        try:
            check()
        except BaseException:
            connection.execute("ROLLBACK")
            raise
    connection.execute(verb)


def read_in_sqlite_thread(
    connection: sqlite3.Connection,
    dialect: Dialect,
    work: Work[T],
    begin: str | None,
    check: Callable[[], None] | None = None,
) -> T:
    """run_in_sqlite_thread for a read, with the cyclic garbage collector paused.

    A read makes thousands of tracked objects at once (the driver's rows, then the
    models built from them) and no reference cycles, yet those allocations set off
    collections, the oldest generation's walking every object of the process: a load
    of 1,000 messages spent about a third of its time there. The messages' building
    was already paused (persistence.garbage_collection); now the fetch is too. A read
    is one bounded transaction in this thread, so the pause ends with it.
    """
    with collection_paused():
        return run_in_sqlite_thread(connection, dialect, work, begin, check=check)


def _finish_transaction(connection: sqlite3.Connection, dialect: Dialect, work: Work[T]) -> T:
    """Runs `work` in the transaction just begun: committed if it returns, rolled back
    if anything raises."""
    try:
        result = _finish(work, _sqlite_step(connection, dialect), dialect)
    except BaseException:
        end_sqlite_transaction(connection, "ROLLBACK")
        raise
    connection.execute("COMMIT")
    return result


def run_unless_locked(
    connection: sqlite3.Connection,
    dialect: Dialect,
    work: Work[T],
    busy_timeout_ms: int,
    check: Callable[[], None] | None = None,
) -> tuple[bool, T | None]:
    """Runs `work` as one write transaction, as run_in_sqlite_thread does (`check`
    included), if the write lock is free now; (False, None) without waiting when another
    writer holds it."""
    connection.execute("PRAGMA busy_timeout = 0")
    try:
        connection.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError as exc:
        if exc.sqlite_errorcode != sqlite3.SQLITE_BUSY:
            raise
        work.close()
        return False, None
    finally:
        connection.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
    if check is not None:
        _check_begun(connection, work, check)
    return True, _finish_transaction(connection, dialect, work)


async def run_in_thread(connection: aiosqlite.Connection, fn: Any, *args: Any) -> Any:
    """Calls `fn(sqlite3_connection, *args)` in the aiosqlite connection's own thread.

    aiosqlite runs every call of its API as one such function on its thread, queued
    with the future it answers (its `_execute`); here a whole transaction is one of
    them (SQLAlchemy's aiosqlite adapter queues functions on the same thread too).

    A cancel does not leave the call behind: one still queued never runs, and one
    running is waited for, so whatever it writes has landed or never will once the
    CancelledError is raised. Found by attack: a cancelled save, still queued behind
    another call, committed after the caller's next save through another storage had
    been acknowledged, and brought back the message that save removed. The call is
    queued here rather than through `_execute`, so the cancel costs nothing until it
    comes (a task and a shield around `_execute` cost 17 us a call).
    """
    if not connection._running or connection._connection is None:
        raise ValueError("Connection closed")  # as aiosqlite's own calls say
    sqlite_connection = connection._connection
    answer = asyncio.get_running_loop().create_future()

    def call() -> Any:
        if answer.cancelled():
            raise _Dropped
        return fn(sqlite_connection, *args)

    connection._tx.put_nowait((answer, call))
    return await answer_of(connection, answer)


async def answer_of(connection: aiosqlite.Connection, answer: asyncio.Future[T]) -> T:
    """Awaits the answer to a call queued on the connection's thread; cancelled, returns
    only once the call has ended or is sure never to run (see run_in_thread)."""
    try:
        return await answer
    except asyncio.CancelledError:
        if answer.cancelled():
            await after_queued(connection)
        raise


class _Dropped(Exception):
    """A call cancelled before it ran: it never does."""


def _nothing() -> None:
    return None


async def after_queued(connection: aiosqlite.Connection) -> None:
    """Returns, through any further cancels, once every call queued on the connection's
    thread so far has ended: the thread answers the calls in order."""
    if not connection._running:
        # Closing: nothing can be queued after its stop; the calls before it still end
        # in order, unwaited (the storage is closing).
        return
    barrier = asyncio.get_running_loop().create_future()
    connection._tx.put_nowait((barrier, _nothing))
    while not barrier.done():
        with suppress(asyncio.CancelledError):
            await asyncio.wait([barrier])


async def _finish_async(
    work: Work[T], step: Callable[[Query], Awaitable[Any]], dialect: Dialect
) -> T:
    """Feeds replies to `work` until it returns; `step` answers each request, awaited."""
    reply: Any = None
    try:
        while True:
            request = work.send(reply)
            if isinstance(request, WhichDialect):
                reply = dialect.name
            else:
                reply = await step(request)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]
    finally:
        work.close()


async def _copy(
    step: Callable[[Query], Awaitable[Any]],
    connection: Any,
    dialect: Dialect,
    statement: BulkInsert,
    rows: Sequence[Mapping[str, Any]],
) -> None:
    """COPYs `rows` into the statement's table on the asyncpg `connection`, with the
    planner settings of plans.py around it, set through `step` (the runner's own).

    The rows go in parts (bulk.copied_parts), and each part's records are built while
    the server stores the part before: `rows` may build its rows only when sliced
    (mapping.MessageRows), so the search documents are computed then too.
    """
    parts = (
        statement.records(dialect, rows[start:stop]) for start, stop in copied_parts(len(rows))
    )
    records = next(parts, [])
    # The settings are local to the transaction the COPY must run in.
    before = await step(Fetch(plans.KEEP_PLANS, {}))
    assert connection.is_in_transaction(), "a bulk insert runs in a transaction"
    while records:
        _trace(statement.copy_sql())
        records = await _copy_unless_lost(
            connection, statement.table.name, records, statement.names, lambda: next(parts, [])
        )
    await step(Fetch(plans.RESTORE_PLANS, plans.restoring(before)))


async def _copy_unless_lost(
    connection: Any,
    table: str,
    records: list[tuple[Any, ...]],
    columns: Sequence[str],
    meanwhile: Callable[[], T],
) -> T:
    """asyncpg's `copy_records_to_table`, raising when the connection is lost meanwhile;
    returns `meanwhile()`, called while the server stores the records once they are sent.

    Between chunks of data asyncpg waits for the socket to take more, and that wait
    never ends once the server has closed the connection (the backend terminated, the
    server restarted): the COPY hung for ever. So it races the connection's end.

    Raises:
        asyncpg.ConnectionDoesNotExistError: the connection closed during the COPY.
    """
    loop = asyncio.get_running_loop()
    lost: asyncio.Future[None] = loop.create_future()
    sent: asyncio.Future[None] = loop.create_future()

    def on_termination(_: Any) -> None:
        if not lost.done():
            lost.set_result(None)

    async def feed() -> AsyncIterator[tuple[Any, ...]]:
        for record in records:
            yield record
        # asyncpg now writes the last data and the end of the COPY, then waits for the
        # server: the records are on their way when this task next runs.
        sent.set_result(None)

    connection.add_termination_listener(on_termination)
    copy = asyncio.ensure_future(
        connection.copy_records_to_table(table, records=feed(), columns=columns)
    )
    built: list[T] = []
    try:
        await asyncio.wait((copy, lost, sent), return_when=asyncio.FIRST_COMPLETED)
        if not copy.done() and not lost.done():
            built.append(meanwhile())
        await asyncio.wait((copy, lost), return_when=asyncio.FIRST_COMPLETED)
    finally:
        connection.remove_termination_listener(on_termination)
        if not copy.done():
            # This task was cancelled, or the connection ended: asyncpg aborts the COPY
            # when its own task is cancelled.
            copy.cancel()
            await asyncio.wait((copy,))
    if copy.cancelled():
        from asyncpg import ConnectionDoesNotExistError  # the optional postgresql extra

        raise ConnectionDoesNotExistError(f"the connection closed during the COPY into {table}")
    copy.result()
    return built[0] if built else meanwhile()


def one_statement(work: Work[T]) -> Work[T]:
    """`work`, stopped with an error before a second statement or an `ExecuteMany`.

    For a write sent without BEGIN / COMMIT around it (PostgreSQL): one statement is
    atomic on its own, with its cascades and triggers, and more would not be.

    Raises:
        RuntimeError: `work` sends more than one statement.
    """
    sent = False
    reply: Any = None
    try:
        while True:
            request = work.send(reply)
            if not isinstance(request, WhichDialect):
                if sent or isinstance(request, ExecuteMany):
                    raise RuntimeError(
                        "a write run as one statement sent more than one: it needs a transaction"
                    )
                sent = True
            reply = yield request
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]
    finally:
        work.close()


async def _answer(connection: Any, dialect: Dialect, request: Query) -> Any:
    """Answers one query of a work on a raw asyncpg connection."""
    if (
        isinstance(request, ExecuteMany)
        and isinstance(request.statement, BulkInsert)
        and request.statement.copies(dialect, request.rows)
    ):
        # A COPY in parts for all the rows (see bulk.py), not one statement per row.
        step = partial(_answer, connection, dialect)
        await _copy(step, connection, dialect, request.statement, request.rows)
        return None
    compiled = request.statement.compile(dialect)
    if isinstance(request, ExecuteMany):
        _trace(compiled.sql)
        await connection.executemany(compiled.sql, [compiled.values(row) for row in request.rows])
        return None
    sql, params = compiled.bind(request.params)
    _trace(sql)
    if isinstance(request, Fetch):
        return compiled.decode(await connection.fetch(sql, *params))
    # asyncpg returns the command tag, e.g. "UPDATE 3" or "INSERT 0 1".
    status = await connection.execute(sql, *params)
    return int(status.rsplit(" ", 1)[-1])


async def run_on_asyncpg(connection: Any, dialect: Dialect, work: Work[T]) -> T:
    """Runs `work` on a raw asyncpg connection, in the caller's transaction if any."""
    return await _finish_async(work, partial(_answer, connection, dialect), dialect)


async def read_on_asyncpg(lent: Lent, dialect: Dialect, work: Work[T]) -> T:
    """Runs a read's `work` on a lent asyncpg connection, outside a transaction.

    Its first statement, if it finds the connection ended by the server, is sent again
    on a fresh one (Lent.first): a read commits nothing, and the work, still waiting
    for that statement's rows, goes on as if nothing happened.
    """
    sent = False

    async def step(request: Query) -> Any:
        nonlocal sent
        if not sent:
            sent = True
            if isinstance(request, Fetch):
                return await lent.first(lambda driver: _answer(driver, dialect, request))
        return await _answer(lent.driver, dialect, request)

    return await _finish_async(work, step, dialect)
