"""The SQL unit of work: one AsyncSession, one transaction, all or nothing."""

from __future__ import annotations

from types import TracebackType
from typing import Self, TypeVar

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from persistence.errors import PersistenceError
from persistence.models import ChatSession, UploadedFileRecord
from persistence.sql import repositories
from persistence.sql.errors import sql_errors
from persistence.sql.runner import Work, run_in_sqlite_thread, run_in_thread, run_on_connection
from persistence.storage import UnitOfWork

T = TypeVar("T")


class _SqlSessions:
    def __init__(self, uow: SqlUnitOfWork) -> None:
        self._uow = uow

    async def get(self, session_id: str) -> ChatSession | None:
        session = await self._uow.run(repositories.read_session(session_id), "load session")
        if session is not None:
            session.mark_stored(self._uow.token)
        return session

    async def add(self, session: ChatSession) -> None:
        sent = len(session.messages)
        await self._uow.run(repositories.write_session(session, self._uow.token), "save session")
        self._uow.stored_until_rollback(session, sent)

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
        self._undo: dict[int, tuple[ChatSession, tuple[int, str | None] | None]] = {}
        self._committed = False
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

    def stored_until_rollback(self, session: ChatSession, count: int) -> None:
        """Marks the first `count` messages stored now; a rollback restores the old marker."""
        if id(session) not in self._undo:
            self._undo[id(session)] = (session, session.stored_marker(self.token))
        session.mark_stored(self.token, count)

    async def commit(self) -> None:
        try:
            with sql_errors("commit"):
                await self._session.commit()
        except BaseException:
            # The commit may have landed before the error: later saves must check.
            for session, _marker in self._undo.values():
                session.forget_stored(self.token)
            self._undo.clear()
            raise
        self._committed = True
        self._undo.clear()

    async def rollback(self) -> None:
        # The store holds none of this unit's messages: later saves must send them again.
        for session, marker in self._undo.values():
            session.restore_stored_marker(self.token, marker)
        self._undo.clear()
        with sql_errors("rollback"):
            await self._session.rollback()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if not self._committed:
                await self.rollback()
        finally:
            with sql_errors("close unit of work"):
                await self._session.close()
