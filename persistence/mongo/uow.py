"""The MongoDB unit of work: one AsyncClientSession, a transaction where the server has them."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

from pymongo import AsyncMongoClient, ReadPreference
from pymongo.asynchronous.client_session import AsyncClientSession

from persistence.changes import Base, SavePlan
from persistence.errors import (
    InvalidDataError,
    PersistenceError,
    SessionConflictError,
    SessionDeletedError,
)
from persistence.models import ChatSession, UploadedFileRecord
from persistence.mongo import repositories, writes
from persistence.mongo.documents import DocumentSet
from persistence.mongo.errors import mongo_errors
from persistence.mongo.updates import Saved, Write
from persistence.storage import UnitOfWork

_Write = Callable[[AsyncClientSession], Awaitable[Any]]


@dataclass(slots=True)
class _Held:
    """A write held back until commit (no transactions): a save, or another command."""

    action: str
    session_id: str | None = None
    session: ChatSession | None = None
    plan: SavePlan | None = None
    write: _Write | None = None


class _MongoSessions:
    def __init__(self, uow: MongoUnitOfWork) -> None:
        self._uow = uow

    async def get(self, session_id: str) -> ChatSession | None:
        uow = self._uow
        client_session = uow.client_session()
        if not uow.transactional:
            if session_id in uow.deleted_sessions:
                return None
            pending = uow.added_sessions.get(session_id)
            if pending is not None:
                # Held back until commit: the object itself, so adding it again after
                # more changes holds its newer plan.
                return pending
        with mongo_errors("load session"):
            return await repositories.read_session(
                uow.docs, client_session, session_id, token=uow.token
            )

    async def add(self, session: ChatSession) -> None:
        uow = self._uow
        client_session = uow.client_session()
        # Bad input is refused here, even where the write itself waits for commit().
        plan = session.plan_save(uow.token)
        if not uow.transactional:
            uow.hold_save(session, plan)
            return
        with mongo_errors("save session"):
            saved = await writes.write_plan(uow.docs, client_session, plan)
        uow.saved_until_rollback(session, plan, saved)

    async def delete(self, session_id: str) -> bool:
        uow = self._uow
        docs = uow.docs
        client_session = uow.client_session()
        if uow.transactional:
            with mongo_errors("delete session"):
                return await repositories.delete_session_document(docs, client_session, session_id)
        if session_id in uow.deleted_sessions:
            return False
        existed = uow.added_sessions.pop(session_id, None) is not None
        if not existed:
            with mongo_errors("delete session"):
                existed = await repositories.session_exists(docs, client_session, session_id)

        async def write(client_session: AsyncClientSession) -> bool:
            return await repositories.delete_session_document(docs, client_session, session_id)

        uow.hold(_Held("delete session", session_id=session_id, write=write))
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
    unit of work) rather than interleave. Each save is checked (revision, conflicts,
    message ids) before it is written, so a refusal never aborts the transaction
    behind the caller's back: roll back, or leave out what was refused.

    A standalone server has no transactions. There the writes are held back, and
    reads inside the unit of work see its own pending writes (`sessions.get` returns
    the very object held for saving). What `commit()` guarantees:

    - Before sending anything, it reads (one round trip per chunk of sessions) what
      every held save needs and checks all of them: conflicts, deleted sessions,
      message ids stored in other sessions or added twice, the 16 MiB limit. Any
      refusal found there raises with nothing written, so a unit of work (a migration
      batch) that holds one refused session writes none of its sessions.
    - Then it sends the writes in order, each atomic on its own document and guarded
      by the revision it checked.

    What it does not guarantee: a concurrent writer that changes a session between
    that check and its write makes that write check and try again on its own, and a
    refusal then (or a connection lost half way) leaves the writes sent before it;
    the same holds for a second object of one session held in the same unit of
    work, which is checked against the first only when sent. Nothing isolates the
    unit of work from other writers or readers while its writes are sent.
    """

    def __init__(
        self, client: AsyncMongoClient[Any], docs: DocumentSet, token: str, *, transactional: bool
    ) -> None:
        self.docs = docs
        self.token = token
        self.transactional = transactional
        self._client = client
        self._session: AsyncClientSession | None = None
        self._held: list[_Held] = []
        self._undo: dict[int, tuple[ChatSession, Base | None]] = {}
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
            self.hold(_Held(action, write=write))
            return None
        with mongo_errors(action):
            return await write(client_session)

    def hold(self, held: _Held) -> None:
        self._held.append(held)

    def hold_save(self, session: ChatSession, plan: SavePlan) -> None:
        """Holds a save until commit; a newer plan of the same object replaces its older one.

        Until commit the object's base does not move, so its newer plan holds every
        change of the older one.
        """
        self._held = [held for held in self._held if held.session is not session]
        self._held.append(_Held("save session", session.session_id, session, plan))
        self.deleted_sessions.discard(session.session_id)
        self.added_sessions[session.session_id] = session

    def saved_until_rollback(self, session: ChatSession, plan: SavePlan, saved: Saved) -> None:
        """Takes the save as stored now; a rollback gives the object back its old base."""
        if id(session) not in self._undo:
            self._undo[id(session)] = (session, session.base_for(self.token))
        session.saved_to(
            self.token,
            plan,
            saved.revision,
            saved.incarnation,
            exact=saved.exact,
            keep_log=True,
        )

    async def commit(self) -> None:
        client_session = self.client_session()
        if self.transactional:
            try:
                with mongo_errors("commit"):
                    await client_session.commit_transaction()
            except BaseException:
                # The commit may have landed before the error: later saves must check.
                for session, _base in self._undo.values():
                    session.save_failed(self.token)
                self._undo.clear()
                raise
        else:
            held, self._held = self._held, []
            await self._send(client_session, held)
        self._committed = True
        self._undo.clear()

    async def _send(self, client_session: AsyncClientSession, held: list[_Held]) -> None:
        """Checks every held save, then sends the held writes in order (no transaction)."""
        deleted: set[str] = set()
        checked: list[_Held] = []
        for item in held:
            if item.plan is None:
                if item.session_id is not None:
                    deleted.add(item.session_id)
            elif item.session_id not in deleted:
                # A save after a delete of its session in this unit is checked when sent.
                checked.append(item)
        with mongo_errors("commit"):
            prepared = await writes.prepare_all(
                self.docs, client_session, [item.plan for item in checked if item.plan is not None]
            )
        ready: dict[int, Write] = {
            id(item): write for item, write in zip(checked, prepared, strict=True)
        }
        for item in held:
            if item.plan is not None and item.session is not None:
                await self._send_save(client_session, item.session, item.plan, ready.get(id(item)))
            elif item.write is not None:
                with mongo_errors(item.action):
                    await item.write(client_session)

    async def _send_save(
        self,
        client_session: AsyncClientSession,
        session: ChatSession,
        plan: SavePlan,
        write: Write | None,
    ) -> None:
        try:
            with mongo_errors("save session"):
                saved = await writes.send_prepared(self.docs, client_session, plan, write)
        except (InvalidDataError, SessionConflictError, SessionDeletedError):
            raise  # refused before this save wrote anything
        except BaseException:
            session.save_failed(self.token)
            raise
        session.saved_to(self.token, plan, saved.revision, saved.incarnation, exact=saved.exact)

    async def rollback(self) -> None:
        await self._discard()
        if self.transactional and self._session is not None and not self._committed:
            # As on SQL, work after a rollback runs in a new transaction, not unguarded.
            with mongo_errors("rollback"):
                await self._session.start_transaction(read_preference=ReadPreference.PRIMARY)

    async def _discard(self) -> None:
        # The store holds none of this unit's changes: later saves must send them again.
        for session, base in self._undo.values():
            session.restore_base(self.token, base)
        self._undo.clear()
        self._held.clear()
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
