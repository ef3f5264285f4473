"""SQLiteSessionStorage and PostgreSQLSessionStorage: one SQLAlchemy code path."""

from __future__ import annotations

import asyncio
from abc import abstractmethod
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import TypeVar

import aiosqlite
from sqlalchemy.ext.asyncio import AsyncEngine

from persistence.clock import utc_now
from persistence.errors import (
    ConfigError,
    InvalidDataError,
    PersistenceError,
    SessionConflictError,
    SessionDeletedError,
    StorageConnectionError,
)
from persistence.models import ChatMessage, ChatSession, Status, UploadedFileRecord
from persistence.sql import new_sessions, repositories, writes
from persistence.sql.checkout import driver_connection
from persistence.sql.engines import (
    WRITE_OPTIONS,
    check_sqlite_path,
    displayed,
    open_sqlite,
    postgresql_engine,
    postgresql_url,
    reading_pragmas,
    sqlite_engine,
    sqlite_pragmas,
    sqlite_reading_target,
    sqlite_url,
)
from persistence.sql.errors import sql_errors, unique_violation
from persistence.sql.replicas import replica_set
from persistence.sql.runner import Work, run_in_sqlite_thread, run_in_thread, run_on_asyncpg
from persistence.sql.schema import VERSION_TABLE, check_readable, upgrade_to_head
from persistence.sql.standby import ReplicaSettings, ReplicaState
from persistence.sql.statistics import BulkLoadStatistics, analyze_tables
from persistence.sql.uow import SqlUnitOfWork, open_units_of_work
from persistence.storage import (
    BackendName,
    SessionStorage,
    StorageCounts,
    check_last,
    check_page,
    check_role,
    check_session_ids,
    check_status,
)

T = TypeVar("T")


class SqlSessionStorage(SessionStorage):
    """The SessionStorage of the SQL family; subclasses only say how work is run."""

    def __init__(self, version_table: str = VERSION_TABLE) -> None:
        if not version_table.isidentifier():
            raise InvalidDataError(f"version_table: {version_table!r} is not a plain table name")
        self._engine: AsyncEngine | None = None
        self._closed = False
        self._reading_only = False
        self._saving: dict[int, tuple[asyncio.Lock, int]] = {}
        self.version_table = version_table

    @abstractmethod
    def _create_engine(self, *, read_only: bool) -> AsyncEngine: ...

    @property
    @abstractmethod
    def _where(self) -> str:
        """Names the database in errors (never with its password)."""

    # Whether an appends-only save is one statement (PostgreSQL's data-modifying CTE).
    _one_statement_appends = False

    @abstractmethod
    async def _run(
        self,
        work: Work[T],
        action: str,
        *,
        write: bool,
        snapshot: bool = False,
        single: bool = False,
    ) -> T:
        """Runs `work` as one transaction (write), or as a read.

        A read with `snapshot` sees one consistent state across its statements (a
        session row and its history); other reads are single statements. A write that
        is `single` is one statement, atomic without BEGIN/COMMIT where the server
        allows it.
        """

    async def _run_stale(
        self, make_work: Callable[[], Work[T]], action: str, *, snapshot: bool = False
    ) -> T:
        """Runs a read that may see slightly stale data (a read replica's, if any).

        It takes a function that makes the work, so that a read a replica could not
        finish can be run again on the primary.
        """
        return await self._run(make_work(), action, write=False, snapshot=snapshot)

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
        await self._open(read_only=False)

    async def open_for_reading(self) -> None:
        await self._open(read_only=True)

    async def _open(self, *, read_only: bool) -> None:
        if self._closed:
            raise PersistenceError(f"{self.backend_name} storage is closed")
        if self._engine is not None and self._reading_only and not read_only:
            raise PersistenceError(
                f"{self.backend_name} storage was opened for reading: open another to write"
            )
        if self._engine is None:
            self._engine = self._create_engine(read_only=read_only)
            self._reading_only = read_only
        where, table = self._where, self.version_table
        try:
            with sql_errors("open database" if read_only else "initialize schema"):
                if read_only:
                    async with self._engine.connect() as connection:
                        await connection.run_sync(
                            partial(check_readable, version_table=table, where=where)
                        )
                    return
                async with self._engine.execution_options(**WRITE_OPTIONS).begin() as connection:
                    await connection.run_sync(
                        partial(upgrade_to_head, version_table=table, where=where)
                    )
        except BaseException:
            engine, self._engine = self._engine, None
            if engine is not None:
                with sql_errors("close"):
                    await engine.dispose()
            raise

    def _refuse_writes(self, action: str) -> None:
        if self._reading_only:
            raise PersistenceError(
                f"{action}: {self._where} was opened for reading (open_for_reading()),"
                " which never writes"
            )

    async def close(self) -> None:
        engine, self._engine, self._closed = self._engine, None, True
        if engine is not None:
            with sql_errors("close"):
                await engine.dispose()

    def unit_of_work(self) -> SqlUnitOfWork:
        self._refuse_writes("unit of work")
        return SqlUnitOfWork(self.engine.execution_options(**WRITE_OPTIONS), self.token)

    async def save_session(self, session: ChatSession, *, force: bool = False) -> bool:
        # Saves of one object take turns: each plans from the base the previous one left.
        key = id(session)
        lock, users = self._saving.get(key) or (asyncio.Lock(), 0)
        self._saving[key] = (lock, users + 1)
        try:
            async with lock:
                return await self._save_session(session, force)
        finally:
            lock, users = self._saving[key]
            if users == 1:
                del self._saving[key]
            else:
                self._saving[key] = (lock, users - 1)

    async def _save_session(self, session: ChatSession, force: bool) -> bool:
        plan = session.plan_save(self.token)
        if plan.writes_nothing and plan.certain:
            if not await self._run(writes.still_there(plan), "save session", write=False):
                raise SessionDeletedError(session.session_id)
            return True
        try:
            if (
                self._one_statement_appends
                and plan.certain
                and plan.appends
                and (not plan.is_new and plan.appends_only)
            ):
                saved = await self._run(
                    writes.append_in_one_statement(plan), "save session", write=True, single=True
                )
            else:
                saved = await self._run(
                    writes.write_plan(plan, force=force), "save session", write=True
                )
        except (InvalidDataError, SessionConflictError, SessionDeletedError):
            raise  # refused before anything was written
        except PersistenceError as exc:
            session.save_failed(self.token)
            if unique_violation(exc):
                raise await self._duplicate_message(plan.session_id, plan.appends) from exc
            raise
        except BaseException:
            # Cancelled or cut off: it may have landed, so the next save checks.
            session.save_failed(self.token)
            raise
        session.saved_to(self.token, plan, saved.revision, saved.incarnation, exact=saved.exact)
        return True

    async def _duplicate_message(
        self, session_id: str, appended: Sequence[ChatMessage]
    ) -> PersistenceError:
        """Names the new message whose id the store already holds (a unique violation)."""
        owners = await self._run(
            writes.message_owners([message.message_id for message in appended]),
            "save session",
            write=False,
        )
        for message_id, owner in owners.items():
            where = "this session" if owner == session_id else f"another session ({owner!r})"
            return InvalidDataError(f"message_id {message_id!r} is already stored in {where}")
        return PersistenceError("save session failed: a unique key was violated")

    async def load_session(self, session_id: str, *, last: int | None = None) -> ChatSession | None:
        check_last(last)
        return await self._run(
            repositories.read_session(session_id, self.token, last),
            "load session",
            write=False,
            snapshot=True,
        )

    async def load_sessions(self, session_ids: Sequence[str]) -> list[ChatSession]:
        return await self._run(
            repositories.read_sessions(session_ids, self.token),
            "load sessions",
            write=False,
            snapshot=True,
        )

    async def list_sessions(
        self, status: str | None = None, limit: int = 100, offset: int = 0
    ) -> list[ChatSession]:
        checked = check_status(status)
        check_page(limit, offset)
        return await self._run_stale(
            partial(repositories.read_session_page, checked, limit, offset, self.token),
            "list sessions",
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

    async def search_messages(
        self,
        query: str,
        limit: int = 50,
        *,
        session_id: str | None = None,
        role: str | None = None,
    ) -> list[ChatMessage]:
        check_page(limit)
        checked = check_role(role)
        return await self._run_stale(
            partial(
                repositories.search_messages, self.backend_name, query, limit, session_id, checked
            ),
            "search messages",
        )

    async def iter_sessions(
        self, batch_size: int = 500, *, with_messages: bool = True
    ) -> AsyncIterator[list[ChatSession]]:
        if batch_size <= 0:
            raise InvalidDataError(f"batch_size: must be > 0, got {batch_size}")
        after = ""
        while True:
            batch_work = partial(
                repositories.read_session_batch, after, batch_size, with_messages, self.token
            )
            ids, batch = await self._run_stale(
                batch_work,
                "iterate sessions",
                snapshot=True,
            )
            if not ids:
                return
            yield batch
            after = ids[-1]

    async def iter_file_records(
        self, batch_size: int = 500
    ) -> AsyncIterator[list[UploadedFileRecord]]:
        if batch_size <= 0:
            raise InvalidDataError(f"batch_size: must be > 0, got {batch_size}")
        after = ""
        while True:
            batch = await self._run_stale(
                partial(repositories.read_file_record_batch, after, batch_size),
                "iterate file records",
            )
            if not batch:
                return
            yield batch
            after = batch[-1].file_id

    async def count(self) -> StorageCounts:
        return await self._run_stale(
            partial(repositories.count_store, utc_now()), "count", snapshot=True
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
        check_session_ids(session_ids)
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
        version_table: str = VERSION_TABLE,
    ) -> None:
        super().__init__(version_table)
        self.database_path = Path(database_path)
        if synchronous.upper() not in ("FULL", "NORMAL", "EXTRA"):
            raise InvalidDataError(f"synchronous: {synchronous!r} is not FULL, NORMAL or EXTRA")
        self._pragmas = sqlite_pragmas(synchronous.upper(), cache_size, busy_timeout)
        self._busy_timeout = busy_timeout
        self._connection: aiosqlite.Connection | None = None
        self._reading_target = ""

    def __repr__(self) -> str:
        return f"SQLiteSessionStorage({str(self.database_path)!r})"

    @property
    def _where(self) -> str:
        return str(self.database_path)

    def _create_engine(self, *, read_only: bool) -> AsyncEngine:
        url = sqlite_url(self.database_path)
        if read_only:
            return sqlite_engine(
                url,
                reading_pragmas(self._pragmas),
                self._busy_timeout,
                target=self._reading_target,
                uri=True,
            )
        return sqlite_engine(url, self._pragmas, self._busy_timeout)

    async def _open(self, *, read_only: bool) -> None:
        if self._closed:
            raise PersistenceError("sqlite storage is closed")
        if self._engine is None:
            exists = check_sqlite_path(self.database_path, must_exist=read_only)
            if read_only:
                self._reading_target = sqlite_reading_target(self.database_path)
            elif not exists:
                try:
                    self.database_path.parent.mkdir(parents=True, exist_ok=True)
                except OSError as exc:
                    raise StorageConnectionError(
                        f"cannot create {self.database_path}:"
                        f" {exc.strerror or type(exc).__name__} ({exc.filename})"
                    ) from None
        await super()._open(read_only=read_only)
        if self._connection is None:
            with sql_errors("open database"):
                if self._reading_only:
                    self._connection = await open_sqlite(
                        self._reading_target,
                        reading_pragmas(self._pragmas),
                        self._busy_timeout,
                        uri=True,
                    )
                else:
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

    async def _run(
        self,
        work: Work[T],
        action: str,
        *,
        write: bool,
        snapshot: bool = False,
        single: bool = False,
    ) -> T:
        # Reads too run in a transaction: it costs nothing within the one thread hop.
        dialect = self.engine.dialect
        connection = self._connection
        if connection is None:
            raise PersistenceError("sqlite storage is not initialized: await initialize() first")
        if write:
            self._refuse_writes(action)
        if write and self.token in open_units_of_work():
            work.close()
            raise PersistenceError(
                f"{action}: called while this task holds an open unit_of_work() of the same"
                " SQLite storage, whose write lock it would wait for until the busy timeout;"
                " do it through the unit of work (uow.sessions / uow.files) or after it"
            )
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
    """PostgreSQL through a pool of asyncpg connections (SQLAlchemy's pool).

    With `read_replicas` (hot standbys of the primary), listing, search, counts and
    exports read from a replica; writes, loads, units of work and migrations use the
    primary. The storage always sees its own writes; a replica that is down, cannot
    be reached, hangs, or lags more than `max_replica_lag` seconds is skipped (see
    persistence.sql.replicas).
    """

    backend_name: BackendName = "postgresql"
    _one_statement_appends = True

    def __init__(
        self,
        connection_string: str,
        min_pool_size: int = 5,
        max_pool_size: int = 20,
        *,
        read_replicas: Sequence[str] = (),
        statement_timeout: float | None = None,
        command_timeout: float | None = None,
        connect_timeout: float = 10.0,
        pool_timeout: float = 30.0,
        max_replica_lag: float = 10.0,
        replica_timeout: float = 1.0,
        replica_retry_interval: float = 5.0,
        version_table: str = VERSION_TABLE,
    ) -> None:
        super().__init__(version_table)
        try:
            import asyncpg  # noqa: F401  # the driver SQLAlchemy loads when the engine is made
        except ImportError:
            raise ConfigError(
                "PostgreSQLSessionStorage needs the asyncpg driver, which is not installed:"
                " pip install 'persistence[postgresql]'"
            ) from None
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
        self._bulk_statistics = BulkLoadStatistics()
        self._replicas = replica_set(
            read_replicas,
            ReplicaSettings(
                timeout=replica_timeout,
                max_lag=max_replica_lag,
                retry_interval=replica_retry_interval,
                max_connections=max_pool_size,
            ),
        )

    def __repr__(self) -> str:
        shown = repr(displayed(self.url))
        if self._replicas is not None:
            shown += f", read_replicas={self._replicas.displayed!r}"
        return f"PostgreSQLSessionStorage({shown})"

    def replica_states(self) -> list[ReplicaState]:
        """What this storage last learnt of each replica: up, lagging, replay position."""
        return [] if self._replicas is None else self._replicas.states()

    @property
    def _where(self) -> str:
        return self.url.render_as_string(hide_password=True)

    def _create_engine(self, *, read_only: bool) -> AsyncEngine:
        return postgresql_engine(
            self.url,
            self.min_pool_size,
            self.max_pool_size,
            statement_timeout=self._statement_timeout,
            command_timeout=self._command_timeout,
            connect_timeout=self._connect_timeout,
            pool_timeout=self._pool_timeout,
        )

    async def _open(self, *, read_only: bool) -> None:
        await super()._open(read_only=read_only)
        if self._replicas is not None:
            await self._replicas.start(self.engine, self._statement_timeout)

    async def close(self) -> None:
        try:
            if self._replicas is not None:
                await self._replicas.close()
        finally:
            await super().close()

    async def insert_sessions(self, sessions: Sequence[ChatSession]) -> bool:
        inserted = await super().insert_sessions(sessions)
        rows = len(sessions) + sum(len(session.messages) for session in sessions)
        if inserted and self._bulk_statistics.added(rows):
            await self._run(analyze_tables(), "analyse tables after bulk inserts", write=True)
        return inserted

    def unit_of_work(self) -> SqlUnitOfWork:
        self._refuse_writes("unit of work")
        if self._replicas is None:
            return super().unit_of_work()
        engine = self.engine.execution_options(**WRITE_OPTIONS)
        return self._replicas.unit_of_work(engine, self.token)

    async def _run_stale(
        self, make_work: Callable[[], Work[T]], action: str, *, snapshot: bool = False
    ) -> T:
        replicas = self._replicas
        if replicas is not None:
            self.engine  # noqa: B018  # raises if closed or not initialized
            with sql_errors(action):
                found = await replicas.read(make_work, snapshot)
            if found is not None:
                return found[0]
        return await self._run(make_work(), action, write=False, snapshot=snapshot)

    async def _run(
        self,
        work: Work[T],
        action: str,
        *,
        write: bool,
        snapshot: bool = False,
        single: bool = False,
    ) -> T:
        if write:
            self._refuse_writes(action)
        if write and self._replicas is not None:
            try:
                return await self._run_on_primary(
                    work, action, write=True, snapshot=snapshot, single=single
                )
            finally:
                # Counted whatever the outcome: a write that failed may have committed.
                self._replicas.note_write()
        return await self._run_on_primary(
            work, action, write=write, snapshot=snapshot, single=single
        )

    async def _run_on_primary(
        self, work: Work[T], action: str, *, write: bool, snapshot: bool, single: bool
    ) -> T:
        engine = self.engine
        with sql_errors(action):
            async with driver_connection(engine) as driver:
                if write and not single:
                    async with driver.transaction():
                        return await run_on_asyncpg(driver, engine.dialect, work)
                if snapshot:
                    async with driver.transaction(isolation="repeatable_read", readonly=True):
                        return await run_on_asyncpg(driver, engine.dialect, work)
                # A single statement needs no BEGIN / COMMIT round trips.
                return await run_on_asyncpg(driver, engine.dialect, work)
