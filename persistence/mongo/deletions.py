"""A record of deleted sessions, so that a save of unknown outcome never brings one back.

As on SQL (revision 0010): a new session's first save can fail with its outcome
unknown; if it landed and another writer deleted the session, the next save found no
document and created it again. Every delete now records the deleted document's
incarnation in `chat_session_deletions`, keyed by it (incarnations are uuid4 hex,
drawn for each creation, so they never repeat), just before the delete, in the same
transaction inside a unit of work where the deployment has them
(persistence.mongo.repositories.delete_session_document). A record left by a delete
that then failed names a session still stored, which a retried creation looks at
first. A save that retries a creation (`SavePlan.certain` False on a new plan) looks
at the record once it has not found its session. `initialize()` creates the
collection and its index, so that transactions never have to.

A new object whose id is taken merges into the stored session: its incarnation is
recorded as merged into the stored one before the merge is sent, and the delete of
that session records it deleted too (found by attack on SQL: such a creation of
unknown outcome was created again after the delete).

Without transactions (a standalone server) nothing orders a delete against a retry
running at the same moment: a delete between the retry's look and its insert is not
seen. The documents of the first version, without an incarnation, are deleted
unrecorded: no creation retried today can have made them.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from datetime import datetime
from typing import Any

from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import CollectionInvalid, OperationFailure

from persistence.changes import SavePlan
from persistence.clock import utc_now
from persistence.errors import SessionDeletedError
from persistence.mongo.documents import DocumentSet
from persistence.mongo.updates import Write

DELETIONS_COLLECTION = "chat_session_deletions"
# The server's error code for a collection that exists already.
_NAMESPACE_EXISTS = 48


def deletions(docs: DocumentSet) -> AsyncCollection[dict[str, Any]]:
    return docs.sessions.get_pymongo_collection().database[DELETIONS_COLLECTION]


async def record_deletion(
    docs: DocumentSet,
    client_session: AsyncClientSession | None,
    session_id: str,
    incarnation: str,
) -> None:
    """Records that this incarnation of the session, and the creations merged into it,
    are being deleted."""
    now = utc_now()
    records = deletions(docs)
    await records.update_one(
        {"_id": incarnation},
        {"$setOnInsert": {"session_id": session_id, "deleted_at": now}},
        upsert=True,
        session=client_session,
    )
    await records.update_many(
        {"session_id": session_id, "merged_into": incarnation, "deleted_at": {"$exists": False}},
        {"$set": {"deleted_at": now}},
        session=client_session,
    )


async def forget_deletions_before(
    docs: DocumentSet, client_session: AsyncClientSession | None, cutoff: datetime
) -> int:
    """Removes the records of deletions before `cutoff` (merges of live sessions stay)."""
    result = await deletions(docs).delete_many(
        {"deleted_at": {"$lt": cutoff}}, session=client_session
    )
    return int(result.deleted_count)


async def record_merge(
    docs: DocumentSet, client_session: AsyncClientSession | None, plan: SavePlan, write: Write
) -> None:
    """Before a new object's creation is sent as a merge into the stored session of its
    id, records its incarnation as merged into that session's."""
    merged_into = write.saved.incarnation
    if not plan.is_new or write.insert is not None or merged_into == plan.incarnation:
        return
    await deletions(docs).update_one(
        {"_id": plan.incarnation},
        {"$setOnInsert": {"session_id": plan.session_id, "merged_into": merged_into}},
        upsert=True,
        session=client_session,
    )


async def refuse_deleted_creations(
    docs: DocumentSet,
    client_session: AsyncClientSession | None,
    plans: Iterable[SavePlan],
    *,
    after_delete: Collection[int] = (),
) -> None:
    """Raises for the first plan retrying a creation that landed and was deleted since,
    or that a delete held before it in the same unit of work deletes (`after_delete`,
    by `id` of the plan, as writes.prepare_all takes them).

    Raises:
        SessionDeletedError: naming that plan's session.
    """
    for plan in plans:
        if not plan.is_new or plan.certain:
            continue
        row = await docs.sessions.get_pymongo_collection().find_one(
            {"_id": plan.session_id}, {"incarnation": 1}, session=client_session
        )
        stored = None if row is None else row.get("incarnation")
        record = await deletions(docs).find_one(
            {"_id": plan.incarnation, "session_id": plan.session_id}, session=client_session
        )
        # A delete held before it removes what is stored: this creation, or the session
        # it merged into, is then deleted.
        merged_into = None if record is None else record.get("merged_into")
        if (
            id(plan) in after_delete
            and stored is not None
            and stored in (plan.incarnation, merged_into)
        ):
            raise SessionDeletedError(plan.session_id)
        if stored == plan.incarnation:
            continue  # it landed and is still there: merged into, as any stored session
        if record is not None and "deleted_at" in record:
            raise SessionDeletedError(plan.session_id)


async def create_collection(database: AsyncDatabase[dict[str, Any]]) -> None:
    """Creates the deletions collection and its index if they are missing (another
    process may at once)."""
    if DELETIONS_COLLECTION not in await database.list_collection_names():
        try:
            await database.create_collection(DELETIONS_COLLECTION)
        except CollectionInvalid:
            pass  # created meanwhile (PyMongo's own check)
        except OperationFailure as exc:
            if exc.code != _NAMESPACE_EXISTS:
                raise
    # The creations merged into a deleted session are found by its id.
    await database[DELETIONS_COLLECTION].create_index("session_id")
