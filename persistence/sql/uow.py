"""The SQL unit of work: one AsyncSession, one transaction, all or nothing."""

from __future__ import annotations

from contextvars import ContextVar, Token
from types import TracebackType
from typing import Self, TypeVar

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from persistence.changes import Base, SavePlan
from persistence.errors import InvalidDataError, PersistenceError
from persistence.models import ChatSession, UploadedFileRecord
from persistence.sql import repositories, writes
from persistence.sql.errors import sql_errors, unique_violation
from persistence.sql.runner import Work, run_in_sqlite_thread, run_in_thread, run_on_connection
from persistence.sql.writes import Saved
from persistence.storage import UnitOfWork

T = TypeVar("T")


# The tokens of the storages whose unit of work the current task holds open.
_OPEN: ContextVar[frozenset[str]] = ContextVar("_OPEN", default=frozenset())


def open_units_of_work() -> frozenset[str]:
    """Tokens of the storages with a unit of work open in the current task."""
    return _OPEN.get()


class _SqlSessions:
    def __init__(self, uow: SqlUnitOfWork) -> None:
        self._uow = uow

    async def get(self, session_id: str) -> ChatSession | None:
        return await self._uow.run(
            repositories.read_session(session_id, self._uow.token, None), "load session"
        )

    async def add(self, session: ChatSession) -> None:
        uow = self._uow
        plan = session.plan_save(uow.token)
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
        return await self._uow.run(repositories.delete_session(session_id), "delete session")


class _SqlFiles:
    def __init__(self, uow: SqlUnitOfWork) -> None:
        self._uow = uow

    async def get(self, file_id: str) -> UploadedFileRecord | None:
        return await self._uow.run(repositories.read_file_record(file_id), "load file record")

    async def add(self, record: UploadedFileRecord) -> None:
        await self._uow.run(repositories.write_file_record(record), "save file record")

    async def delete(self, file_id: str) -> bool:
        return await self._uow.run(repositories.delete_file_record(file_id), "delete file record")


class SqlUnitOfWork(UnitOfWork):
    """Everything done through `sessions` and `files` commits together or not at all.

    On SQLite the transaction takes the write lock when it begins (BEGIN IMMEDIATE),
    so a concurrent writer waits for it instead of failing half way.
    """

    def __init__(self, engine: AsyncEngine, token: str) -> None:
        self.token = token
        self._session = AsyncSession(bind=engine, expire_on_commit=False)
        self._undo: dict[int, tuple[ChatSession, Base | None]] = {}
        self._committed = False
        self._open: Token[frozenset[str]] | None = None
        self.sessions = _SqlSessions(self)
        self.files = _SqlFiles(self)

    async def run(self, work: Work[T], action: str) -> T:
        """Runs repository work in this unit's transaction."""
        if self._committed:
            work.close()
            raise PersistenceError("unit of work already committed: start a new one")
        with sql_errors(action):
            connection = await self._session.connection()
            if connection.dialect.name == "sqlite":
                # Inside the transaction SQLAlchemy began (BEGIN IMMEDIATE), in one hop.
                driver = (await connection.get_raw_connection()).driver_connection
                assert driver is not None
                result: T = await run_in_thread(
                    driver, run_in_sqlite_thread, connection.dialect, work, None
                )
                return result
            return await run_on_connection(connection, work)

    def saved_until_rollback(self, session: ChatSession, plan: SavePlan, saved: Saved) -> None:
        """Takes the save as stored now; a rollback gives the object back its old base."""
        if id(session) not in self._undo:
            self._undo[id(session)] = (session, session.base_for(self.token))
        session.saved_to(
            self.token,
            plan,
            saved.revision,
            saved.incarnation,
            exact=saved.exact,
            keep_log=True,
        )

    async def commit(self) -> None:
        try:
            with sql_errors("commit"):
                await self._session.commit()
        except BaseException:
            # The commit may have landed before the error: later saves must check.
            for session, _base in self._undo.values():
                session.save_failed(self.token)
            self._undo.clear()
            raise
        self._committed = True
        self._undo.clear()

    async def rollback(self) -> None:
        # The store holds none of this unit's changes: later saves must send them again.
        for session, base in self._undo.values():
            session.restore_base(self.token, base)
        self._undo.clear()
        with sql_errors("rollback"):
            await self._session.rollback()

    async def __aenter__(self) -> Self:
        self._open = _OPEN.set(_OPEN.get() | {self.token})
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
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
            if self._open is not None:
                _OPEN.reset(self._open)
                self._open = None
            with sql_errors("close unit of work"):
                await self._session.close()
