"""SQLiteSessionStorage and PostgreSQLSessionStorage: one SQLAlchemy code path."""

from __future__ import annotations

import asyncio
import uuid
from abc import abstractmethod
from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import TypeVar

import aiosqlite
from sqlalchemy.ext.asyncio import AsyncEngine

from persistence.clock import utc_now
from persistence.errors import InvalidDataError, PersistenceError
from persistence.models import ChatMessage, ChatSession, Status, UploadedFileRecord
from persistence.sql import new_sessions, repositories
from persistence.sql.engines import (
    WRITE_OPTIONS,
    open_sqlite,
    postgresql_engine,
    postgresql_url,
    sqlite_engine,
    sqlite_pragmas,
    sqlite_url,
)
from persistence.sql.errors import connection_lost, sql_errors
from persistence.sql.runner import Work, run_in_sqlite_thread, run_in_thread, run_on_asyncpg
from persistence.sql.schema import upgrade_to_head
from persistence.sql.uow import SqlUnitOfWork
from persistence.storage import (
    BackendName,
    SessionStorage,
    StorageCounts,
    check_page,
    check_status,
)

T = TypeVar("T")


class SqlSessionStorage(SessionStorage):
    """The SessionStorage of the SQL family; subclasses only say how work is run."""

    def __init__(self) -> None:
        # Identifies this storage in each session's record of what is stored where.
        self._token = uuid.uuid4().hex
        self._engine: AsyncEngine | None = None
        self._closed = False
        self._saving: dict[int, tuple[asyncio.Lock, int]] = {}

    @abstractmethod
    def _create_engine(self) -> AsyncEngine: ...

    @abstractmethod
    async def _run(self, work: Work[T], action: str, *, write: bool, snapshot: bool = False) -> T:
        """Runs `work` as one transaction (write), or as a read.

        A read with `snapshot` sees one consistent state across its statements (a
        session row and its history); other reads are single statements.
        """

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

    async def initialize(self) -> None:
        if self._closed:
            raise PersistenceError(f"{self.backend_name} storage is closed")
        if self._engine is None:
            self._engine = self._create_engine()
        with sql_errors("initialize schema"):
            async with self._engine.execution_options(**WRITE_OPTIONS).begin() as connection:
                await connection.run_sync(upgrade_to_head)

    async def close(self) -> None:
        engine, self._engine, self._closed = self._engine, None, True
        if engine is not None:
            with sql_errors("close"):
                await engine.dispose()

    def unit_of_work(self) -> SqlUnitOfWork:
        return SqlUnitOfWork(self.engine.execution_options(**WRITE_OPTIONS), self._token)

    async def save_session(self, session: ChatSession) -> bool:
        # Saves of one object take turns: two at once would both send the same new
        # messages, and the second would fail on their ids.
        key = id(session)
        lock, users = self._saving.get(key) or (asyncio.Lock(), 0)
        self._saving[key] = (lock, users + 1)
        try:
            async with lock:
                return await self._save_session(session)
        finally:
            lock, users = self._saving[key]
            if users == 1:
                del self._saving[key]
            else:
                self._saving[key] = (lock, users - 1)

    async def _save_session(self, session: ChatSession) -> bool:
        sent = len(session.messages)
        try:
            await self._run(
                repositories.write_session(session, self._token), "save session", write=True
            )
        except BaseException:
            session.forget_stored(self._token)
            raise
        session.mark_stored(self._token, sent)
        return True

    async def load_session(self, session_id: str) -> ChatSession | None:
        session = await self._run(
            repositories.read_session(session_id), "load session", write=False, snapshot=True
        )
        if session is not None:
            session.mark_stored(self._token)
        return session

    async def load_sessions(self, session_ids: Sequence[str]) -> list[ChatSession]:
        loaded = await self._run(
            repositories.read_sessions(session_ids), "load sessions", write=False, snapshot=True
        )
        for session in loaded:
            session.mark_stored(self._token)
        return loaded

    async def list_sessions(
        self, status: str | None = None, limit: int = 100, offset: int = 0
    ) -> list[ChatSession]:
        checked = check_status(status)
        check_page(limit, offset)
        return await self._run(
            repositories.read_session_page(checked, limit, offset), "list sessions", write=False
        )

    async def delete_session(self, session_id: str) -> bool:
        return await self._run(
            repositories.delete_session(session_id), "delete session", write=True
        )

    async def save_file_record(self, file_record: UploadedFileRecord) -> bool:
        await self._run(repositories.write_file_record(file_record), "save file record", write=True)
        return True

    async def load_file_record(self, file_id: str) -> UploadedFileRecord | None:
        return await self._run(
            repositories.read_file_record(file_id), "load file record", write=False
        )

    async def list_file_records(self, limit: int = 100) -> list[UploadedFileRecord]:
        check_page(limit)
        return await self._run(
            repositories.read_file_record_page(limit), "list file records", write=False
        )

    async def delete_expired_files(self) -> int:
        return await self._run(
            repositories.delete_files_expired_by(utc_now()), "delete expired files", write=True
        )

    async def search_messages(self, query: str, limit: int = 50) -> list[ChatMessage]:
        check_page(limit)
        return await self._run(
            repositories.search_messages(query, limit), "search messages", write=False
        )

    async def iter_sessions(
        self, batch_size: int = 500, *, with_messages: bool = True
    ) -> AsyncIterator[list[ChatSession]]:
        if batch_size <= 0:
            raise InvalidDataError(f"batch_size: must be > 0, got {batch_size}")
        after = ""
        while True:
            ids, batch = await self._run(
                repositories.read_session_batch(after, batch_size, with_messages),
                "iterate sessions",
                write=False,
                snapshot=True,
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
        after = ""
        while True:
            batch = await self._run(
                repositories.read_file_record_batch(after, batch_size),
                "iterate file records",
                write=False,
            )
            if not batch:
                return
            yield batch
            after = batch[-1].file_id

    async def count(self) -> StorageCounts:
        return await self._run(
            repositories.count_store(utc_now()), "count", write=False, snapshot=True
        )

    async def count_sessions(self) -> dict[str, int]:
        return await self._run(
            repositories.count_sessions_by_status(), "count sessions", write=False
        )

    async def expire_sessions(self, updated_before: datetime) -> int:
        return await self._run(
            repositories.expire_sessions_before(updated_before), "expire sessions", write=True
        )

    async def set_status(self, session_ids: Sequence[str], status: Status) -> int:
        checked = check_status(status)
        assert checked is not None
        return await self._run(
            repositories.set_sessions_status(session_ids, checked),
            "set session status",
            write=True,
        )

    async def insert_sessions(self, sessions: Sequence[ChatSession]) -> bool:
        new_sessions.check_new_sessions(sessions)
        if not sessions:
            return True
        try:
            await self._run(
                new_sessions.insert_new_sessions(sessions), "insert sessions", write=True
            )
        except PersistenceError as exc:
            if new_sessions.is_duplicate_key(exc):
                return False
            raise
        return True

    async def load_file_records(self, file_ids: Sequence[str]) -> list[UploadedFileRecord]:
        return await self._run(
            repositories.read_file_records(file_ids), "load file records", write=False
        )

    async def copy_to_file(self, target: Path) -> bool:
        return False


class SQLiteSessionStorage(SqlSessionStorage):
    """The embedded default: one SQLite file, WAL, foreign keys on, busy timeout.

    Every write transaction takes the write lock when it begins, so concurrent
    writers (tasks or processes) wait for each other instead of failing. Each call
    runs whole inside the aiosqlite connection's thread: one hop per call.
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
        self._pragmas = sqlite_pragmas(synchronous.upper(), cache_size, busy_timeout)
        self._busy_timeout = busy_timeout
        self._connection: aiosqlite.Connection | None = None

    def __repr__(self) -> str:
        return f"SQLiteSessionStorage({str(self.database_path)!r})"

    def _create_engine(self) -> AsyncEngine:
        self.database_path.parent.mkdir(parents=True, exist_ok=True)
        return sqlite_engine(sqlite_url(self.database_path), self._pragmas, self._busy_timeout)

    async def initialize(self) -> None:
        await super().initialize()
        if self._connection is None:
            with sql_errors("open database"):
                self._connection = await open_sqlite(
                    self.database_path, self._pragmas, self._busy_timeout
                )

    async def close(self) -> None:
        connection, self._connection = self._connection, None
        try:
            if connection is not None:
                with sql_errors("close"):
                    await connection.close()
        finally:
            await super().close()

    async def _run(self, work: Work[T], action: str, *, write: bool, snapshot: bool = False) -> T:
        # Reads too run in a transaction: it costs nothing within the one thread hop.
        dialect = self.engine.dialect
        connection = self._connection
        if connection is None:
            raise PersistenceError("sqlite storage is not initialized: await initialize() first")
        with sql_errors(action):
            result: T = await run_in_thread(
                connection,
                run_in_sqlite_thread,
                dialect,
                work,
                "BEGIN IMMEDIATE" if write else "BEGIN",
            )
            return result

    async def copy_to_file(self, target: Path) -> bool:
        """Copies the database with SQLite's online backup API (consistent under writers)."""
        connection = self._connection
        if connection is None:
            raise PersistenceError("sqlite storage is not initialized: await initialize() first")
        with sql_errors("back up database"):
            async with aiosqlite.connect(target) as destination:
                await connection.backup(destination)
        return True


class PostgreSQLSessionStorage(SqlSessionStorage):
    """PostgreSQL through a pool of asyncpg connections (SQLAlchemy's pool)."""

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
                "pool sizes: need 0 <= min_pool_size <= max_pool_size and max_pool_size >= 1,"
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

    async def _run(self, work: Work[T], action: str, *, write: bool, snapshot: bool = False) -> T:
        engine = self.engine
        with sql_errors(action):
            async with engine.connect() as pooled:
                driver = (await pooled.get_raw_connection()).driver_connection
                assert driver is not None
                try:
                    if write:
                        async with driver.transaction():
                            return await run_on_asyncpg(driver, engine.dialect, work)
                    if snapshot:
                        async with driver.transaction(isolation="repeatable_read", readonly=True):
                            return await run_on_asyncpg(driver, engine.dialect, work)
                    # A single statement needs no BEGIN / COMMIT round trips.
                    return await run_on_asyncpg(driver, engine.dialect, work)
                except BaseException as exc:
                    if connection_lost(exc) or not isinstance(exc, Exception):
                        # Cancelled mid-query or cut off: never lend this connection again.
                        await pooled.invalidate()
                    raise
