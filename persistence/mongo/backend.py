"""MongoDBSessionStorage: Beanie 2 documents on PyMongo's own async client."""

from __future__ import annotations

import uuid
import warnings
from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from beanie import init_beanie
from bson.codec_options import TypeDecoder, TypeRegistry
from bson.int64 import Int64
from pymongo import AsyncMongoClient
from pymongo.errors import ConfigurationError, OperationFailure

from persistence.clock import utc_now
from persistence.errors import InvalidDataError, PersistenceError
from persistence.models import ChatMessage, ChatSession, Status, UploadedFileRecord
from persistence.mongo import bulk, repositories
from persistence.mongo.documents import DocumentSet, bind_documents
from persistence.mongo.errors import mongo_errors, redact
from persistence.mongo.uow import MongoUnitOfWork
from persistence.storage import (
    BackendName,
    SessionStorage,
    StorageCounts,
    check_page,
    check_status,
)

_SCHEMES = ("mongodb://", "mongodb+srv://")
# MongoDB's rules for database names: these characters, and fewer than 64 bytes.
_BAD_DATABASE_CHARACTERS = set('/\\. "$*<>:|?\x00')
_DATABASE_NAME_BYTES = 63
_COMMAND_NOT_FOUND = 59


class _Int64AsInt(TypeDecoder):
    """Decodes BSON int64 as a plain int, as SQLite and PostgreSQL return it."""

    bson_type = Int64

    def transform_bson(self, value: Any) -> int:
        return int(value)


def check_connection_string(connection_string: str) -> str:
    """Accepts `mongodb://` and `mongodb+srv://` URLs.

    Raises:
        InvalidDataError: for any other scheme (the password is never repeated).
    """
    if not isinstance(connection_string, str) or not connection_string.lower().startswith(_SCHEMES):
        scheme = (
            str(connection_string).split("://", 1)[0] if "://" in str(connection_string) else ""
        )
        shown = f"scheme {scheme!r}" if scheme else "no scheme"
        raise InvalidDataError(
            f"connection_string: {shown} is not MongoDB (use mongodb:// or mongodb+srv://)"
        )
    return connection_string


def check_database_name(name: str) -> str:
    """Refuses a database name MongoDB would refuse.

    Raises:
        InvalidDataError: naming the problem.
    """
    if not name:
        raise InvalidDataError("database_name: must not be empty")
    bad = sorted(set(name) & _BAD_DATABASE_CHARACTERS)
    if bad:
        raise InvalidDataError(f"database_name: {name!r} contains {''.join(bad)!r}")
    if len(name.encode("utf-8")) > _DATABASE_NAME_BYTES:
        raise InvalidDataError(f"database_name: longer than {_DATABASE_NAME_BYTES} bytes")
    return name


def client_options(connection_string: str, server_selection_timeout: float) -> dict[str, Any]:
    """Keyword options of the client: aware UTC datetimes, plain ints, a short timeout.

    A timeout the URL sets itself is kept.
    """
    given = {key.lower() for key, _ in parse_qsl(urlsplit(connection_string).query)}
    options: dict[str, Any] = {
        # MongoDB returns naive datetimes unless told otherwise; every backend returns UTC.
        "tz_aware": True,
        "tzinfo": UTC,
        "type_registry": TypeRegistry([_Int64AsInt()]),
        "connect": False,
    }
    timeout_ms = int(server_selection_timeout * 1000)
    if "serverselectiontimeoutms" not in given:
        options["serverSelectionTimeoutMS"] = timeout_ms
    if "connecttimeoutms" not in given:
        options["connectTimeoutMS"] = timeout_ms
    return options


def has_transactions(hello: Mapping[str, Any]) -> bool:
    """Whether the server that sent this `hello` reply runs multi-document transactions.

    A replica set member (`setName`) or a mongos router (`msg: isdbgrid`) with logical
    sessions does; a standalone server does not.
    """
    return "logicalSessionTimeoutMinutes" in hello and (
        "setName" in hello or hello.get("msg") == "isdbgrid"
    )


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
        Search matches whole words as Python's regular expressions split them; the text index finds
        candidate sessions, so a word glued to a symbol MongoDB's tokenizer does not
        split on (e.g. `a€b`) is not found. Words longer than 1000 characters match
        nothing.
        The unit of work is transactional on a replica set or sharded cluster only;
        see MongoUnitOfWork for what a standalone server guarantees.
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
        check_connection_string(connection_string)
        # Kept for tools that open the same store again; repr and errors show it redacted.
        self.connection_string = connection_string
        self.database_name = check_database_name(database_name)
        self._display_url = redact(connection_string)
        self._token = uuid.uuid4().hex
        self._options = client_options(connection_string, server_selection_timeout)
        if read_preference is not None:
            self._options["readPreference"] = read_preference
        # Anything else of AsyncMongoClient's (TLS files, event listeners, pool sizes).
        self._options.update(driver_options or {})
        self._client: AsyncMongoClient[dict[str, Any]] | None = self._new_client()
        self._docs: DocumentSet | None = None
        self._closed = False
        self.supports_transactions = False

    def _new_client(self) -> AsyncMongoClient[dict[str, Any]]:
        try:
            with warnings.catch_warnings():
                # An unknown URL option is a mistake to report, not a warning to miss.
                warnings.simplefilter("error", UserWarning)
                return AsyncMongoClient(self.connection_string, **self._options)
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
        if self._closed or self._client is None:
            raise PersistenceError("mongodb storage is closed")
        return self._client

    @property
    def docs(self) -> DocumentSet:
        if self._closed:
            raise PersistenceError("mongodb storage is closed")
        if self._docs is None:
            raise PersistenceError("mongodb storage is not initialized: await initialize() first")
        return self._docs

    async def initialize(self) -> None:
        """Connects, learns whether the server has transactions, creates the indexes.

        Raises:
            StorageConnectionError: if the server cannot be reached within the timeout.
        """
        client = self.client
        with mongo_errors("initialize"):
            try:
                hello = await client.admin.command("hello")
            except OperationFailure as exc:
                # 4.4.0 and 4.4.1, which PyMongo still supports, only know the old name.
                if exc.code != _COMMAND_NOT_FOUND:
                    raise
                hello = await client.admin.command("isMaster")
            self.supports_transactions = has_transactions(hello)
            docs = bind_documents()
            # Beanie would also create the indexes of the shared parent classes: one
            # createIndexes per collection, sent here, does the same work once.
            await init_beanie(
                database=client[self.database_name],
                document_models=docs.models,
                skip_indexes=True,
            )
            for model in docs.models:
                indexes = [field.index for field in model.get_settings().indexes]
                await model.get_pymongo_collection().create_indexes(indexes)
        self._docs = docs

    async def close(self) -> None:
        client, self._client, self._closed = self._client, None, True
        self._docs = None
        if client is not None:
            with mongo_errors("close"):
                await client.close()

    async def drop_database(self) -> None:
        """Drops this storage's database (tests and tools only); works after close() too.

        Raises:
            StorageConnectionError: if the server cannot be reached.
        """
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
        return MongoUnitOfWork(
            self.client, self.docs, self._token, transactional=self.supports_transactions
        )

    async def save_session(self, session: ChatSession) -> bool:
        # A message appended while this save is in flight is not part of it.
        sent = len(session.messages)
        try:
            with mongo_errors("save session"):
                await repositories.write_session(self.docs, None, session, self._token)
        except BaseException:
            # It may have landed before the error: the next save checks the store.
            session.forget_stored(self._token)
            raise
        session.mark_stored(self._token, sent)
        return True

    async def load_session(self, session_id: str) -> ChatSession | None:
        with mongo_errors("load session"):
            session = await repositories.read_session(self.docs, None, session_id)
        if session is not None:
            session.mark_stored(self._token)
        return session

    async def load_sessions(self, session_ids: Sequence[str]) -> list[ChatSession]:
        with mongo_errors("load sessions"):
            loaded = await repositories.read_sessions(self.docs, None, session_ids)
        for session in loaded:
            session.mark_stored(self._token)
        return loaded

    async def list_sessions(
        self, status: str | None = None, limit: int = 100, offset: int = 0
    ) -> list[ChatSession]:
        checked = check_status(status)
        check_page(limit, offset)
        with mongo_errors("list sessions"):
            return await repositories.read_session_page(self.docs, None, checked, limit, offset)

    async def delete_session(self, session_id: str) -> bool:
        with mongo_errors("delete session"):
            return await repositories.delete_session_document(self.docs, None, session_id)

    async def save_file_record(self, file_record: UploadedFileRecord) -> bool:
        with mongo_errors("save file record"):
            await repositories.write_file_record(self.docs, None, file_record)
        return True

    async def load_file_record(self, file_id: str) -> UploadedFileRecord | None:
        with mongo_errors("load file record"):
            return await repositories.read_file_record(self.docs, None, file_id)

    async def list_file_records(self, limit: int = 100) -> list[UploadedFileRecord]:
        check_page(limit)
        with mongo_errors("list file records"):
            return await repositories.read_file_records_page(self.docs, None, limit)

    async def delete_expired_files(self) -> int:
        with mongo_errors("delete expired files"):
            return await repositories.delete_files_expired_by(self.docs, None, utc_now())

    async def search_messages(self, query: str, limit: int = 50) -> list[ChatMessage]:
        check_page(limit)
        with mongo_errors("search messages"):
            return await repositories.search_messages(self.docs, None, query, limit)

    async def iter_sessions(
        self, batch_size: int = 500, *, with_messages: bool = True
    ) -> AsyncIterator[list[ChatSession]]:
        if batch_size <= 0:
            raise InvalidDataError(f"batch_size: must be > 0, got {batch_size}")
        after: str | None = None
        while True:
            with mongo_errors("iterate sessions"):
                batch = await repositories.read_session_batch_after(
                    self.docs, None, after, batch_size, with_messages=with_messages
                )
            if not batch:
                return
            if with_messages:
                for session in batch:
                    session.mark_stored(self._token)
            yield batch
            after = batch[-1].session_id

    async def iter_file_records(
        self, batch_size: int = 500
    ) -> AsyncIterator[list[UploadedFileRecord]]:
        if batch_size <= 0:
            raise InvalidDataError(f"batch_size: must be > 0, got {batch_size}")
        after: str | None = None
        while True:
            with mongo_errors("iterate file records"):
                batch = await repositories.read_file_records_after(
                    self.docs, None, after, batch_size
                )
            if not batch:
                return
            yield batch
            after = batch[-1].file_id

    async def count(self) -> StorageCounts:
        with mongo_errors("count"):
            return await repositories.count_store(self.docs, None, utc_now())

    async def count_sessions(self) -> dict[str, int]:
        with mongo_errors("count sessions"):
            return await repositories.count_sessions_by_status(self.docs, None)

    async def expire_sessions(self, updated_before: datetime) -> int:
        with mongo_errors("expire sessions"):
            return await repositories.expire_sessions_before(self.docs, None, updated_before)

    async def set_status(self, session_ids: Sequence[str], status: Status) -> int:
        checked = check_status(status)
        assert checked is not None
        with mongo_errors("set session status"):
            return await repositories.set_sessions_status(self.docs, None, session_ids, checked)

    async def insert_sessions(self, sessions: Sequence[ChatSession]) -> bool:
        documents = bulk.documents_for_insert(sessions)
        if not documents:
            return True
        with mongo_errors("insert sessions"):
            return await bulk.insert_documents(
                self.client, self.docs, documents, transactional=self.supports_transactions
            )

    async def load_file_records(self, file_ids: Sequence[str]) -> list[UploadedFileRecord]:
        with mongo_errors("load file records"):
            return await repositories.read_file_records(self.docs, None, file_ids)

    async def copy_to_file(self, target: Path) -> bool:
        """MongoDB has no native single-file copy: the caller falls back to the export."""
        return False
