"""SQLiteSessionStorage and PostgreSQLSessionStorage: one SQLAlchemy code path."""

from __future__ import annotations

import uuid
from abc import abstractmethod
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from persistence.clock import utc_now
from persistence.errors import InvalidDataError, PersistenceError
from persistence.models import STATUSES, ChatMessage, ChatSession, Status, UploadedFileRecord
from persistence.sql import repositories
from persistence.sql.completion import run_to_completion
from persistence.sql.engines import (
    READ_OPTIONS,
    WRITE_OPTIONS,
    postgresql_engine,
    postgresql_url,
    sqlite_engine,
    sqlite_url,
)
from persistence.sql.errors import sql_errors
from persistence.sql.schema import upgrade_to_head
from persistence.sql.search import search
from persistence.sql.uow import SqlUnitOfWork
from persistence.storage import BackendName, SessionStorage, StorageCounts


def _check_status(status: str | None) -> Status | None:
    if status is not None and status not in STATUSES:
        raise InvalidDataError(f"status: {status!r} is not one of {', '.join(STATUSES)}")
    return status


def _check_page(limit: int, offset: int = 0) -> None:
    if limit < 0:
        raise InvalidDataError(f"limit: must be >= 0, got {limit}")
    if offset < 0:
        raise InvalidDataError(f"offset: must be >= 0, got {offset}")


class SqlSessionStorage(SessionStorage):
    """The SessionStorage of the SQL family; subclasses only build the engine."""

    def __init__(self) -> None:
        # Identifies this storage in each session's record of what is stored where.
        self._token = uuid.uuid4().hex
        self._engine: AsyncEngine | None = None
        self._closed = False

    @abstractmethod
    def _create_engine(self) -> AsyncEngine: ...

    @property
    def engine(self) -> AsyncEngine:
        """The engine, for tests and tools that need the database itself.

        Raises:
            PersistenceError: if the storage is closed or not initialized.
        """
        if self._closed:
            raise PersistenceError(f"{self.backend_name} storage is closed")
        if self._engine is None:
            raise PersistenceError(
                f"{self.backend_name} storage is not initialized: await initialize() first"
            )
        return self._engine

    def _writer(self) -> AsyncEngine:
        return self.engine.execution_options(**WRITE_OPTIONS)

    def _reader(self) -> AsyncEngine:
        return self.engine.execution_options(**READ_OPTIONS[self.backend_name])

    @asynccontextmanager
    async def _write(self, action: str) -> AsyncIterator[AsyncConnection]:
        with sql_errors(action):
            async with self._writer().begin() as connection:
                yield connection

    @asynccontextmanager
    async def _read(self, action: str) -> AsyncIterator[AsyncConnection]:
        with sql_errors(action):
            async with self._reader().connect() as connection:
                yield connection

    async def initialize(self) -> None:
        if self._closed:
            raise PersistenceError(f"{self.backend_name} storage is closed")
        if self._engine is None:
            self._engine = self._create_engine()
        await run_to_completion(self._initialize())

    async def _initialize(self) -> None:
        async with self._write("initialize schema") as connection:
            await connection.run_sync(upgrade_to_head)

    async def close(self) -> None:
        engine, self._engine, self._closed = self._engine, None, True
        if engine is not None:
            with sql_errors("close"):
                await engine.dispose()

    def unit_of_work(self) -> SqlUnitOfWork:
        return SqlUnitOfWork(self._writer(), self._token)

    async def save_session(self, session: ChatSession) -> bool:
        try:
            await run_to_completion(self._save_session(session))
        except BaseException:
            session.forget_stored(self._token)
            raise
        session.mark_stored(self._token)
        return True

    async def _save_session(self, session: ChatSession) -> None:
        async with self._write("save session") as connection:
            await repositories.write_session(connection, session, self._token)

    async def load_session(self, session_id: str) -> ChatSession | None:
        async with self._read("load session") as connection:
            session = await repositories.read_session(connection, session_id)
        if session is not None:
            session.mark_stored(self._token)
        return session

    async def load_sessions(self, session_ids: Sequence[str]) -> list[ChatSession]:
        async with self._read("load sessions") as connection:
            loaded = await repositories.read_sessions(connection, session_ids)
        for session in loaded:
            session.mark_stored(self._token)
        return loaded

    async def list_sessions(
        self, status: str | None = None, limit: int = 100, offset: int = 0
    ) -> list[ChatSession]:
        checked = _check_status(status)
        _check_page(limit, offset)
        async with self._read("list sessions") as connection:
            return await repositories.read_session_page(connection, checked, limit, offset)

    async def delete_session(self, session_id: str) -> bool:
        return await run_to_completion(self._delete_session(session_id))

    async def _delete_session(self, session_id: str) -> bool:
        async with self._write("delete session") as connection:
            return await repositories.delete_session_row(connection, session_id)

    async def save_file_record(self, file_record: UploadedFileRecord) -> bool:
        await run_to_completion(self._save_file_record(file_record))
        return True

    async def _save_file_record(self, file_record: UploadedFileRecord) -> None:
        async with self._write("save file record") as connection:
            await repositories.write_file_record(connection, file_record)

    async def load_file_record(self, file_id: str) -> UploadedFileRecord | None:
        async with self._read("load file record") as connection:
            return await repositories.read_file_record(connection, file_id)

    async def list_file_records(self, limit: int = 100) -> list[UploadedFileRecord]:
        _check_page(limit)
        async with self._read("list file records") as connection:
            return await repositories.read_file_records_page(connection, limit)

    async def delete_expired_files(self) -> int:
        return await run_to_completion(self._delete_expired_files())

    async def _delete_expired_files(self) -> int:
        async with self._write("delete expired files") as connection:
            return await repositories.delete_files_expired_by(connection, utc_now())

    async def search_messages(self, query: str, limit: int = 50) -> list[ChatMessage]:
        _check_page(limit)
        async with self._read("search messages") as connection:
            return await search(connection, query, limit)

    async def iter_sessions(
        self, batch_size: int = 500, *, with_messages: bool = True
    ) -> AsyncIterator[list[ChatSession]]:
        if batch_size <= 0:
            raise InvalidDataError(f"batch_size: must be > 0, got {batch_size}")
        after: str | None = None
        while True:
            async with self._read("iterate sessions") as connection:
                ids = await repositories.read_session_ids_after(connection, after, batch_size)
                batch = await repositories.read_sessions(
                    connection, ids, with_messages=with_messages
                )
            if not ids:
                return
            if with_messages:
                for session in batch:
                    session.mark_stored(self._token)
            yield batch
            after = ids[-1]

    async def iter_file_records(
        self, batch_size: int = 500
    ) -> AsyncIterator[list[UploadedFileRecord]]:
        if batch_size <= 0:
            raise InvalidDataError(f"batch_size: must be > 0, got {batch_size}")
        after: str | None = None
        while True:
            async with self._read("iterate file records") as connection:
                batch = await repositories.read_file_records_after(connection, after, batch_size)
            if not batch:
                return
            yield batch
            after = batch[-1].file_id

    async def count(self) -> StorageCounts:
        async with self._read("count") as connection:
            return await repositories.count_store(connection, utc_now())

    async def expire_sessions(self, updated_before: datetime) -> int:
        return await run_to_completion(self._expire_sessions(updated_before))

    async def _expire_sessions(self, updated_before: datetime) -> int:
        async with self._write("expire sessions") as connection:
            return await repositories.expire_sessions_before(connection, updated_before)

    async def set_status(self, session_ids: Sequence[str], status: Status) -> int:
        checked = _check_status(status)
        assert checked is not None
        return await run_to_completion(self._set_status(session_ids, checked))

    async def _set_status(self, session_ids: Sequence[str], status: Status) -> int:
        async with self._write("set session status") as connection:
            return await repositories.set_sessions_status(connection, session_ids, status)

    async def copy_to_file(self, target: Path) -> bool:
        return False


class SQLiteSessionStorage(SqlSessionStorage):
    """The embedded default: one SQLite file, WAL, foreign keys on, busy timeout.

    Every write transaction takes the write lock when it begins, so concurrent
    writers (tasks or processes) wait for each other instead of failing.
    """

    backend_name: BackendName = "sqlite"

    def __init__(
        self,
        database_path: str | Path,
        *,
        synchronous: str = "FULL",
        cache_size: int | None = None,
        busy_timeout: float = 30.0,
    ) -> None:
        super().__init__()
        self.database_path = Path(database_path)
        if synchronous.upper() not in ("FULL", "NORMAL", "EXTRA"):
            raise InvalidDataError(f"synchronous: {synchronous!r} is not FULL, NORMAL or EXTRA")
        self._pragmas: dict[str, Any] = {"synchronous": synchronous.upper()}
        if cache_size is not None:
            self._pragmas["cache_size"] = int(cache_size)
        self._busy_timeout = busy_timeout

    def __repr__(self) -> str:
        return f"SQLiteSessionStorage({str(self.database_path)!r})"

    def _create_engine(self) -> AsyncEngine:
        self.database_path.parent.mkdir(parents=True, exist_ok=True)
        return sqlite_engine(sqlite_url(self.database_path), self._pragmas, self._busy_timeout)

    async def copy_to_file(self, target: Path) -> bool:
        """Copies the database with SQLite's online backup API (consistent under writers)."""
        import aiosqlite

        async with self._read("back up database") as connection:
            raw = await connection.get_raw_connection()
            source = raw.driver_connection
            assert isinstance(source, aiosqlite.Connection)
            async with aiosqlite.connect(target) as destination:
                await source.backup(destination)
        return True


class PostgreSQLSessionStorage(SqlSessionStorage):
    """PostgreSQL through an asyncpg connection pool."""

    backend_name: BackendName = "postgresql"

    def __init__(
        self,
        connection_string: str,
        min_pool_size: int = 5,
        max_pool_size: int = 20,
        *,
        statement_timeout: float | None = None,
        command_timeout: float | None = None,
        connect_timeout: float = 10.0,
        pool_timeout: float = 30.0,
    ) -> None:
        super().__init__()
        if min_pool_size < 0 or max_pool_size < 1 or min_pool_size > max_pool_size:
            raise InvalidDataError(
                f"pool sizes: need 0 <= min_pool_size <= max_pool_size and max_pool_size >= 1,"
                f" got {min_pool_size} and {max_pool_size}"
            )
        self.url = postgresql_url(connection_string)
        self.min_pool_size = min_pool_size
        self.max_pool_size = max_pool_size
        self._statement_timeout = statement_timeout
        self._command_timeout = command_timeout
        self._connect_timeout = connect_timeout
        self._pool_timeout = pool_timeout

    def __repr__(self) -> str:
        return f"PostgreSQLSessionStorage({self.url.render_as_string(hide_password=True)!r})"

    def _create_engine(self) -> AsyncEngine:
        return postgresql_engine(
            self.url,
            self.min_pool_size,
            self.max_pool_size,
            statement_timeout=self._statement_timeout,
            command_timeout=self._command_timeout,
            connect_timeout=self._connect_timeout,
            pool_timeout=self._pool_timeout,
        )
