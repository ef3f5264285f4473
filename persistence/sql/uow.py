"""The SQL unit of work: one AsyncSession, one transaction, all or nothing."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, Self, TypeVar

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession

from persistence.errors import PersistenceError
from persistence.models import ChatSession, UploadedFileRecord
from persistence.sql import repositories
from persistence.sql.completion import run_to_completion
from persistence.sql.errors import sql_errors
from persistence.storage import UnitOfWork

T = TypeVar("T")


class _SqlSessions:
    def __init__(self, uow: SqlUnitOfWork) -> None:
        self._uow = uow

    async def get(self, session_id: str) -> ChatSession | None:
        with sql_errors("load session"):
            session = await self._uow.run(repositories.read_session, session_id)
        if session is not None:
            session.mark_stored(self._uow.token)
        return session

    async def add(self, session: ChatSession) -> None:
        with sql_errors("save session"):
            await self._uow.run(repositories.write_session, session, self._uow.token)
        self._uow.stored_on_commit(session)

    async def delete(self, session_id: str) -> bool:
        with sql_errors("delete session"):
            return await self._uow.run(repositories.delete_session_row, session_id)


class _SqlFiles:
    def __init__(self, uow: SqlUnitOfWork) -> None:
        self._uow = uow

    async def get(self, file_id: str) -> UploadedFileRecord | None:
        with sql_errors("load file record"):
            return await self._uow.run(repositories.read_file_record, file_id)

    async def add(self, record: UploadedFileRecord) -> None:
        with sql_errors("save file record"):
            await self._uow.run(repositories.write_file_record, record)

    async def delete(self, file_id: str) -> bool:
        with sql_errors("delete file record"):
            return await self._uow.run(repositories.delete_file_row, file_id)


class SqlUnitOfWork(UnitOfWork):
    """Everything done through `sessions` and `files` commits together or not at all.

    On SQLite the transaction takes the write lock when it begins (BEGIN IMMEDIATE),
    so a concurrent writer waits for it instead of failing half way.
    """

    def __init__(self, engine: AsyncEngine, token: str) -> None:
        self.token = token
        self._session = AsyncSession(bind=engine, expire_on_commit=False)
        self._pending: dict[int, ChatSession] = {}
        self._committed = False
        self.sessions = _SqlSessions(self)
        self.files = _SqlFiles(self)

    async def connection(self) -> AsyncConnection:
        if self._committed:
            raise PersistenceError("unit of work already committed: start a new one")
        return await self._session.connection()

    async def run(self, operation: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Runs a repository function on this unit's connection, to completion."""

        async def call() -> T:
            return await operation(await self.connection(), *args)

        return await run_to_completion(call())

    def stored_on_commit(self, session: ChatSession) -> None:
        self._pending[id(session)] = session

    async def commit(self) -> None:
        try:
            with sql_errors("commit"):
                await run_to_completion(self._session.commit())
        except BaseException:
            # The commit may have landed before its acknowledgement was lost.
            for session in self._pending.values():
                session.forget_stored(self.token)
            raise
        self._committed = True
        # Only now does the store hold these messages: later saves may skip them.
        for session in self._pending.values():
            session.mark_stored(self.token)
        self._pending.clear()

    async def rollback(self) -> None:
        self._pending.clear()
        with sql_errors("rollback"):
            await run_to_completion(self._session.rollback())

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await run_to_completion(self._finish())

    async def _finish(self) -> None:
        try:
            if not self._committed:
                await self.rollback()
        finally:
            with sql_errors("close unit of work"):
                await self._session.close()
