"""SQLiteSessionStorage: one file, a thread per connection (aiosqlite), WAL."""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections.abc import AsyncGenerator, Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite
from sqlalchemy import Dialect
from sqlalchemy.ext.asyncio import AsyncEngine

from persistence.arguments import path_argument
from persistence.errors import (
    InvalidDataError,
    PersistenceError,
    StorageConnectionError,
)
from persistence.event_loops import in_thread_to_the_end, running_loop, to_the_end
from persistence.sql import indexing, notes
from persistence.sql.engines import (
    check_sqlite_path,
    open_sqlite,
    reading_pragmas,
    sqlite_engine,
    sqlite_pragmas,
    sqlite_reading_target,
    sqlite_url,
    sqlite_writing_target,
)
from persistence.sql.errors import sql_errors
from persistence.sql.loop_engines import LoopEngines
from persistence.sql.opened_files import OpenedFiles
from persistence.sql.runner import (
    ReadAfter,
    Work,
    read_in_sqlite_thread,
    run_in_thread,
    run_unless_locked,
)
from persistence.sql.schema import VERSION_TABLE, refuse_foreign_sqlite_file
from persistence.sql.sql_storage import SqlSessionStorage
from persistence.sql.sqlite_one_state import SqliteOneStateReads
from persistence.sql.uow import open_units_of_work
from persistence.sql.wal_reserve import reserve_wal
from persistence.sql.write_groups import WriteGroups
from persistence.storage import (
    BackendName,
)
from persistence.store_files import sqlite_file_role
from persistence.urls import url_given_as_path

T = TypeVar("T")


_URL_SCHEMES = ("sqlite:", "sqlite+", "file:")


def full_filesystem(directory: Path) -> str | None:
    """What is full in the filesystem holding `directory` (no free space, or no free
    inode for the -wal and -shm files), None if neither or unknown.

    Found by attack: opening a store on a filesystem out of inodes failed as "database
    unreachable (unable to open database file)", naming neither.
    """
    try:
        found = os.statvfs(directory)
    except OSError:
        return None
    # A filesystem that does not count inodes or blocks reports 0 of them.
    if found.f_files > 0 and found.f_favail == 0:
        return f"the filesystem holding {directory} has no free inodes left"
    if found.f_blocks > 0 and found.f_bavail == 0:
        return f"the filesystem holding {directory} is full"
    return None


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
        must_exist: bool = False,
    ) -> None:
        super().__init__(version_table)
        path = path_argument(database_path, "database_path")
        # Found by audit: `sqlite:///x.db` made a directory named `sqlite:` and a store in
        # it; by attack: `postgresql://app:secret@db/app` one under ./postgresql:/.
        url = url_given_as_path(database_path)
        if url is None and str(database_path).lower().startswith(_URL_SCHEMES):
            url = f"{str(database_path)!r} (a URL)"
        if url is not None:
            raise InvalidDataError(
                f"database_path: {url} is not a file path; give SQLiteSessionStorage the"
                " file's path, or the URL to create_storage, StorageConfig or --url"
            )
        self.database_path = path
        # What is opened and checked: a relative path taken against the directory of the
        # call, so a later chdir (a daemon's) neither fails the file check nor opens
        # another file for the pool's next connection. Joined, not normalised: `..`
        # after a symlink means what the system makes of it.
        self._file = Path.cwd() / self.database_path
        if synchronous.upper() not in ("FULL", "NORMAL", "EXTRA"):
            raise InvalidDataError(f"synchronous: {synchronous!r} is not FULL, NORMAL or EXTRA")
        self._pragmas = sqlite_pragmas(synchronous.upper(), cache_size, busy_timeout)
        self._busy_timeout = busy_timeout
        # initialize() opens only a file that is there, as open_for_reading() does.
        self._must_exist = must_exist
        self._connection: aiosqlite.Connection | None = None
        # The connection's thread's entry point for reads, with the file check once
        # opened; its writes, committed in groups (write_groups.py).
        self._read_in_thread: Callable[..., Any] = read_in_sqlite_thread
        self._writes: WriteGroups | None = None
        # What the engine and the connection open: the file, or a read-only URI.
        self._opened: tuple[str | Path, dict[str, Any], bool] = (
            self._file,
            self._pragmas,
            False,
        )
        # The event loop the engine was made in; the engines of other loops (`engine`).
        self._engine_loop: asyncio.AbstractEventLoop | None = None
        self._loop_engines = LoopEngines(self._engine_of_store)
        self._one_state = SqliteOneStateReads(self._file, self._opened_for_reads, busy_timeout)

    def __repr__(self) -> str:
        return f"SQLiteSessionStorage({str(self.database_path)!r})"

    def is_database_file(self, path: str | Path) -> bool:
        """Whether `path` names this storage's database file: the same file, through any
        symlink or hard link."""
        try:
            return os.path.samefile(self._file, path)
        except OSError:
            return False

    async def source_key(self) -> str:
        # The file's token and the store's id both: a cp of the file keeps the id but
        # diverges (found by attack), and a later file may take a deleted one's inode.
        found = await self._run(notes.read_store_id(), "read the store's id", write=False)
        return f"{await super().source_key()} id {found}"

    def own_file(self, path: str | Path) -> str | None:
        return sqlite_file_role(path, self._file)

    @property
    def _where(self) -> str:
        return str(self.database_path)

    def _create_engine(self) -> AsyncEngine:
        self._engine_loop = running_loop()
        return self._engine_of_store()

    def _engine_of_store(self) -> AsyncEngine:
        """An engine opening what the storage opened (the file, or a read-only URI)."""
        return self._engine_with(self._opened[1])

    @property
    def engine(self) -> AsyncEngine:
        """The engine of units of work and migrations: in a loop other than the one that
        opened the storage, that loop's own (loop_engines.py)."""
        engine = super().engine
        loop = running_loop()
        if loop is None or loop is self._engine_loop:
            return engine
        return self._loop_engines.of(loop)

    async def stamp_schema(self, revision: str) -> tuple[tuple[str, ...], str]:
        # An existing file only.
        check_sqlite_path(self._file, must_exist=True)
        with self._there_when_opened(must_exist=True, writing=True):
            return await super().stamp_schema(revision)

    def _create_stamping_engine(self) -> AsyncEngine:
        # Without setting the journal mode: a file that is no store of ours is refused
        # as it was (WAL mode is written into the file).
        url = sqlite_url(self._file)
        target = sqlite_writing_target(self._file)
        pragmas = reading_pragmas(self._pragmas)
        return sqlite_engine(url, pragmas, self._busy_timeout, target=target, uri=True)

    def _opened_for_reads(self) -> tuple[str | Path, dict[str, Any], bool]:
        """What an iteration's own connection opens: what the storage opened, never
        creating a file (found by attack: with the file removed, the iteration's connect
        made an empty database at its path), and without setting the journal mode."""
        target, pragmas, uri = self._opened
        if not uri:
            target, uri = sqlite_writing_target(self._file), True
        return target, reading_pragmas(pragmas), uri

    def _engine_with(self, pragmas: dict[str, Any]) -> AsyncEngine:
        target, _, uri = self._opened
        url = sqlite_url(self._file)
        return sqlite_engine(url, pragmas, self._busy_timeout, target=target, uri=uri)

    async def _open(self, *, read_only: bool) -> None:
        if self._closed:
            raise PersistenceError("sqlite storage is closed")
        must_exist = read_only or self._must_exist
        if self._engine is None:
            exists = check_sqlite_path(self._file, must_exist=must_exist)
            if read_only:
                self._opened = (
                    sqlite_reading_target(self._file),
                    reading_pragmas(self._pragmas),
                    True,
                )
            elif exists:
                if must_exist:
                    self._opened = (sqlite_writing_target(self._file), self._pragmas, True)
                # Refused, reading only, before our connections set the journal mode.
                # Its thread may make the file's -wal: a cancel waits for it (found by
                # attack: a restore's scratch directory met it being removed).
                with (
                    self._there_when_opened(must_exist, writing=True),
                    sql_errors(f"open {self._where}"),
                ):
                    await in_thread_to_the_end(
                        refuse_foreign_sqlite_file,
                        sqlite_reading_target(self._file),
                        version_table=self.version_table,
                        where=self._where,
                    )
            else:
                try:
                    self._file.parent.mkdir(parents=True, exist_ok=True)
                except OSError as exc:
                    raise StorageConnectionError(
                        f"cannot create {self.database_path}:"
                        f" {exc.strerror or type(exc).__name__} ({exc.filename})"
                    ) from None
                if why := _unwritable(self._file.parent):
                    # Found by attack: SQLite's own "unable to open database file"
                    # named neither the file nor the cause.
                    raise StorageConnectionError(
                        f"cannot create {self.database_path}: its directory"
                        f" {self._file.parent} {why}"
                    )
        with self._there_when_opened(must_exist, writing=not read_only):
            await super()._open(read_only=read_only)
            if self._connection is None:
                opened, pragmas, uri = self._opened
                with sql_errors(f"open {self._where}"):
                    self._connection = await open_sqlite(
                        opened, pragmas, self._busy_timeout, uri=uri
                    )
                    if not read_only:
                        await run_in_thread(
                            self._connection,
                            reserve_wal,
                            self._file,
                            int(self._busy_timeout * 1000),
                        )
            # The file itself (through any symlink): another storage on it is the same
            # store, a copy of it is another.
            found = self._file.stat()
        self._identified_as(f"{found.st_dev}:{found.st_ino}")
        self._file_check = OpenedFiles(self._file, found, writing=not read_only)
        # Made once: `_run` is every call.
        self._read_in_thread = partial(read_in_sqlite_thread, check=self._file_check)
        assert self._connection is not None and self._engine is not None
        self._writes = WriteGroups(self._connection, self._engine.dialect, self._file_check)

    @contextmanager
    def _there_when_opened(self, must_exist: bool, writing: bool) -> Iterator[None]:
        """A file that must exist, checked, then gone when opened (`mode=ro` or `rw`
        refuses it, creating nothing): one error naming it. An opening that failed on
        a full filesystem says so, and one to write, in a directory this process may not
        write, says that."""
        try:
            yield
        except (PersistenceError, FileNotFoundError) as exc:
            if not must_exist or self._file.exists():
                stopped = _stopped_by_its_directory(self._file) if writing else None
                if stopped and _cannot_open_to_write(exc):
                    # Found by attack: an existing store in a read-only directory was
                    # "unreachable (unable to open database file)", or "read-only": SQLite
                    # makes its -wal and -shm beside the database to write.
                    raise StorageConnectionError(
                        f"cannot write {self._where}: its directory {stopped}"
                        " (to write, SQLite makes the -wal and -shm files beside the"
                        " database; it can still be opened for reading)"
                    ) from exc.__cause__
                full = full_filesystem(self._file.parent)
                if full is None or type(exc) not in (PersistenceError, StorageConnectionError):
                    raise
                raise type(exc)(f"{exc}; {full}") from exc.__cause__
            raise StorageConnectionError(
                f"no database at {self._where}: the file was removed while it was being"
                " opened (nothing was created)"
            ) from exc

    async def close(self) -> None:
        if self._carried_into_child():
            # Its thread is the parent's: closing would wait for it for good.
            self._connection = None
            self._one_state.let_go()
            self._let_go()
            return
        # Closed first: a call made while the connection closes is told so, not that the
        # storage was never initialized (found by attack).
        self._closed = True
        connection, self._connection = self._connection, None
        try:
            await self._one_state.close()
            if connection is not None:
                with sql_errors("close"):
                    await connection.close()
        finally:
            try:
                await self._loop_engines.close()
            finally:
                await super().close()

    def _may_index(self) -> bool:
        # A task holding a unit of work holds the write lock: its searches test pending
        # messages one by one, and leave the indexing to a later search.
        return super()._may_index() and self.token not in open_units_of_work()

    def _check_open(self) -> None:
        self._connection_and_dialect()

    def _opened_connection(self) -> aiosqlite.Connection:
        return self._connection_and_dialect()[0]

    def _connection_and_dialect(self) -> tuple[aiosqlite.Connection, Dialect]:
        """The connection and the engine's dialect, with the storage's checks made once
        (a call's hot path: `engine` would make them again)."""
        if self._closed:
            raise PersistenceError("sqlite storage is closed")
        if self._connection is None or self._engine is None:
            raise PersistenceError("sqlite storage is not initialized: await initialize() first")
        self._check_process()
        return self._connection, self._engine.dialect

    async def _index_batch(self, *, wait: bool) -> indexing.Indexed | None:
        if wait:
            return await super()._index_batch(wait=True)
        # Without waiting for the write lock: a search never queues behind a writer.
        connection, dialect = self._connection_and_dialect()
        with sql_errors("index messages"):
            ran, written = await run_in_thread(
                connection,
                run_unless_locked,
                dialect,
                indexing.index_some(),
                int(self._busy_timeout * 1000),
                self._file_check,
            )
        return written if ran else None

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
        connection, dialect = self._connection_and_dialect()
        if write:
            self._refuse_writes(action)
        if write and self.token in open_units_of_work():
            work.close()
            raise PersistenceError(
                f"{action}: called while this task holds an open unit_of_work() of the same"
                " SQLite store (through this storage or another of the same file), whose"
                " write lock it would wait for until the busy timeout; do it through the"
                " unit of work (uow.sessions / uow.files) or after it"
            )
        with sql_errors(action):
            if write:
                assert self._writes is not None, "set when the connection opened"
                written: T = await self._writes.run(work)
                return written
            result: T = await run_in_thread(
                connection, self._read_in_thread, dialect, work, "BEGIN"
            )
            return result

    def _one_state_pages(self, read: ReadAfter[T]) -> AsyncGenerator[list[T], None] | None:
        """On a connection of the iteration's own (sqlite_one_state.py)."""
        dialect = self._connection_and_dialect()[1]
        check = self._file_check
        assert check is not None, "set when the connection opened"
        return self._one_state.batches(dialect, read, self._check_open, check)

    async def copy_to_file(self, target: Path) -> bool:
        """Copies the database with SQLite's online backup API (consistent under writers).

        Raises:
            PersistenceError: the file was replaced or removed while open, before or during
                the copy (found by attack: the copy was of the old, unlinked file).
        """
        connection = self._opened_connection()
        check = self._file_check
        assert check is not None, "set when the connection opened"
        check()
        with sql_errors("back up database"):
            # The copy runs in threads a cancel cannot stop: it waits for them (found by
            # attack: the caller removed the partial file, which the copy made again or
            # kept open, its descriptor held until garbage collection).
            await to_the_end(_back_up(connection, target))
        check()
        return True


async def _back_up(connection: aiosqlite.Connection, target: Path) -> None:
    async with aiosqlite.connect(target) as destination:
        await connection.backup(destination)


def _cannot_open_to_write(exc: BaseException) -> bool:
    """Whether SQLite refused to open the file to write, or found it read-only."""
    cause = exc.__cause__
    code = getattr(getattr(cause, "orig", cause), "sqlite_errorcode", None)
    return code is not None and code & 0xFF in (sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_READONLY)


_READ_ONLY_FILE_SYSTEM = "is on a read-only file system"


def _stopped_by_its_directory(path: Path) -> str | None:
    """The directory that stops SQLite writing the database `path`, and why (`D is not
    writable`), or None when it is not the cause: only when this process may read and
    write the file itself (through any symlink: SQLite keeps the journals beside the
    file it stands for) and SQLite must make its -wal or -shm. Found by attack: the
    directory was blamed for a file of mode 000, and for a -wal of mode 0444."""
    try:
        file = path.resolve(strict=True)
    except (OSError, RuntimeError):
        return None
    why = _unwritable(file.parent)
    if why == _READ_ONLY_FILE_SYSTEM:
        return f"{file.parent} {why}"  # the file's too
    if why is None or not _may_access(file, os.R_OK | os.W_OK):
        return None
    if all(file.with_name(file.name + suffix).exists() for suffix in ("-wal", "-shm")):
        return None
    return f"{file.parent} {why}"


def _unwritable(directory: Path) -> str | None:
    """Why this process may not create files in `directory`, or None if it may."""
    if _may_create_in(directory):
        return None
    try:
        if os.statvfs(directory).f_flag & os.ST_RDONLY:
            return _READ_ONLY_FILE_SYSTEM
    except OSError:
        pass
    return "is not writable"


def _may_create_in(directory: Path) -> bool:
    """Whether this process may create files in `directory` (by its effective ids)."""
    return _may_access(directory, os.W_OK | os.X_OK)


def _may_access(path: Path, mode: int) -> bool:
    effective = os.access in os.supports_effective_ids
    return os.access(path, mode, effective_ids=effective)
