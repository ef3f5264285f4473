"""The MongoDB unit of work: one AsyncClientSession, a transaction where the server has them."""

from __future__ import annotations

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


def _snapshot(session: ChatSession) -> ChatSession:
    """The session as it is now: appending to the caller's object later changes nothing."""
    return session.model_copy(update={"messages": list(session.messages)})


class _MongoSessions:
    def __init__(self, uow: MongoUnitOfWork) -> None:
        self._uow = uow

    async def get(self, session_id: str) -> ChatSession | None:
        with mongo_errors("load session"):
            session = await repositories.read_session(
                self._uow.docs, self._uow.client_session(), session_id
            )
        if session is not None:
            session.mark_stored(self._uow.token)
        return session

    async def add(self, session: ChatSession) -> None:
        snapshot = _snapshot(session)
        token = self._uow.token
        # Bad input is refused here, even where the write itself waits for commit().
        repositories.check_session(snapshot, token)

        async def write(client_session: AsyncClientSession) -> None:
            await repositories.write_session(self._uow.docs, client_session, snapshot, token)

        await self._uow.write("save session", write)
        self._uow.stored_on_commit(session, len(snapshot.messages))

    async def delete(self, session_id: str) -> bool:
        docs = self._uow.docs

        async def write(client_session: AsyncClientSession) -> bool:
            return await repositories.delete_session_document(docs, client_session, session_id)

        if self._uow.transactional:
            return bool(await self._uow.write("delete session", write))
        with mongo_errors("delete session"):
            existed = await repositories.session_exists(
                docs, self._uow.client_session(), session_id
            )
        await self._uow.write("delete session", write)
        return existed


class _MongoFiles:
    def __init__(self, uow: MongoUnitOfWork) -> None:
        self._uow = uow

    async def get(self, file_id: str) -> UploadedFileRecord | None:
        with mongo_errors("load file record"):
            return await repositories.read_file_record(
                self._uow.docs, self._uow.client_session(), file_id
            )

    async def add(self, record: UploadedFileRecord) -> None:
        docs = self._uow.docs

        async def write(client_session: AsyncClientSession) -> None:
            await repositories.write_file_record(docs, client_session, record)

        await self._uow.write("save file record", write)

    async def delete(self, file_id: str) -> bool:
        docs = self._uow.docs

        async def write(client_session: AsyncClientSession) -> bool:
            return await repositories.delete_file_document(docs, client_session, file_id)

        if self._uow.transactional:
            return bool(await self._uow.write("delete file record", write))
        with mongo_errors("delete file record"):
            existed = await repositories.file_exists(docs, self._uow.client_session(), file_id)
        await self._uow.write("delete file record", write)
        return existed


class MongoUnitOfWork(UnitOfWork):
    """Changes through `sessions` and `files`, committed together where the server can.

    One `AsyncClientSession` carries every Beanie call of the unit of work.

    On a replica set or a sharded cluster, everything runs in one multi-document
    transaction: committed together or not at all, invisible to other readers until
    `commit()`, and a conflicting concurrent writer makes it fail (retry the whole
    unit of work) rather than interleave.

    A standalone server has no transactions. There the writes are held back and sent,
    in order, by `commit()`; leaving the block without `commit()` sends nothing. What
    is guaranteed: each write is atomic on its own document (a session save appends
    its messages and bumps the count in one update), and nothing is written without
    `commit()`. What is not: all-or-nothing across writes (if `commit()` fails half
    way, the writes before the failure stay), and isolation (reads inside the unit
    of work see the store, not this unit's pending writes).
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
        self._pending: dict[int, tuple[ChatSession, int]] = {}
        self._committed = False
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

    def stored_on_commit(self, session: ChatSession, stored: int) -> None:
        self._pending[id(session)] = (session, stored)

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
        # Only now does the store hold these messages: later saves may skip them. A
        # session appended to after `add` is left uncertain, so its next save checks.
        for session, stored in self._pending.values():
            if len(session.messages) == stored:
                session.mark_stored(self.token)
        self._pending.clear()

    async def rollback(self) -> None:
        self._pending.clear()
        self._deferred.clear()
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
                await self.rollback()
        finally:
            if self._session is not None:
                with mongo_errors("close unit of work"):
                    await self._session.end_session()
