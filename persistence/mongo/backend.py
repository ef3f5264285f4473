"""MongoDBSessionStorage: Beanie 2 documents on PyMongo's own async client."""

from __future__ import annotations

import asyncio
import warnings
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, suppress
from datetime import datetime
from pathlib import Path
from typing import Any

from beanie import init_beanie
from pymongo import AsyncMongoClient
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import ConfigurationError, OperationFailure

from persistence.clock import utc_now
from persistence.errors import (
    InvalidDataError,
    MigrationError,
    PersistenceError,
    SessionConflictError,
    SessionDeletedError,
)
from persistence.event_loops import refuse_another_loop, running_loop
from persistence.identifiers import forget_inherited_ids
from persistence.models import ChatMessage, ChatSession, Status, UploadedFileRecord
from persistence.mongo import bulk, repositories, writes
from persistence.mongo.backfill import META_COLLECTION, backfill_search_tokens, drop_retired_indexes
from persistence.mongo.connection import (
    check_connection_string,
    check_database_name,
    client_options,
    has_transactions,
    indexes_to_create,
)
from persistence.mongo.deletions import create_collection as create_deletions_collection
from persistence.mongo.deletions import forget_deletions_before
from persistence.mongo.documents import (
    FILES_COLLECTION,
    SESSIONS_COLLECTION,
    DocumentSet,
    bind_documents,
)
from persistence.mongo.errors import mongo_errors, redact
from persistence.mongo.reads import (
    CausalClock,
    ObservedUnitOfWork,
    ReadPreference,
    split_read_preference,
    stale_reading,
    writing,
)
from persistence.mongo.uow import MongoUnitOfWork
from persistence.search import parse_query
from persistence.storage import (
    BackendName,
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
from persistence.turns import save_turn
from persistence.validation import check_instance, check_instances, lookup_id

_COMMAND_NOT_FOUND = 59


class MongoDBSessionStorage(SessionStorage):
    """MongoDB: one document per session with its messages embedded, one per file record.

    Built on Beanie 2 over PyMongo's own `AsyncMongoClient` (no Motor). The client is
    tz-aware (datetimes come back in UTC) and decodes int64 as plain `int`, so values
    round-trip exactly as on SQLite and PostgreSQL. The server must answer within
    `server_selection_timeout` seconds (5 by default, unless the URL sets
    `serverSelectionTimeoutMS`), or StorageConnectionError is raised.

    Limits:
        A session, with its whole history, is one document, so MongoDB's 16 MiB
        document limit bounds it: the save that would cross it is refused with
        InvalidDataError and nothing of that save is written.
        Search follows the one rule of persistence.search through each message's
        `search_tokens`.
        A message's tokens count towards its session's 16 MiB.
        The unit of work is transactional on a replica set or sharded cluster only;
        see MongoUnitOfWork for what a standalone server guarantees.

    Writes (persistence.mongo.writes): each session document carries a `revision`
    that every write increments and an `incarnation` drawn when it is created.
    Documents written before revisions read as revision 1 of incarnation "" and
    their first write stores both.

    Reads from secondaries: `read_preference` (or the URL's `readPreference`) applies
    to listing, search, counts and exports only, with read-your-writes through
    causally consistent sessions (see persistence.mongo.reads); everything else
    uses the primary.
    """

    backend_name: BackendName = "mongodb"

    def __init__(
        self,
        connection_string: str,
        database_name: str = "gemini_mcp",
        *,
        server_selection_timeout: float = 5.0,
        read_preference: str | None = None,
        driver_options: Mapping[str, Any] | None = None,
    ) -> None:
        connection_string = check_connection_string(connection_string)
        # Kept for tools that open the same store again; repr and errors show it redacted.
        self.connection_string = connection_string
        self.database_name = check_database_name(database_name)
        self._display_url = redact(connection_string)
        # The client reads from the primary; the read preference routes stale reads only.
        self._client_url, self.read_preference = split_read_preference(
            connection_string, read_preference
        )
        self._clock = CausalClock() if self.read_preference is not None else None
        self._options = client_options(self._client_url, server_selection_timeout)
        # Anything else of AsyncMongoClient's (TLS files, event listeners, pool sizes).
        self._options.update(driver_options or {})
        self._client: AsyncMongoClient[dict[str, Any]] | None = self._new_client()
        self._docs: DocumentSet | None = None
        self._reading: DocumentSet | None = None
        self._closed = False
        self._reading_only = False
        self.supports_transactions = False
        # The event loop the storage opened in; PyMongo binds the client to the loop of
        # its first use of any kind (4.12+), which `_client_loop` reads.
        self._loop: asyncio.AbstractEventLoop | None = None
        # Openings in flight, and the mode the first one that succeeded opened in.
        self._attempts = 0
        self._opened_for_reading: bool | None = None

    def _new_client(self) -> AsyncMongoClient[dict[str, Any]]:
        try:
            with warnings.catch_warnings():
                # An unknown URL option is a mistake to report, not a warning to miss.
                warnings.simplefilter("error", UserWarning)
                return AsyncMongoClient(self._client_url, **self._options)
        except (ConfigurationError, UserWarning, ValueError, TypeError) as exc:
            raise InvalidDataError(
                f"connection_string: {redact(str(exc))} ({self._display_url})"
            ) from None

    def __repr__(self) -> str:
        return f"MongoDBSessionStorage({self._display_url!r}, database_name={self.database_name!r})"

    @property
    def client(self) -> AsyncMongoClient[dict[str, Any]]:
        """The PyMongo client, for tests and tools that need the server itself.

        Raises:
            PersistenceError: if the storage is closed.
        """
        self._refuse_closed()
        assert self._client is not None, "set until closed"
        self._refuse_another_loop()
        return self._client

    def _refuse_closed(self) -> None:
        if self._closed or self._client is None:
            raise PersistenceError("mongodb storage is closed")

    def _refuse_another_loop(self) -> None:
        """Found by review (PyMongo 4.12+ binds AsyncMongoClient to the loop of its
        first use): from another loop every call raised a raw RuntimeError. As on
        PostgreSQL, it is refused naming the cause."""
        refuse_another_loop(
            _bound_loop(self._client) or self._loop,
            lambda: f"mongodb storage {self._display_url}",
            "its client (bound at its first use) belongs",
        )

    @property
    def docs(self) -> DocumentSet:
        self._refuse_closed()
        self._refuse_another_loop()
        if self._docs is None:
            raise PersistenceError("mongodb storage is not initialized: await initialize() first")
        return self._docs

    async def initialize(self) -> None:
        """Connects, learns whether the server has transactions, creates the indexes.

        Raises:
            StorageConnectionError: if the server cannot be reached within the timeout.
        """
        if self._docs is not None and self._reading_only:
            raise PersistenceError("mongodb storage was opened for reading: open another to write")
        await self._connect(create_indexes=True)
        if self._opened_for_reading:
            # An open_for_reading() that finished first decided it.
            raise PersistenceError("mongodb storage was opened for reading: open another to write")

    async def open_for_reading(self) -> None:
        """Connects to a database that holds a store, creating nothing (not even indexes).

        Raises:
            StorageConnectionError: if the server cannot be reached within the timeout.
            MigrationError: if the database holds no persistence collections.
        """
        await self._connect(create_indexes=False)

    async def _connect(self, *, create_indexes: bool) -> None:
        forget_inherited_ids()
        client = self.client
        opening = self._docs is None
        if opening:
            self._loop = asyncio.get_running_loop()
        self._attempts += 1
        try:
            await self._connect_with(client, create_indexes=create_indexes)
        except BaseException:
            if (
                self._attempts == 1
                and self._docs is None
                and self._client is client
                and not self._closed
            ):
                # No opening succeeded nor is in flight (found by review: a failed one
                # closed the client a concurrent one had opened with): a new client,
                # bound to no loop, so the next attempt may come from another one (the
                # failed attempt's loop kept the client, and every retry from a new
                # loop raised a raw RuntimeError).
                self._client, self._loop = self._new_client(), None
                await self._let_go(client)
            raise
        finally:
            self._attempts -= 1
        if self._opened_for_reading is None:
            # The first opening that succeeded decides; only once opened (found by
            # review: a failed open_for_reading() left the storage refusing every write
            # after a successful initialize(), and one racing initialize() won).
            self._opened_for_reading = self._reading_only = not create_indexes

    async def _let_go(self, client: AsyncMongoClient[dict[str, Any]]) -> None:
        """Closes a client no longer used from its own loop; from another, lets go of it
        (found by review: PyMongo's close() there waited for good while that loop was
        open), to go with its loop."""
        if _bound_elsewhere(client):
            return
        with suppress(PersistenceError, TimeoutError), mongo_errors("close"):
            async with asyncio.timeout(CLOSE_SECONDS):
                await client.close()

    async def _connect_with(
        self, client: AsyncMongoClient[dict[str, Any]], *, create_indexes: bool
    ) -> None:
        with mongo_errors("initialize"):
            try:
                hello = await client.admin.command("hello")
            except OperationFailure as exc:
                # 4.4.0 and 4.4.1, which PyMongo still supports, only know the old name.
                if exc.code != _COMMAND_NOT_FOUND:
                    raise
                hello = await client.admin.command("isMaster")
            self.supports_transactions = has_transactions(hello)
            # The store as its connection string (without secrets) and database name it.
            self._identified_as(f"{self._display_url}/{self.database_name}")
            database = client[self.database_name]
            if not create_indexes:
                names = set(await database.list_collection_names())
                if not names & {SESSIONS_COLLECTION, FILES_COLLECTION}:
                    raise MigrationError(
                        f"database {self.database_name!r} at {self._display_url} holds no"
                        f" persistence collections ({SESSIONS_COLLECTION}, {FILES_COLLECTION}):"
                        " create them with `persistence upgrade` (or any command that writes)"
                    )
            docs = bind_documents()
            # Beanie would also create the indexes of the shared parent classes: one
            # createIndexes per collection, sent here, does the same work once.
            await init_beanie(database=database, document_models=docs.models, skip_indexes=True)
            router = hello.get("msg") == "isdbgrid"
            for model in docs.models if create_indexes else ():
                indexes = [field.index for field in model.get_settings().indexes]
                await model.get_pymongo_collection().create_indexes(
                    indexes_to_create(indexes, sharded_cluster=router)
                )
            if create_indexes:
                await create_deletions_collection(database)
                await drop_retired_indexes(database)
                await backfill_search_tokens(database)
            reading = docs
            if self.read_preference is not None:
                reading = bind_documents()
                await init_beanie(
                    database=self.reading_database(),
                    document_models=reading.models,
                    skip_indexes=True,
                )
        self._docs, self._reading = docs, reading

    def _refuse_writes(self) -> None:
        if self._reading_only:
            raise PersistenceError(
                f"mongodb storage {self._display_url} was opened for reading"
                " (open_for_reading()), which never writes"
            )

    def reading_database(self) -> AsyncDatabase[dict[str, Any]]:
        """The database as the routed reads see it: with the configured read preference."""
        preference: ReadPreference | None = self.read_preference
        return self.client.get_database(self.database_name, read_preference=preference)

    def _writing(self) -> AbstractAsyncContextManager[AsyncClientSession | None]:
        self._refuse_writes()
        return writing(self.client, self._clock)

    def _stale_reading(
        self,
    ) -> AbstractAsyncContextManager[tuple[DocumentSet, AsyncClientSession | None]]:
        return stale_reading(self.client, self._clock, self.docs, self._reading)

    async def close(self) -> None:
        client, self._client, self._closed = self._client, None, True
        self._docs = self._reading = None
        # From another loop PyMongo's close() waits for good while the client's loop is
        # open (found by review): the client is let go of, to go with its loop.
        if client is not None and not _bound_elsewhere(client):
            with mongo_errors("close"):
                await client.close()

    async def drop_database(self) -> None:
        """Drops this storage's database (tests and tools only); works after close() too.

        Raises:
            StorageConnectionError: if the server cannot be reached.
        """
        if not self._closed:
            self._refuse_another_loop()
        client = self._client if not self._closed and self._client is not None else None
        with mongo_errors("drop database"):
            if client is not None:
                await client.drop_database(self.database_name)
                return
            client = self._new_client()
            try:
                await client.drop_database(self.database_name)
            finally:
                await client.close()

    def unit_of_work(self) -> MongoUnitOfWork:
        self._refuse_writes()
        return ObservedUnitOfWork(
            self.client,
            self.docs,
            self.token,
            self.supports_transactions,
            self._clock,
            self._refuse_closed,
        )

    async def save_session(self, session: ChatSession, *, force: bool = False) -> bool:
        check_instance(session, ChatSession, "session")
        async with save_turn(self.token, session):
            return await self._save_session(session, force)

    async def _save_session(self, session: ChatSession, force: bool) -> bool:
        plan = session.plan_save(self.token)
        docs = self.docs
        if plan.writes_nothing and plan.certain:
            with mongo_errors("save session"):
                async with self._writing() as client_session:
                    found = await writes.still_there(docs, client_session, plan)
                if not found:
                    raise SessionDeletedError(session.session_id)
            session.caught_up(self.token, plan)
            return True
        try:
            with mongo_errors("save session"):
                async with self._writing() as client_session:
                    saved = await writes.write_plan(docs, client_session, plan, force=force)
        except (InvalidDataError, SessionConflictError, SessionDeletedError):
            raise  # refused before anything was written
        except BaseException:
            # Cut off, cancelled or failed: it may have landed, so the next save checks.
            session.save_failed(self.token, plan)
            raise
        session.saved_to(self.token, plan, saved.revision, saved.incarnation, exact=saved.exact)
        return True

    async def load_session(self, session_id: str, *, last: int | None = None) -> ChatSession | None:
        check_last(last)
        if not lookup_id(session_id, "session_id"):
            return None
        with mongo_errors("load session"):
            return await repositories.read_session(
                self.docs, None, session_id, token=self.token, last=last
            )

    async def load_sessions(self, session_ids: Sequence[str]) -> list[ChatSession]:
        with mongo_errors("load sessions"):
            return await repositories.read_sessions(
                self.docs, None, lookup_ids(session_ids), token=self.token
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
        with mongo_errors("list sessions"):
            async with self._stale_reading() as (docs, client_session):
                return await repositories.read_session_page(
                    docs, client_session, checked, limit, offset, token=self.token, after=cursor
                )

    async def delete_session(self, session_id: str) -> bool:
        if not lookup_id(session_id, "session_id"):
            return False
        with mongo_errors("delete session"):
            async with self._writing() as client_session:
                return await repositories.delete_session_document(
                    self.docs, client_session, session_id
                )

    async def save_file_record(self, file_record: UploadedFileRecord) -> bool:
        check_file_record(file_record, "file_record")
        with mongo_errors("save file record"):
            async with self._writing() as client_session:
                await repositories.write_file_record(self.docs, client_session, file_record)
        return True

    async def load_file_record(self, file_id: str) -> UploadedFileRecord | None:
        if not lookup_id(file_id, "file_id"):
            return None
        with mongo_errors("load file record"):
            return await repositories.read_file_record(self.docs, None, file_id)

    async def list_file_records(self, limit: int = 100) -> list[UploadedFileRecord]:
        check_page(limit)
        with mongo_errors("list file records"):
            return await repositories.read_file_records_page(self.docs, None, limit)

    async def delete_expired_files(self) -> int:
        with mongo_errors("delete expired files"):
            async with self._writing() as client_session:
                return await repositories.delete_files_expired_by(
                    self.docs, client_session, utc_now()
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
        with mongo_errors("search messages"):
            async with self._stale_reading() as (docs, client_session):
                return await repositories.search_messages(
                    docs, client_session, query, limit, session_id=session_id, role=checked
                )

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
        parsed = parse_query(query)
        if parsed is None or not searchable_session(session_id):
            return
        in_session = session_id is not None

        async def page(size: int, below: Any) -> tuple[list[ChatMessage], Any, str | None]:
            with mongo_errors("search messages"):
                async with self._stale_reading() as (docs, client_session):
                    rows = await repositories.search_rows(
                        docs,
                        client_session,
                        parsed,
                        size,
                        session_id=session_id,
                        role=checked,
                        below=below,
                    )
            if not rows:
                return [], None, None
            held = rows[0].get("incarnation") if in_session else None
            last = repositories.search_key(rows[-1], in_session=in_session)
            return [repositories.found_message(row) for row in rows], last, held

        async for batch in search_batches(page, batch_size, limit):
            yield batch

    async def iter_sessions(
        self, batch_size: int = 500, *, with_messages: bool = True
    ) -> AsyncIterator[list[ChatSession]]:
        check_batch_size(batch_size)
        after: str | None = None
        while True:
            with mongo_errors("iterate sessions"):
                async with self._stale_reading() as (docs, client_session):
                    batch = await repositories.read_session_batch_after(
                        docs,
                        client_session,
                        after,
                        batch_size,
                        token=self.token,
                        with_messages=with_messages,
                    )
            if not batch:
                return
            yield batch
            after = batch[-1].session_id

    async def iter_file_records(
        self, batch_size: int = 500
    ) -> AsyncIterator[list[UploadedFileRecord]]:
        check_batch_size(batch_size)
        after: str | None = None
        while True:
            with mongo_errors("iterate file records"):
                async with self._stale_reading() as (docs, client_session):
                    batch = await repositories.read_file_records_after(
                        docs, client_session, after, batch_size
                    )
            if not batch:
                return
            yield batch
            after = batch[-1].file_id

    async def count(self) -> StorageCounts:
        with mongo_errors("count"):
            async with self._stale_reading() as (docs, client_session):
                return await repositories.count_store(docs, client_session, utc_now())

    async def count_sessions(self) -> dict[str, int]:
        with mongo_errors("count sessions"):
            return await repositories.count_sessions_by_status(self.docs, None)

    async def expire_sessions(self, updated_before: datetime) -> int:
        cutoff = check_instant(updated_before, "updated_before")
        with mongo_errors("expire sessions"):
            async with self._writing() as client_session:
                return await repositories.expire_sessions_before(self.docs, client_session, cutoff)

    async def forget_deletions(self, deleted_before: datetime) -> int:
        cutoff = check_instant(deleted_before, "deleted_before")
        with mongo_errors("forget deletions"):
            async with self._writing() as client_session:
                return await forget_deletions_before(self.docs, client_session, cutoff)

    async def read_notes(self) -> dict[str, str]:
        with mongo_errors("read the store's notes"):
            found = _notes(self.docs).find({"_id": {"$regex": f"^{_NOTE}"}})
            return {str(note["_id"])[len(_NOTE) :]: str(note["value"]) async for note in found}

    async def write_note(self, name: str, value: str | None) -> None:
        checked, text = check_note_name(name), check_note_value(value)
        with mongo_errors("write a note"):
            async with self._writing() as client_session:
                notes, key = _notes(self.docs), f"{_NOTE}{checked}"
                if text is None:
                    await notes.delete_one({"_id": key}, session=client_session)
                else:
                    await notes.replace_one(
                        {"_id": key}, {"value": text}, upsert=True, session=client_session
                    )

    async def set_status(self, session_ids: Sequence[str], status: Status) -> int:
        ids = lookup_ids(session_ids)
        checked = check_new_status(status)
        with mongo_errors("set session status"):
            async with self._writing() as client_session:
                return await repositories.set_sessions_status(
                    self.docs, client_session, ids, checked
                )

    async def insert_sessions(self, sessions: Sequence[ChatSession]) -> bool:
        check_instances(sessions, ChatSession, "sessions")
        documents = bulk.documents_for_insert(sessions)
        if not documents:
            return True
        self._refuse_writes()
        with mongo_errors("insert sessions"):
            return await bulk.insert_documents(
                self.client,
                self.docs,
                documents,
                transactional=self.supports_transactions,
                clock=self._clock,
            )

    async def insert_file_records(self, records: Sequence[UploadedFileRecord]) -> list[str]:
        check_file_records(records, "records")
        with mongo_errors("insert file records"):
            async with self._writing() as client_session:
                return await repositories.insert_absent_file_records(
                    self.docs, client_session, records
                )

    async def load_file_records(self, file_ids: Sequence[str]) -> list[UploadedFileRecord]:
        with mongo_errors("load file records"):
            return await repositories.read_file_records(
                self.docs, None, lookup_ids(file_ids, "file_ids")
            )

    async def copy_to_file(self, target: Path) -> bool:
        """MongoDB has no native single-file copy: the caller falls back to the export."""
        return False


# How long a close() of a client waits for its connections when an opening failed.
CLOSE_SECONDS = 5.0


def _bound_loop(client: AsyncMongoClient[Any] | None) -> asyncio.AbstractEventLoop | None:
    """The loop PyMongo bound the client to at its first use of any kind (a tool's or
    drop_database's too), by its own record; None while unused."""
    bound = getattr(client, "_loop", None)
    return bound if isinstance(bound, asyncio.AbstractEventLoop) else None


def _bound_elsewhere(client: AsyncMongoClient[Any]) -> bool:
    """Whether the client is bound to a loop other than the running one."""
    bound = _bound_loop(client)
    return bound is not None and bound is not running_loop()


# The store's notes (persistence.store_notes) are documents of persistence_meta, beside
# the search tokens' marker, each `_id` the note's name after this prefix.
_NOTE = "note "


def _notes(docs: DocumentSet) -> Any:
    return docs.sessions.get_pymongo_collection().database[META_COLLECTION]
