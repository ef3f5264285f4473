"""Inserting sessions a store does not hold yet: one `insert_many` per batch.

The fast path of migrations and imports: each new session is one whole document
(its history embedded), and a batch of them is one ordered `insert_many`, inside a
transaction where the server has them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import bson
from pymongo import AsyncMongoClient, ReadPreference
from pymongo.errors import BulkWriteError

from persistence.errors import InvalidDataError
from persistence.models import ChatSession
from persistence.mongo.documents import DocumentSet
from persistence.mongo.errors import MAX_DOCUMENT_BYTES
from persistence.mongo.mapping import document_from_session
from persistence.mongo.sequence import next_seq

if TYPE_CHECKING:
    from persistence.mongo.reads import CausalClock

_DUPLICATE_KEY = 11000


def documents_for_insert(sessions: Sequence[ChatSession]) -> list[dict[str, Any]]:
    """The documents of new sessions, checked before anything is sent.

    Each message gets the `seq` a save gives it (search orders messages by it).

    Raises:
        InvalidDataError: if a message names another session, an id repeats in the
            batch, a session was loaded with `last=`, or a session crosses MongoDB's
            16 MiB document limit.
    """
    session_ids: set[str] = set()
    message_ids: set[str] = set()
    documents = []
    for session in sessions:
        if session.session_id in session_ids:
            raise InvalidDataError(f"session_id {session.session_id!r} appears twice")
        session_ids.add(session.session_id)
        session.refuse_shortened("bulk insert")
        for message in session.messages:
            if message.session_id != session.session_id:
                raise InvalidDataError(
                    f"message {message.message_id!r} has session_id {message.session_id!r},"
                    f" not {session.session_id!r}"
                )
            if message.message_id in message_ids:
                raise InvalidDataError(f"message_id {message.message_id!r} appears twice")
            message_ids.add(message.message_id)
        document = document_from_session(session)
        for embedded in document["messages"]:
            embedded["seq"] = next_seq()
        size = len(bson.encode(document))
        if size > MAX_DOCUMENT_BYTES:
            raise InvalidDataError(
                f"session {session.session_id!r}: {size} bytes of BSON exceed MongoDB's"
                f" 16 MiB document limit ({MAX_DOCUMENT_BYTES} bytes); nothing was written"
            )
        documents.append(document)
    return documents


def duplicate_only(exc: BulkWriteError) -> bool:
    """Whether every write error of an `insert_many` is a duplicate key."""
    errors = exc.details.get("writeErrors", [])
    return bool(errors) and all(error.get("code") == _DUPLICATE_KEY for error in errors)


async def insert_documents(
    client: AsyncMongoClient[dict[str, Any]],
    docs: DocumentSet,
    documents: list[dict[str, Any]],
    *,
    transactional: bool,
    clock: CausalClock | None = None,
) -> bool:
    """Inserts the documents all or nothing; False if one of their ids is already stored.

    In a transaction where the server has them. On a standalone server the insert is
    ordered, so it stops at the first duplicate, and the documents it did insert
    before it are deleted again, each only while no other writer has written to it
    (`undo_filter`): nothing else of the batch stays, though another reader may have
    seen them meanwhile, and a session another writer saved to meanwhile is its
    (an acknowledged write is never deleted). A connection lost during the insert
    leaves what it inserted. `clock` (the storage's, where reads are routed) observes
    the insert, so that the storage's routed reads come after it (found by review: a
    list or a search right after an import or a migrate could miss it).
    """
    collection = docs.sessions.get_pymongo_collection()
    client_session = client.start_session() if clock is None else clock.session(client)
    try:
        if transactional:
            await client_session.start_transaction(read_preference=ReadPreference.PRIMARY)
        try:
            await collection.insert_many(documents, ordered=True, session=client_session)
        except BulkWriteError as exc:
            if client_session.in_transaction:
                await client_session.abort_transaction()
            elif exc.details.get("nInserted"):
                inserted = documents[: exc.details["nInserted"]]
                await collection.delete_many(undo_filter(inserted), session=client_session)
            if duplicate_only(exc):
                return False
            raise
        if client_session.in_transaction:
            await client_session.commit_transaction()
        return True
    finally:
        if client_session.in_transaction:
            await client_session.abort_transaction()
        if clock is not None:
            clock.observe(client_session)
        await client_session.end_session()


def undo_filter(inserted: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The documents of `inserted` that are still as inserted: at their first revision,
    of the incarnation inserted (a write by another client moves the revision; a delete
    and a new session of the same id draws another incarnation)."""
    return {
        "$or": [
            {"_id": document["_id"], "revision": 1, "incarnation": document["incarnation"]}
            for document in inserted
        ]
    }
