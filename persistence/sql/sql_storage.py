"""The SQL family's SessionStorage: one SQLAlchemy code path for SQLite and PostgreSQL.

Each public method validates its input, then runs a Work generator (repositories.py,
writes.py) through `_run`, which the dialect's subclass implements.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import weakref
from abc import abstractmethod
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Sequence,
)
from contextlib import aclosing
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import TypeVar

from sqlalchemy.ext.asyncio import AsyncEngine

from persistence.changes import SavePlan
from persistence.clock import utc_now
from persistence.errors import (
    InvalidDataError,
    PersistenceError,
    SessionConflictError,
    SessionDeletedError,
)
from persistence.event_loops import to_the_end
from persistence.models import ChatMessage, ChatSession, Status, UploadedFileRecord
from persistence.sql import indexing, message_owners, new_sessions, notes, repositories, writes
from persistence.sql.engines import (
    WRITE_OPTIONS,
)
from persistence.sql.errors import ReadApart, deadlock_detected, sql_errors, unique_violation
from persistence.sql.forks import Opener
from persistence.sql.held_sessions import UnheldTurn, held_by_this_task
from persistence.sql.runner import ReadAfter, Work
from persistence.sql.schema import VERSION_TABLE, check_readable, migrate
from persistence.sql.search import Found
from persistence.sql.search_statements import TOP
from persistence.sql.stamping import stamp
from persistence.sql.uow import SqlUnitOfWork, sessions_written_in_this_task
from persistence.storage import (
    SessionStorage,
    StorageCounts,
    check_batch_size,
    check_file_record,
    check_file_records,
    check_instant,
    check_last,
    check_new_status,
    check_page,
    check_search,
    check_search_batches,
    check_status,
    lookup_ids,
    page_cursor,
    search_batches,
    searchable_session,
)
from persistence.store_notes import check_note_name, check_note_value
from persistence.validation import check_instance, check_instances, lookup_id

T = TypeVar("T")
logger = logging.getLogger(__name__)


class SqlSessionStorage(SessionStorage):
    """The SessionStorage of the SQL family; subclasses only say how work is run."""

    def __init__(self, version_table: str = VERSION_TABLE) -> None:
        if not version_table.isidentifier():
            raise InvalidDataError(f"version_table: {version_table!r} is not a plain table name")
        self._engine: AsyncEngine | None = None
        # The process that opened it: in a fork's child the storage is refused (forks.py).
        self._opener: Opener | None = None
        self._closed = False
        self._reading_only = False
        # Messages this storage's saves inserted since they last wrote pending search
        # documents (indexing.then_index; where inserts write them, that writes none).
        self._left_pending = 0
        self.version_table = version_table
        # SQLite: raises if the file at the path is no longer the one opened; run in
        # each transaction just begun (sqlite_storage.same_file).
        self._file_check: Callable[[], None] | None = None

    @abstractmethod
    def _create_engine(self) -> AsyncEngine: ...

    def _create_stamping_engine(self) -> AsyncEngine:
        """The engine `stamp_schema` writes through."""
        return self._create_engine()

    @property
    @abstractmethod
    def _where(self) -> str:
        """Names the database in errors (never with its password)."""

    # Whether a save that is one statement goes without a transaction around it: an
    # append (PostgreSQL's data-modifying CTE), a new session without messages.
    _one_statement_saves = False
    # Whether a load is one statement (PostgreSQL: a UNION of the row and the history).
    _one_statement_loads = False

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
        self._refuse_closed()
        if self._engine is None:
            raise PersistenceError(
                f"{self.backend_name} storage is not initialized: await initialize() first"
            )
        self._check_process()
        return self._engine

    def _refuse_closed(self) -> None:
        if self._closed:
            raise PersistenceError(f"{self.backend_name} storage is closed")

    def _check_process(self) -> None:
        """Refuses a fork's child the storage its parent opened (forks.py).

        Raises:
            PersistenceError: this process is not the one that opened it.
        """
        # `_where` only on refusal: naming a PostgreSQL URL without its password takes
        # 3.4 us, which every call paid until a profile of appends showed it.
        if self._carried_into_child():
            assert self._opener is not None
            raise self._opener.refusal(self.backend_name, self._where)

    def _carried_into_child(self) -> bool:
        """Whether this process is a fork's child of the one that opened the storage."""
        return self._opener is not None and not self._opener.here()

    async def initialize(self) -> None:
        await self._open(read_only=False)

    async def open_for_reading(self) -> None:
        await self._open(read_only=True)

    async def _open(self, *, read_only: bool) -> None:
        if self._closed:
            raise PersistenceError(f"{self.backend_name} storage is closed")
        self._check_process()
        if self._engine is not None and self._reading_only and not read_only:
            raise PersistenceError(
                f"{self.backend_name} storage was opened for reading: open another to write"
            )
        opening = self._engine is None
        if opening:
            self._engine = self._create_engine()
            self._opener = Opener()
            self._reading_only = read_only
        where, table = self._where, self.version_table
        try:
            # Opened again from another loop, SQLite's engine of that loop.
            engine = self.engine
            with sql_errors(f"open {where}" if read_only else f"initialize schema of {where}"):
                if read_only:
                    async with engine.connect() as connection:
                        await connection.run_sync(
                            partial(check_readable, version_table=table, where=where)
                        )
                    return
                await to_the_end(_migrate(engine, table, where))
        except BaseException:
            if not opening:
                # Found by attack: a failed call again (the write lock held past the busy
                # timeout) closed a storage that other tasks and loops were using.
                raise
            await self._unopen()
            raise

    async def _unopen(self) -> None:
        """Lets go of the engine an open that failed made."""
        # Not opened: a fork's child may open it (found by review: refused for good).
        made, self._engine, self._opener = self._engine, None, None
        if made is not None:
            with sql_errors("close"):
                await made.dispose()

    async def stamp_schema(self, revision: str) -> tuple[tuple[str, ...], str]:
        """Records the revision the store's tables are at (`persistence stamp`), for a
        store initialize() refuses because its version table says another; only on a
        storage not opened.

        Returns:
            The revisions the version table held before, and the one it holds now.

        Raises:
            MigrationError: a revision not of ours, or tables not at it (stamping.stamp).
            PersistenceError: the storage is open or closed, or the database fails.
        """
        if self._closed or self._engine is not None:
            raise PersistenceError(f"stamp schema: give a {self.backend_name} storage not opened")
        engine = self._create_stamping_engine()
        try:
            with sql_errors(f"stamp schema of {self._where}"):
                async with engine.execution_options(**WRITE_OPTIONS).begin() as connection:
                    return await connection.run_sync(
                        partial(
                            stamp,
                            revision=revision,
                            version_table=self.version_table,
                            where=self._where,
                        )
                    )
        finally:
            self._closed = True
            with sql_errors("close"):
                await engine.dispose()

    def _refuse_writes(self, action: str) -> None:
        if self._reading_only:
            raise PersistenceError(
                f"{action}: {self._where} was opened for reading (open_for_reading()),"
                " which never writes"
            )

    async def close(self) -> None:
        if self._carried_into_child():
            self._let_go()
            return
        engine, self._engine, self._closed = self._engine, None, True
        if engine is not None:
            with sql_errors("close"):
                await engine.dispose()

    def _let_go(self) -> None:
        """close() in a fork's child: the storage is closed there, and what it held is
        dropped without a word to the parent's database (forks.py)."""
        self._engine, self._closed = None, True

    def unit_of_work(self) -> SqlUnitOfWork:
        self._refuse_writes("unit of work")
        return SqlUnitOfWork(
            self.engine.execution_options(**WRITE_OPTIONS),
            self.token,
            self._refuse_closed,
            self._file_check,
        )

    def check_plain_save(self, session: ChatSession) -> None:
        # Found by attack: inside its unit of work, a task saved through SessionManager a
        # session the unit held, while another task's manager save of it waited for the
        # unit with the manager's turn: both waited for good.
        if held_by_this_task(self.token, session):
            raise PersistenceError(
                f"save session: session {session.session_id!r} is held by this task's open"
                " unit_of_work(), which wrote it; a save outside the unit would wait for the"
                " unit to end (on PostgreSQL, for the row it locked: for good). Add it to the"
                " unit again (uow.sessions.add) or save it after the unit ends"
            )
        self._refuse_rows_of_own_units([session.session_id], "save session")

    def _refuse_rows_of_own_units(self, session_ids: Iterable[str] | None, action: str) -> None:
        """Refuses a write of sessions (None: any) that this task's open units of work
        wrote: their rows stay locked until the units end. Found by attack: on
        PostgreSQL a delete, a status change, an expiry sweep or a save of another copy
        from the unit's own task waited for that lock for good."""
        written = sessions_written_in_this_task(self.token)
        if not written:
            return
        clashing = written if session_ids is None else written.intersection(session_ids)
        if clashing:
            raise PersistenceError(
                f"{action}: session {min(clashing)!r} was written by this task's open"
                " unit_of_work(), whose transaction holds its row until the unit ends; a"
                " write outside the unit would wait for it (on PostgreSQL, for good): do it"
                " through the unit of work (uow.sessions) or after it"
            )

    async def save_session(self, session: ChatSession, *, force: bool = False) -> bool:
        check_instance(session, ChatSession, "session")
        self.check_plain_save(session)
        return await self._save_in_turn(session, force)

    async def _save_in_turn(self, session: ChatSession, force: bool) -> bool:
        """Saves in the object's save turn, taken once no other task's unit of work
        holds the object."""
        async with UnheldTurn(self.token, session):
            return await self._save_session(session, force)

    async def _save_session(self, session: ChatSession, force: bool) -> bool:
        plan = session.plan_save(self.token)
        if plan.writes_nothing and plan.certain:
            if not await self._run(writes.still_there(plan), "save session", write=False):
                raise SessionDeletedError(session.session_id)
            session.caught_up(self.token, plan)
            return True
        try:
            saved = await _again_after_a_deadlock(partial(self._write_plan, plan, force))
        except (InvalidDataError, SessionConflictError, SessionDeletedError):
            raise  # refused before anything was written
        except PersistenceError as exc:
            session.save_failed(self.token, plan)
            if unique_violation(exc):
                raise await self._duplicate_message(plan.session_id, plan.appends) from exc
            raise
        except BaseException:
            # Cancelled or cut off: it may have landed, so the next save checks.
            session.save_failed(self.token, plan)
            raise
        session.saved_to(
            self.token,
            plan,
            saved.revision,
            saved.incarnation,
            exact=saved.exact,
            removals=saved.removals,
        )
        return True

    async def _write_plan(self, plan: SavePlan, force: bool) -> writes.Saved:
        saved: writes.Saved | None = None
        alone = writes.one_statement_save(plan) if self._one_statement_saves else None
        if alone is not None:
            # One statement: no BEGIN / COMMIT round trips around it.
            saved = await self._run(alone, "save session", write=True, single=True)
        if saved is None:
            work = writes.write_plan(plan, force=force)
            left = self._left_pending
            if left >= indexing.SAVES_INDEX_AT:
                work, left = indexing.then_index(work), 0
            saved = await self._run(work, "save session", write=True)
            self._left_pending = left + len(plan.appends)
        return saved

    async def _duplicate_message(
        self, session_id: str, appended: Sequence[ChatMessage]
    ) -> PersistenceError:
        """Names the new message whose id the store already holds (a unique violation)."""
        owners = await self._run(
            message_owners.message_owners([message.message_id for message in appended]),
            "save session",
            write=False,
        )
        for message_id, owner in owners.items():
            where = "this session" if owner == session_id else f"another session ({owner!r})"
            return InvalidDataError(f"message_id {message_id!r} is already stored in {where}")
        return PersistenceError("save session failed: a unique key was violated")

    async def load_session(self, session_id: str, *, last: int | None = None) -> ChatSession | None:
        check_last(last)
        if not lookup_id(session_id, "session_id"):
            return None
        if self._one_statement_loads:
            # Its own snapshot: no transaction around it.
            return await self._run(
                repositories.read_session_in_one_statement(session_id, self.token, last),
                "load session",
                write=False,
            )
        return await self._run(
            repositories.read_session(session_id, self.token, last),
            "load session",
            write=False,
            snapshot=True,
        )

    async def load_sessions(self, session_ids: Sequence[str]) -> list[ChatSession]:
        return await self._run(
            repositories.read_sessions(lookup_ids(session_ids), self.token),
            "load sessions",
            write=False,
            snapshot=True,
        )

    async def list_sessions(
        self,
        status: str | None = None,
        limit: int = 100,
        offset: int = 0,
        *,
        after: ChatSession | None = None,
    ) -> list[ChatSession]:
        checked = check_status(status)
        check_page(limit, offset)
        cursor = page_cursor(after)
        return await self._run_stale(
            partial(repositories.read_session_page, checked, limit, offset, self.token, cursor),
            "list sessions",
        )

    async def delete_session(self, session_id: str) -> bool:
        if not lookup_id(session_id, "session_id"):
            return False
        self._refuse_rows_of_own_units([session_id], "delete session")
        # One DELETE: its messages go by ON DELETE CASCADE, their terms by a trigger.
        return await _again_after_a_deadlock(
            lambda: self._run(
                repositories.delete_session(session_id), "delete session", write=True, single=True
            )
        )

    async def save_file_record(self, file_record: UploadedFileRecord) -> bool:
        check_file_record(file_record, "file_record")
        await self._run(
            repositories.write_file_record(file_record),
            "save file record",
            write=True,
            single=True,
        )
        return True

    async def load_file_record(self, file_id: str) -> UploadedFileRecord | None:
        if not lookup_id(file_id, "file_id"):
            return None
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
            repositories.delete_files_expired_by(utc_now()),
            "delete expired files",
            write=True,
            single=True,
        )

    async def search_messages(
        self,
        query: str,
        limit: int = 50,
        *,
        session_id: str | None = None,
        role: str | None = None,
    ) -> list[ChatMessage]:
        checked = check_search(query, limit, role)
        if not searchable_session(session_id):
            return []
        found = await self._search_page(query, limit, session_id, checked, TOP)
        return found.messages

    async def iter_search_messages(
        self,
        query: str,
        batch_size: int = 500,
        *,
        session_id: str | None = None,
        role: str | None = None,
        limit: int | None = None,
    ) -> AsyncIterator[list[ChatMessage]]:
        checked = check_search_batches(query, batch_size, limit, role)
        if not searchable_session(session_id):
            return

        async def page(
            size: int, below: int | None
        ) -> tuple[list[ChatMessage], int | None, str | None]:
            top = TOP if below is None else below - 1
            found = await self._search_page(
                query, size, session_id, checked, top, in_one_incarnation=session_id is not None
            )
            return found.messages, found.last_key, found.incarnation

        async for batch in search_batches(page, batch_size, limit):
            yield batch

    async def _search_page(
        self,
        query: str,
        limit: int,
        session_id: str | None,
        role: str | None,
        top: int,
        *,
        in_one_incarnation: bool = False,
    ) -> Found:
        """The newest `limit` matches whose stored-order key is at most `top`; with
        `in_one_incarnation`, read in one snapshot with the session's incarnation."""
        search = partial(
            repositories.search_messages,
            query,
            limit,
            session_id,
            role,
            top=top,
            incarnation=in_one_incarnation,
        )
        may_index = self._may_index()
        found = await self._run_stale(
            partial(search, may_index=may_index), "search messages", snapshot=in_one_incarnation
        )
        if may_index and (found is None or found.pending >= indexing.SAVES_INDEX_AT):
            # Many pending messages were tested one by one: write their documents, so the
            # next searches use the index (unless another writer holds the store). Fewer
            # cost less to test than a write transaction; the saves write those.
            try:
                await self._index_pending(wait=False)
            except PersistenceError as exc:
                # Only later searches' speed is lost: this one tests them one by one.
                # Found by attack: on a full disk every search failed, though it reads.
                logger.warning("search messages: pending messages not indexed: %s", exc)
        if found is None:
            # Too many to test one by one: search again, through what is indexed now.
            found = await self._run_stale(
                partial(search, may_index=False), "search messages", snapshot=in_one_incarnation
            )
        assert found is not None  # a search that may not index always finds
        return found

    async def index_for_search(self) -> int:
        self._refuse_writes("index for search")
        return await self._index_pending(wait=True)

    def _may_index(self) -> bool:
        """Whether a search may write the documents or terms of pending messages
        (indexing.py)."""
        return not self._reading_only

    async def _index_pending(self, *, wait: bool) -> int:
        """Writes the search documents (SQLite) or terms (PostgreSQL) of every pending
        message, a batch per transaction; returns how many. Without `wait`, it stops
        where another writer holds the store."""
        written = 0
        while (batch := await self._index_batch(wait=wait)) is not None:
            written += batch.written
            if not batch.more:
                break
        return written

    async def _index_batch(self, *, wait: bool) -> indexing.Indexed | None:
        """Writes the documents or terms of a batch of pending messages (None: `wait` was
        false and the store was locked, nothing written)."""
        return await self._run(indexing.index_some(), "index messages", write=True)

    async def iter_sessions(
        self, batch_size: int = 500, *, with_messages: bool = True
    ) -> AsyncIterator[list[ChatSession]]:
        check_batch_size(batch_size)

        def read(after: str) -> Work[tuple[list[str], list[ChatSession]]]:
            return repositories.read_session_batch(after, batch_size, with_messages, self.token)

        # Closed with this one, at once (a `break`, aclosing).
        async with aclosing(self._pages(read, "iterate sessions", snapshot=True)) as pages:
            async for batch in pages:
                yield batch

    async def iter_file_records(
        self, batch_size: int = 500
    ) -> AsyncIterator[list[UploadedFileRecord]]:
        check_batch_size(batch_size)

        def read(after: str) -> Work[tuple[list[str], list[UploadedFileRecord]]]:
            records = yield from repositories.read_file_record_batch(after, batch_size)
            return [record.file_id for record in records], records

        async with aclosing(self._pages(read, "iterate file records", snapshot=False)) as pages:
            async for batch in pages:
                yield batch

    async def _pages(
        self, read: ReadAfter[T], action: str, *, snapshot: bool
    ) -> AsyncGenerator[list[T], None]:
        """Keyset paging: the pages `read` returns after "", then after each page's last
        key, until one is empty. All in one state of the store where the backend reads
        so (`_one_state_pages`); else, or where it says it cannot (ReadApart, with a
        warning), each read apart (a replica's, if any), one state with `snapshot` (a
        page of several statements)."""
        try:
            with sql_errors(action):
                one_state = self._one_state_pages(read)
                if one_state is not None:
                    async with aclosing(one_state) as pages:
                        async for page in pages:
                            yield page
                    return
        except ReadApart as exc:
            logger.warning("%s: %s: its batches are read apart, each one state", action, exc)
        after = ""
        while True:
            keys, page = await self._run_stale(partial(read, after), action, snapshot=snapshot)
            if not keys:
                return
            yield page
            after = keys[-1]

    def _one_state_pages(self, read: ReadAfter[T]) -> AsyncGenerator[list[T], None] | None:
        """The pages of `read` all in one state, on a connection of the iteration's own,
        or None where they are read apart (the default).

        Raises (while iterated, before any page):
            ReadApart: the backend cannot read one state here.
        """
        return None

    async def count(self) -> StorageCounts:
        return await self._run_stale(
            partial(repositories.count_store, utc_now()), "count", snapshot=True
        )

    async def count_sessions(self) -> dict[str, int]:
        return await self._run(
            repositories.count_sessions_by_status(), "count sessions", write=False
        )

    async def expire_sessions(self, updated_before: datetime) -> int:
        cutoff = check_instant(updated_before, "updated_before")
        self._refuse_rows_of_own_units(None, "expire sessions")
        return await self._run(
            repositories.expire_sessions_before(cutoff),
            "expire sessions",
            write=True,
            single=True,
        )

    async def forget_deletions(self, deleted_before: datetime) -> int:
        cutoff = check_instant(deleted_before, "deleted_before")
        return await self._run(
            repositories.forget_deletions_before(cutoff),
            "forget deletions",
            write=True,
            single=True,
        )

    async def read_notes(self) -> dict[str, str]:
        return await self._run(notes.read_notes(), "read the store's notes", write=False)

    async def write_note(self, name: str, value: str | None) -> None:
        checked = check_note_name(name), check_note_value(value)
        await self._run(notes.write_note(*checked), "write a note", write=True)

    async def set_status(self, session_ids: Sequence[str], status: Status) -> int:
        ids = lookup_ids(session_ids)
        checked = check_new_status(status)
        self._refuse_rows_of_own_units(ids, "set session status")
        return await self._run(
            repositories.set_sessions_status(ids, checked),
            "set session status",
            write=True,
        )

    async def insert_sessions(self, sessions: Sequence[ChatSession]) -> bool:
        check_instances(sessions, ChatSession, "sessions")
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

    async def insert_file_records(self, records: Sequence[UploadedFileRecord]) -> list[str]:
        check_file_records(records, "records")
        if not records:
            return []
        return await self._run(
            repositories.insert_absent_file_records(records), "insert file records", write=True
        )

    async def load_file_records(self, file_ids: Sequence[str]) -> list[UploadedFileRecord]:
        return await self._run(
            repositories.read_file_records(lookup_ids(file_ids, "file_ids")),
            "load file records",
            write=False,
        )

    async def copy_to_file(self, target: Path) -> bool:
        return False


async def _migrate(engine: AsyncEngine, version_table: str, where: str) -> None:
    connecting = engine.execution_options(**WRITE_OPTIONS).connect()
    async with connecting as connection, _migrations_of(asyncio.get_running_loop()):
        await connection.run_sync(partial(migrate, version_table=version_table, where=where))


# One migration at a time in each event loop: alembic's `context` and `op` are proxies
# global to the process, and a run of revisions waits on its connection, letting
# another task's run replace them (schema._REVISION_RUNS does the same across threads).
# Found by attack: asyncio.gather of eight stores' initialize() on new SQLite files
# failed with alembic's KeyError 'config', and ran one store's revision on another's
# connection ("table chat_sessions already exists"). Taken once connected: a server that
# cannot be reached holds up no other store's initialize().
_MIGRATIONS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
    weakref.WeakKeyDictionary()
)
_MIGRATIONS_GUARD = threading.Lock()


def _migrations_of(loop: asyncio.AbstractEventLoop) -> asyncio.Lock:
    with _MIGRATIONS_GUARD:
        lock = _MIGRATIONS.get(loop)
        if lock is None:
            lock = _MIGRATIONS[loop] = asyncio.Lock()
        return lock


# How many times a plain save or delete runs when PostgreSQL picks it as a deadlock's
# victim. Found by attack: with units of work of other writers taking two sessions in
# opposite orders, 27 of 121 plain saves of those sessions in 20 s failed so, though a
# plain save holds one session: the server rolled them back whole, so they run again.
_DEADLOCK_ATTEMPTS = 3


async def _again_after_a_deadlock(write: Callable[[], Awaitable[T]]) -> T:
    """Runs `write` (one transaction), again while PostgreSQL aborts it as a deadlock's
    victim, up to _DEADLOCK_ATTEMPTS times."""
    attempt = 1
    while True:
        try:
            return await write()
        except PersistenceError as exc:
            if attempt == _DEADLOCK_ATTEMPTS or not deadlock_detected(exc):
                raise
            attempt += 1
