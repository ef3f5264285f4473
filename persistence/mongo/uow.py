"""The MongoDB unit of work: one AsyncClientSession, a transaction where the server has them."""

from __future__ import annotations

import copy
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, Self

from pymongo import AsyncMongoClient, ReadPreference
from pymongo.asynchronous.client_session import AsyncClientSession

from persistence.errors import PersistenceError
from persistence.models import ChatSession, UploadedFileRecord
from persistence.mongo import repositories
from persistence.mongo.documents import DocumentSet
from persistence.mongo.errors import mongo_errors
from persistence.storage import UnitOfWork

_Write = Callable[[AsyncClientSession], Awaitable[Any]]
_Marker = tuple[int, str | None] | None


def _snapshot(session: ChatSession) -> ChatSession:
    """The session as it is now, with a record of its own of what is stored where."""
    fields = {name: getattr(session, name) for name in ChatSession.model_fields}
    fields["messages"] = list(session.messages)
    fields["metadata"] = copy.deepcopy(session.metadata)
    return ChatSession.model_construct(**fields)


class _MongoSessions:
    def __init__(self, uow: MongoUnitOfWork) -> None:
        self._uow = uow

    async def get(self, session_id: str) -> ChatSession | None:
        uow = self._uow
        if session_id in uow.deleted_sessions:
            return None
        pending = uow.added_sessions.get(session_id)
        if pending is not None:
            # Held back until commit: this unit of work sees its own write.
            session = _snapshot(pending)
            uow.stored_until_rollback(session)
            return session
        with mongo_errors("load session"):
            loaded = await repositories.read_session(uow.docs, uow.client_session(), session_id)
        if loaded is not None:
            loaded.mark_stored(uow.token)
        return loaded

    async def add(self, session: ChatSession) -> None:
        uow = self._uow
        new, certain = session.unstored_messages(uow.token)
        # Bad input is refused here, even where the write itself waits for commit().
        repositories.check_messages(session, new)
        snapshot = _snapshot(session)
        docs = uow.docs

        async def write(client_session: AsyncClientSession) -> None:
            await repositories.write_messages(docs, client_session, snapshot, new, certain)

        await uow.write("save session", write)
        # Only what the snapshot held: a message appended meanwhile is the next save's.
        uow.stored_until_rollback(session, len(snapshot.messages))
        if not uow.transactional:
            uow.deleted_sessions.discard(session.session_id)
            uow.added_sessions[session.session_id] = snapshot

    async def delete(self, session_id: str) -> bool:
        uow = self._uow
        docs = uow.docs

        async def write(client_session: AsyncClientSession) -> bool:
            return await repositories.delete_session_document(docs, client_session, session_id)

        if uow.transactional:
            return bool(await uow.write("delete session", write))
        if session_id in uow.deleted_sessions:
            return False
        existed = uow.added_sessions.pop(session_id, None) is not None
        if not existed:
            with mongo_errors("delete session"):
                existed = await repositories.session_exists(docs, uow.client_session(), session_id)
        await uow.write("delete session", write)
        uow.deleted_sessions.add(session_id)
        return existed


class _MongoFiles:
    def __init__(self, uow: MongoUnitOfWork) -> None:
        self._uow = uow

    async def get(self, file_id: str) -> UploadedFileRecord | None:
        uow = self._uow
        if file_id in uow.deleted_files:
            return None
        if file_id in uow.added_files:
            return uow.added_files[file_id]
        with mongo_errors("load file record"):
            return await repositories.read_file_record(uow.docs, uow.client_session(), file_id)

    async def add(self, record: UploadedFileRecord) -> None:
        uow = self._uow
        docs = uow.docs

        async def write(client_session: AsyncClientSession) -> None:
            await repositories.write_file_record(docs, client_session, record)

        await uow.write("save file record", write)
        if not uow.transactional:
            uow.deleted_files.discard(record.file_id)
            uow.added_files[record.file_id] = record

    async def delete(self, file_id: str) -> bool:
        uow = self._uow
        docs = uow.docs

        async def write(client_session: AsyncClientSession) -> bool:
            return await repositories.delete_file_document(docs, client_session, file_id)

        if uow.transactional:
            return bool(await uow.write("delete file record", write))
        if file_id in uow.deleted_files:
            return False
        existed = uow.added_files.pop(file_id, None) is not None
        if not existed:
            with mongo_errors("delete file record"):
                existed = await repositories.file_exists(docs, uow.client_session(), file_id)
        await uow.write("delete file record", write)
        uow.deleted_files.add(file_id)
        return existed


class MongoUnitOfWork(UnitOfWork):
    """Changes through `sessions` and `files`, committed together where the server can.

    One `AsyncClientSession` carries every Beanie call of the unit of work.

    On a replica set or a sharded cluster, everything runs in one multi-document
    transaction: committed together or not at all, invisible to other readers until
    `commit()`, and a conflicting concurrent writer makes it fail (retry the whole
    unit of work) rather than interleave.

    A standalone server has no transactions. There the writes are held back and sent,
    in order, by `commit()`; leaving the block without `commit()` sends nothing, and
    reads inside the unit of work see its own pending writes. What is guaranteed:
    nothing is written without `commit()`, and each write is atomic on its own
    document (a session save appends its messages and bumps the count in one update).
    What is not: all-or-nothing across writes (if `commit()` fails half way, the
    writes before the failure stay), and isolation from other writers between the
    reads of the unit of work and its commit.
    """

    def __init__(
        self, client: AsyncMongoClient[Any], docs: DocumentSet, token: str, *, transactional: bool
    ) -> None:
        self.docs = docs
        self.token = token
        self.transactional = transactional
        self._client = client
        self._session: AsyncClientSession | None = None
        self._deferred: list[tuple[str, _Write]] = []
        self._undo: dict[int, tuple[ChatSession, _Marker]] = {}
        self._committed = False
        # Without a transaction: what this unit of work wrote but has not sent yet.
        self.added_sessions: dict[str, ChatSession] = {}
        self.deleted_sessions: set[str] = set()
        self.added_files: dict[str, UploadedFileRecord] = {}
        self.deleted_files: set[str] = set()
        self.sessions = _MongoSessions(self)
        self.files = _MongoFiles(self)

    def client_session(self) -> AsyncClientSession:
        if self._committed:
            raise PersistenceError("unit of work already committed: start a new one")
        if self._session is None:
            raise PersistenceError("unit of work not entered: use `async with`")
        return self._session

    async def write(self, action: str, write: _Write) -> Any:
        """Runs `write` now inside the transaction, or holds it back until commit."""
        client_session = self.client_session()
        if not self.transactional:
            self._deferred.append((action, write))
            return None
        with mongo_errors(action):
            return await write(client_session)

    def stored_until_rollback(self, session: ChatSession, count: int | None = None) -> None:
        """Marks the first `count` messages (default all) stored; a rollback undoes it."""
        if id(session) not in self._undo:
            self._undo[id(session)] = (session, session.stored_marker(self.token))
        session.mark_stored(self.token, count)

    async def commit(self) -> None:
        client_session = self.client_session()
        if self.transactional:
            with mongo_errors("commit"):
                await client_session.commit_transaction()
        else:
            deferred, self._deferred = self._deferred, []
            for action, write in deferred:
                with mongo_errors(action):
                    await write(client_session)
        self._committed = True
        self._undo.clear()

    async def rollback(self) -> None:
        await self._discard()
        if self.transactional and self._session is not None and not self._committed:
            # As on SQL, work after a rollback runs in a new transaction, not unguarded.
            with mongo_errors("rollback"):
                await self._session.start_transaction(read_preference=ReadPreference.PRIMARY)

    async def _discard(self) -> None:
        # The store holds none of this unit's messages: later saves must send them again.
        for session, marker in self._undo.values():
            session.restore_stored_marker(self.token, marker)
        self._undo.clear()
        self._deferred.clear()
        self.added_sessions.clear()
        self.deleted_sessions.clear()
        self.added_files.clear()
        self.deleted_files.clear()
        if self._session is not None and self._session.in_transaction:
            with mongo_errors("rollback"):
                await self._session.abort_transaction()

    async def __aenter__(self) -> Self:
        with mongo_errors("begin unit of work"):
            self._session = self._client.start_session()
            if self.transactional:
                # A transaction reads from the primary, whatever the client's preference.
                await self._session.start_transaction(read_preference=ReadPreference.PRIMARY)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if not self._committed:
                await self._discard()
        finally:
            if self._session is not None:
                with mongo_errors("close unit of work"):
                    await self._session.end_session()
