"""The SQL unit of work: one pooled connection, one transaction, all or nothing."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable, Collection, Iterator
from contextlib import AbstractAsyncContextManager, contextmanager
from types import TracebackType
from typing import Any, Self, TypeVar
from weakref import WeakKeyDictionary

from sqlalchemy.ext.asyncio import AsyncEngine

from persistence.changes import Base, SavePlan, Uncommitted
from persistence.errors import InvalidDataError, PersistenceError
from persistence.models import ChatSession, UploadedFileRecord
from persistence.sql import repositories, writes
from persistence.sql.checkout import Lent, begin, lent_connection
from persistence.sql.errors import connection_unusable, sql_errors, unique_violation
from persistence.sql.held_sessions import UnheldTurn, hold, release
from persistence.sql.runner import (
    Work,
    end_sqlite_transaction,
    run_in_sqlite_thread,
    run_in_thread,
    run_on_asyncpg,
)
from persistence.sql.writes import Saved
from persistence.storage import UnitOfWork, check_file_record
from persistence.validation import check_instance, lookup_id

T = TypeVar("T")


def _nothing() -> Work[None]:
    """Work of no statement: running it begins the transaction."""
    return
    yield


# Per task, the tokens of the storages whose units of work it holds open, and how many.
# Kept by task, not in a context variable: a task started inside a unit of work copies
# the context, and kept it open for itself for the rest of its life (found by attack:
# its every write through the storage was refused).
_OPEN: WeakKeyDictionary[asyncio.Task[Any], Counter[str]] = WeakKeyDictionary()


# Per task, its units of work that hold a pooled connection now (from their first work
# until they end): another call of that storage from the task needs another connection,
# and waits for any row those units wrote.
_LENDING: WeakKeyDictionary[asyncio.Task[Any], list[SqlUnitOfWork]] = WeakKeyDictionary()


def _lending_units() -> list[SqlUnitOfWork]:
    if not _LENDING:
        return []
    task = asyncio.current_task()
    return [] if task is None else _LENDING.get(task, [])


def lending_units_of_work() -> Collection[str]:
    """Tokens of the storages whose units of work the current task runs hold a pooled
    connection now."""
    return {unit.token for unit in _lending_units()}


def sessions_written_in_this_task(token: str) -> set[str]:
    """The ids of the sessions that the current task's open units of work of storage
    `token` wrote (saved or deleted): their rows are locked until the units end."""
    return set().union(*(unit.written for unit in _lending_units() if unit.token == token))


def open_units_of_work() -> Collection[str]:
    """Tokens of the storages with a unit of work open in the current task."""
    if not _OPEN:
        return ()
    task = asyncio.current_task()
    return () if task is None else _OPEN.get(task, ())


class _SqlSessions:
    def __init__(self, uow: SqlUnitOfWork) -> None:
        self._uow = uow

    async def get(self, session_id: str) -> ChatSession | None:
        if not lookup_id(session_id, "session_id"):
            return None
        uow = self._uow
        session = await uow.run(
            repositories.read_session(session_id, uow.token, None), "load session"
        )
        if session is not None and session_id in uow.written:
            # It holds this unit's writes: stored only if the unit commits.
            session.read_uncommitted(uow.token, uow.uncommitted)
            uow.read_after_writes.append(session)
        return session

    async def add(self, session: ChatSession) -> None:
        check_instance(session, ChatSession, "session")
        uow = self._uow
        # Planned only once the transaction has begun (on SQLite, with the write lock),
        # and in the object's save turn: found by attack, a unit planned its save, then
        # waited for the lock another unit held, which added the same object and
        # committed; the stale plan then landed, undoing that unit's newer values, and
        # the object's base lost that unit's messages.
        await uow.begin()
        async with UnheldTurn(uow.token, session, in_unit=True):
            plan = session.plan_save(uow.token)
            uow.written.add(session.session_id)
            try:
                saved = await uow.run(writes.write_plan(plan), "save session")
            except PersistenceError as exc:
                if unique_violation(exc):
                    ids = ", ".join(repr(message.message_id) for message in plan.appends[:3])
                    raise InvalidDataError(
                        f"session {session.session_id!r}: a new message's id is already stored"
                        f" (one of {ids}); roll this unit of work back"
                    ) from exc
                raise
            uow.saved_until_rollback(session, plan, saved)

    async def delete(self, session_id: str) -> bool:
        if not lookup_id(session_id, "session_id"):
            return False
        self._uow.written.add(session_id)
        return await self._uow.run(repositories.delete_session(session_id), "delete session")


class _SqlFiles:
    def __init__(self, uow: SqlUnitOfWork) -> None:
        self._uow = uow

    async def get(self, file_id: str) -> UploadedFileRecord | None:
        if not lookup_id(file_id, "file_id"):
            return None
        return await self._uow.run(repositories.read_file_record(file_id), "load file record")

    async def add(self, record: UploadedFileRecord) -> None:
        check_file_record(record, "record")
        await self._uow.run(repositories.write_file_record(record), "save file record")

    async def delete(self, file_id: str) -> bool:
        if not lookup_id(file_id, "file_id"):
            return False
        return await self._uow.run(repositories.delete_file_record(file_id), "delete file record")


class SqlUnitOfWork(UnitOfWork):
    """Everything done through `sessions` and `files` commits together or not at all.

    It borrows a driver connection from the engine's pool at its first work and gives it
    back when it commits, rolls back or closes (sql/checkout.py), and drives that
    connection itself, as a storage's own calls do, without SQLAlchemy's Session and
    Connection around it: each of those calls cost a greenlet hop, and on SQLite the
    transaction's BEGIN alone three hops to the connection's thread. On SQLite the
    transaction takes the write lock when it begins (BEGIN IMMEDIATE, sent with the first
    work in one hop), so a concurrent writer waits for it instead of failing half way.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        token: str,
        refuse_closed: Callable[[], None],
        check: Callable[[], None] | None = None,
    ) -> None:
        self.token = token
        # Raises once the storage is closed: a unit entered before close() borrows no
        # connection after it. Found by attack: it borrowed one from the disposed
        # engine's new pool, committed, and the connection was kept, owned by nobody.
        self._refuse_closed = refuse_closed
        # SQLite: run once the transaction has begun (run_in_sqlite_thread's `check`).
        self._check = check
        self._engine = engine
        self._lent: AbstractAsyncContextManager[Lent] | None = None
        self._driver: Any = None
        self._transaction: Any = None  # asyncpg's, on PostgreSQL
        # What interrupted a call on the connection (a cancel, a lost connection): it is
        # then dropped, not ended, and its transaction dies with it.
        self._interrupted: BaseException | None = None
        # The call that failed inside the transaction: what it began may be half done
        # (SQLite keeps a failed statement's earlier ones; PostgreSQL aborts the whole
        # transaction), so the unit can only be rolled back.
        self._failed: str | None = None
        # Per object saved in this unit: the object, its base before the unit, and the
        # plans the unit sent for it.
        self._undo: dict[int, tuple[ChatSession, Base | None, list[SavePlan]]] = {}
        # The ids of the sessions this unit wrote (saved or deleted), and the objects
        # `sessions.get` read after such a write, marked with `uncommitted`: if the unit
        # does not commit, what they hold may never be stored (read_uncommitted).
        self.written: set[str] = set()
        self.read_after_writes: list[ChatSession] = []
        self.uncommitted = Uncommitted()
        self._committed = False
        # Its `async with` block has been left. Found by attack: a call through the unit
        # after that began a transaction nothing ended, on a connection never given back
        # (on SQLite holding the write lock: every later write failed at the busy timeout).
        self._ended = False
        # The task that entered the unit of work (see _OPEN).
        self._owner: asyncio.Task[Any] | None = None
        self._held: list[tuple[str, int]] = []
        # The task counted in _LENDING while the unit holds a connection.
        self._lending: asyncio.Task[Any] | None = None
        self.sessions = _SqlSessions(self)
        self.files = _SqlFiles(self)

    async def run(self, work: Work[T], action: str) -> T:
        """Runs repository work in this unit's transaction, begun with the first work."""
        if self._committed:
            work.close()
            raise PersistenceError("unit of work already committed: start a new one")
        if self._ended:
            work.close()
            raise _ended_error()
        if self._interrupted is not None:
            work.close()
            raise PersistenceError("unit of work interrupted: leave it and start a new one")
        if self._failed is not None:
            work.close()
            raise self._failure()
        dialect = self._engine.dialect
        with sql_errors(action):
            sqlite_begin = None
            lent = None
            if self._driver is None:
                try:
                    self._refuse_closed()
                except PersistenceError:
                    work.close()
                    raise
                opened = lent_connection(self._engine)
                lent = await opened.__aenter__()
                self._lent, self._driver = opened, lent.driver
                self._lending = self._owner or asyncio.current_task()
                if self._lending is not None:
                    _LENDING.setdefault(self._lending, []).append(self)
                sqlite_begin = "BEGIN IMMEDIATE"
            with self._noting_interruption(action):
                if dialect.name == "sqlite":
                    result: T = await run_in_thread(
                        self._driver,
                        run_in_sqlite_thread,
                        dialect,
                        work,
                        sqlite_begin,
                        False,
                        self._check,
                    )
                    return result
                if lent is not None:
                    # Sent again on a fresh connection if the server had ended this one.
                    self._transaction = await lent.first(begin)
                    self._driver = lent.driver
                return await run_on_asyncpg(self._driver, dialect, work)

    async def begin(self) -> None:
        """Begins the transaction now if no work has begun it yet."""
        if self._driver is None:
            await self.run(_nothing(), "begin")

    def saved_until_rollback(self, session: ChatSession, plan: SavePlan, saved: Saved) -> None:
        """Takes the save as stored now; a rollback gives the object back its old base.
        Until this unit ends, other tasks' saves of the object wait (held_sessions)."""
        if id(session) not in self._undo:
            self._undo[id(session)] = (session, session.base_for(self.token), [])
            self._held.append(hold(self.token, session, self._owner or asyncio.current_task()))
        self._undo[id(session)][2].append(plan)
        session.saved_to(
            self.token,
            plan,
            saved.revision,
            saved.incarnation,
            exact=saved.exact,
            keep_log=True,
            removals=saved.removals,
        )

    async def commit(self) -> None:
        if self._ended and not self._committed:
            raise _ended_error()
        if self._failed is not None:
            await self.rollback()
            raise self._failure()
        try:
            with sql_errors("commit"):
                await self._end("COMMIT")
        except BaseException as exc:
            # The commit may have landed before the error, or not: later saves send
            # this unit's changes again, checking what the store holds.
            for session, base, sent in self._undo.values():
                session.restore_base(self.token, base)
                session.save_failed(self.token, *sent)
            self._undo.clear()
            self._void_reads()
            await self._give_back(exc)
            raise
        self._committed = True
        # Found by attack: without this, a session saved only through units of work
        # kept every edit, rewind and pop in its log for the object's life.
        for session, base, _sent in self._undo.values():
            session.settled(base)
        self._undo.clear()
        self.read_after_writes.clear()
        await self._give_back(None)

    async def rollback(self) -> None:
        # Found by attack: a rollback after the commit marked the unit's reads as never
        # committed, and their later saves were refused as conflicts.
        if self._committed:
            raise PersistenceError("unit of work already committed: start a new one")
        if self._ended:
            raise _ended_error()
        # The store holds none of this unit's changes: later saves must send them again.
        for session, base, _sent in self._undo.values():
            session.restore_base(self.token, base)
        self._undo.clear()
        self._void_reads()
        try:
            with sql_errors("rollback"):
                await self._end("ROLLBACK")
        except BaseException as exc:
            await self._give_back(exc)
            raise
        await self._give_back(None)

    def _void_reads(self) -> None:
        """The objects read after this unit's writes to their sessions, and their
        copies, hold what the store may never have held: their saves are refused until
        loaded again. Those read before any write hold what was committed."""
        self.uncommitted.void = True
        self.uncommitted = Uncommitted()
        for session in self.read_after_writes:
            session.unit_ended()
        self.read_after_writes.clear()
        self.written.clear()

    async def _end(self, verb: str) -> None:
        """Commits or rolls back the transaction, if one was begun."""
        if self._driver is None:
            return
        if self._interrupted is not None:
            if verb == "COMMIT":
                raise PersistenceError("unit of work interrupted: nothing was committed")
            return  # dropping the connection rolls the transaction back
        with self._noting_interruption():
            if self._transaction is not None:
                transaction, self._transaction = self._transaction, None
                await (transaction.commit() if verb == "COMMIT" else transaction.rollback())
            elif self._engine.dialect.name == "sqlite":
                await run_in_thread(self._driver, end_sqlite_transaction, verb, self._check)

    def _failure(self) -> PersistenceError:
        return PersistenceError(
            f"unit of work failed at {self._failed!r}: nothing of it was committed; roll"
            " it back (leave its block) and start a new one"
        )

    @contextmanager
    def _noting_interruption(self, action: str | None = None) -> Iterator[None]:
        """Records an error that leaves the connection unusable (sql.errors), and one
        that `action`, a call inside the transaction, raised."""
        try:
            yield
        except BaseException as exc:
            if connection_unusable(exc):
                self._interrupted = exc
            elif action is not None:
                self._failed = action
            raise

    async def _give_back(self, error: BaseException | None) -> None:
        """Returns the connection to the pool; after `error`, one that may be unusable
        (lost, or cancelled mid-call) is dropped instead (sql/checkout.py). The objects
        it held are released first: their bases are final."""
        release(self._held)
        self._held = []
        lent, self._lent, self._driver, self._transaction = self._lent, None, None, None
        lending, self._lending = self._lending, None
        units = None if lending is None else _LENDING.get(lending)
        if units is not None and self in units:
            units.remove(self)
            if not units:
                del _LENDING[lending]  # type: ignore[arg-type]
        error = self._interrupted or error
        if lent is not None:
            with sql_errors("close unit of work"):
                if error is None:
                    await lent.__aexit__(None, None, None)
                else:
                    await lent.__aexit__(type(error), error, error.__traceback__)

    async def __aenter__(self) -> Self:
        task = asyncio.current_task()
        if task is not None:
            held = _OPEN.setdefault(task, Counter())
            if held[self.token] and self._engine.dialect.name == "sqlite":
                raise PersistenceError(
                    "unit_of_work(): this task already holds an open unit of work of the same"
                    " SQLite store (through this storage or another of the same file), whose"
                    " write lock it would wait for until the busy timeout; do the work in that"
                    " one, or after it"
                )
            held[self.token] += 1
            self._owner = task
        return self

    def _leave(self) -> None:
        task, self._owner = self._owner, None
        held = None if task is None else _OPEN.get(task)
        if task is None or held is None:
            return
        held[self.token] -= 1
        if held[self.token] <= 0:
            del held[self.token]
        if not held:
            del _OPEN[task]

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._ended:
            return  # left twice: the first exit ended it
        try:
            if not self._committed:
                try:
                    await self.rollback()
                except PersistenceError:
                    if exc is None:
                        raise
                    # The block's own error goes on: it says what failed. A rollback
                    # fails when the connection is gone, and its transaction with it.
        finally:
            self._ended = True
            self._leave()
            # Still lent only if the rollback itself was interrupted.
            await self._give_back(exc)


def _ended_error() -> PersistenceError:
    return PersistenceError(
        "unit of work ended with its `async with` block (rolled back unless committed):"
        " start a new one"
    )
