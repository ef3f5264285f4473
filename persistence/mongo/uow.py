"""The MongoDB unit of work: one AsyncClientSession, a transaction where the server has them."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

from pymongo import AsyncMongoClient, ReadPreference
from pymongo.asynchronous.client_session import AsyncClientSession

from persistence.changes import SavePlan
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
from persistence.storage import UnitOfWork, check_file_record
from persistence.validation import check_instance, lookup_id

logger = logging.getLogger(__name__)

_Write = Callable[[AsyncClientSession], Awaitable[Any]]


@dataclass(slots=True)
class _Held:
    """A write held back until commit: a session's save, or another command."""

    action: str
    session_id: str | None = None
    session: ChatSession | None = None
    plan: SavePlan | None = None
    write: _Write | None = None


class _MongoSessions:
    def __init__(self, uow: MongoUnitOfWork) -> None:
        self._uow = uow

    async def get(self, session_id: str) -> ChatSession | None:
        if not lookup_id(session_id, "session_id"):
            return None
        uow = self._uow
        client_session = uow.client_session()
        if session_id in uow.deleted_sessions:
            return None
        pending = uow.added_sessions.get(session_id)
        if pending is not None:
            # The object held for saving itself: changed and added again, it holds its
            # newer plan.
            return pending
        with mongo_errors("load session"):
            return await repositories.read_session(
                uow.docs, client_session, session_id, token=uow.token
            )

    async def add(self, session: ChatSession) -> None:
        check_instance(session, ChatSession, "session")
        uow = self._uow
        uow.client_session()
        # Bad input is refused here, although the write itself waits for commit().
        uow.hold_save(session, session.plan_save(uow.token))

    async def delete(self, session_id: str) -> bool:
        if not lookup_id(session_id, "session_id"):
            return False
        uow = self._uow
        docs = uow.docs
        client_session = uow.client_session()
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
        if not lookup_id(file_id, "file_id"):
            return None
        uow = self._uow
        client_session = uow.client_session()
        if file_id in uow.deleted_files:
            return None
        if file_id in uow.added_files:
            return uow.added_files[file_id]
        with mongo_errors("load file record"):
            return await repositories.read_file_record(uow.docs, client_session, file_id)

    async def add(self, record: UploadedFileRecord) -> None:
        check_file_record(record, "record")
        uow = self._uow
        uow.client_session()  # refuses a unit that ended, committed or failed, as add does
        docs = uow.docs

        async def write(client_session: AsyncClientSession) -> None:
            await repositories.write_file_record(docs, client_session, record)

        uow.hold(_Held("save file record", write=write))
        uow.deleted_files.discard(record.file_id)
        uow.added_files[record.file_id] = record

    async def delete(self, file_id: str) -> bool:
        if not lookup_id(file_id, "file_id"):
            return False
        uow = self._uow
        docs = uow.docs
        client_session = uow.client_session()
        if file_id in uow.deleted_files:
            return False
        existed = uow.added_files.pop(file_id, None) is not None
        if not existed:
            with mongo_errors("delete file record"):
                existed = await repositories.file_exists(docs, client_session, file_id)

        async def write(client_session: AsyncClientSession) -> bool:
            return await repositories.delete_file_document(docs, client_session, file_id)

        uow.hold(_Held("delete file record", write=write))
        uow.deleted_files.add(file_id)
        return existed


class MongoUnitOfWork(UnitOfWork):
    """Changes through `sessions` and `files`, committed together where the server can.

    One `AsyncClientSession` carries every Beanie call of the unit of work. Writes are
    held back until `commit()`: leaving the block without it sends nothing, and reads
    inside the unit of work see its own pending writes (`sessions.get` returns the
    very object held for saving; adding it again after more changes holds its newer
    plan). A save's bad input is refused by `add`; everything that depends on the
    store is checked by `commit()`, which first reads (one round trip per chunk of
    sessions) what every held save needs and checks all of them (conflicts, deleted
    sessions, message ids stored in other sessions or added twice, the 16 MiB limit)
    before it sends any write, then sends the writes in order, each guarded by the
    revision it checked. Objects count as saved once the commit succeeded.

    On a replica set or a sharded cluster, all of it runs in one multi-document
    transaction: committed together or not at all, invisible to other readers until
    `commit()` returns, and a conflicting concurrent writer makes it fail (retry the
    whole unit of work) rather than interleave. A `commit()` that raises (a save
    refused when sent, after others were) aborts the transaction, and the unit can
    then only be rolled back: every later call raises PersistenceError, as on SQL.

    A standalone server has no transactions. There a refusal found by the checks
    raises with nothing written, so a unit of work (a migration batch) that holds one
    refused session writes none of its sessions. What is not guaranteed: a concurrent
    writer that changes a session between the checks and its write makes that write
    check and try again on its own, and a refusal then (or a connection lost half way)
    leaves the writes sent before it; the same holds for a second object of one
    session held in the same unit of work, which is checked against the first only
    when sent. Each write is atomic on its own document, and nothing isolates the
    unit of work from other writers or readers while its writes are sent.
    """

    def __init__(
        self,
        client: AsyncMongoClient[Any],
        docs: DocumentSet,
        token: str,
        *,
        transactional: bool,
        refuse_closed: Callable[[], None] | None = None,
    ) -> None:
        self.docs = docs
        self.token = token
        self.transactional = transactional
        self._client = client
        # Raises once the storage is closed (as on SQL, found by review: a unit entered
        # before close() took its sessions, and only its first read said so, as a
        # failed load).
        self._refuse_closed = refuse_closed
        self._session: AsyncClientSession | None = None
        self._held: list[_Held] = []
        # Saves sent inside the transaction: confirmed to their objects once it commits.
        self._sent: list[tuple[ChatSession, SavePlan, Saved]] = []
        self._committed = False
        # What the commit that failed was doing: the unit can then only be rolled back.
        self._failed: str | None = None
        # Its `async with` block has been left (its client session ended): found by
        # attack on SQL, a call through the unit after that still ran.
        self._ended = False
        # What this unit of work wrote but has not sent yet.
        self.added_sessions: dict[str, ChatSession] = {}
        self.deleted_sessions: set[str] = set()
        self.added_files: dict[str, UploadedFileRecord] = {}
        self.deleted_files: set[str] = set()
        self.sessions = _MongoSessions(self)
        self.files = _MongoFiles(self)

    def client_session(self) -> AsyncClientSession:
        if self._refuse_closed is not None:
            self._refuse_closed()
        if self._committed:
            raise PersistenceError("unit of work already committed: start a new one")
        if self._ended:
            raise PersistenceError(
                "unit of work ended with its `async with` block (rolled back unless"
                " committed): start a new one"
            )
        if self._session is None:
            raise PersistenceError("unit of work not entered: use `async with`")
        if self._failed is not None:
            raise PersistenceError(
                f"unit of work failed at {self._failed!r}: roll it back (leave its block)"
                " and start a new one"
            )
        return self._session

    def hold(self, held: _Held) -> None:
        self.client_session()
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

    async def commit(self) -> None:
        client_session = self.client_session()
        held, self._held = self._held, []
        try:
            await self._send(client_session, held)
        except BaseException:
            # Writes sent before the error are in the transaction: aborted, none lands
            # (a caller that caught the error cannot commit the rest).
            self._failed = "commit"
            await self._discard_keeping_the_error()
            raise
        if self.transactional:
            try:
                with mongo_errors("commit"):
                    await client_session.commit_transaction()
            except BaseException:
                # The commit may have landed before the error: later saves must check.
                for session, plan, _saved in self._sent:
                    session.save_failed(self.token, plan)
                self._sent.clear()
                # Found by review: PyMongo ends the transaction even when its commit
                # fails, so a unit used on would write outside any transaction.
                self._failed = "commit"
                raise
            for session, plan, saved in self._sent:
                session.saved_to(
                    self.token, plan, saved.revision, saved.incarnation, exact=saved.exact
                )
            self._sent.clear()
        self._committed = True

    async def _send(self, client_session: AsyncClientSession, held: list[_Held]) -> None:
        """Checks every held save, then sends the held writes in order."""
        deleted: set[str] = set()
        saves: list[tuple[_Held, SavePlan]] = []
        after_delete: set[int] = set()
        for item in held:
            if item.plan is None:
                if item.session_id is not None:
                    deleted.add(item.session_id)
                continue
            saves.append((item, item.plan))
            if item.session_id in deleted:
                # Checked as a save of a session not stored: found by review, it was checked
                # only when sent, so on a standalone server its refusal came after the writes
                # before it.
                after_delete.add(id(item.plan))
        with mongo_errors("commit"):
            prepared = await writes.prepare_all(
                self.docs, client_session, [plan for _, plan in saves], after_delete=after_delete
            )
        ready = {id(item): write for (item, _), write in zip(saves, prepared, strict=True)}
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
            if not self.transactional:
                # It may have landed; in a transaction nothing lands without the commit.
                session.save_failed(self.token, plan)
            raise
        if self.transactional:
            self._sent.append((session, plan, saved))
        else:
            session.saved_to(self.token, plan, saved.revision, saved.incarnation, exact=saved.exact)

    async def rollback(self) -> None:
        if self._committed or self._ended:
            self.client_session()  # raises, naming which
        await self._discard_keeping_the_error()
        if (
            self.transactional
            and self._session is not None
            and not self._committed
            and self._failed is None
        ):
            # As on SQL, work after a rollback runs in a new transaction, not unguarded.
            with mongo_errors("rollback"):
                await self._session.start_transaction(read_preference=ReadPreference.PRIMARY)

    async def _discard_keeping_the_error(self) -> None:
        """_discard after a failure, or asked for: its own failure is logged, and the
        failure that led to it reaches the caller (found by review: a commit on a closed
        client raised "rollback failed", its own error only the context). A transaction
        not aborted never commits: it ends with its session, or the server's timeout."""
        try:
            await self._discard()
        except PersistenceError as exc:
            logger.warning("unit of work: its rollback failed: %s", exc)

    async def _discard(self) -> None:
        # Nothing held was confirmed to its object: later saves send it again.
        self._held.clear()
        self._sent.clear()
        self.added_sessions.clear()
        self.deleted_sessions.clear()
        self.added_files.clear()
        self.deleted_files.clear()
        if self._session is not None and self._session.in_transaction:
            with mongo_errors("rollback"):
                await self._session.abort_transaction()

    async def __aenter__(self) -> Self:
        if self._refuse_closed is not None:
            self._refuse_closed()
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
        if self._ended:
            return  # left twice: the first exit ended it
        try:
            if not self._committed:
                if exc is None:
                    await self._discard()
                else:
                    # The error that ended the block is the one to tell (found by review:
                    # "rollback failed" on a closed client hid "storage is closed").
                    await self._discard_keeping_the_error()
        finally:
            self._ended = True
            if self._session is not None:
                try:
                    with mongo_errors("close unit of work"):
                        await self._session.end_session()
                except PersistenceError:
                    if exc is None:
                        raise
                    logger.warning("unit of work: ending its session failed", exc_info=True)
