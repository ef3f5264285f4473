"""A record of deleted sessions, so that a save of unknown outcome never brings one back.

As on SQL (revision 0010): a new session's first save can fail with its outcome
unknown; if it landed and another writer deleted the session, the next save found no
document and created it again. Every delete now records the deleted document's
incarnation in `chat_session_deletions` (its `_id`: incarnations are uuid4 hex, drawn
for each creation, so they never repeat) just before the delete, in the same
transaction inside a unit of work where the deployment has them
(persistence.mongo.repositories.delete_session_document). A record left by a delete
that then failed names a session still stored, which a retried creation looks at
first. A save that retries a creation (`SavePlan.certain` False on a new plan) looks
at the record once it has not found its session. `initialize()` creates the
collection, so that transactions never have to.

Without transactions (a standalone server) nothing orders a delete against a retry
running at the same moment: a delete between the retry's look and its insert is not
seen. The documents of the first version, without an incarnation, are deleted
unrecorded: no creation retried today can have made them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import CollectionInvalid, OperationFailure

from persistence.changes import SavePlan
from persistence.clock import utc_now
from persistence.errors import SessionDeletedError
from persistence.mongo.documents import DocumentSet

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
    """Records that this incarnation of the session is being deleted."""
    await deletions(docs).update_one(
        {"_id": incarnation},
        {"$setOnInsert": {"session_id": session_id, "deleted_at": utc_now()}},
        upsert=True,
        session=client_session,
    )


async def refuse_deleted_creations(
    docs: DocumentSet, client_session: AsyncClientSession | None, plans: Iterable[SavePlan]
) -> None:
    """Raises for the first plan retrying a creation that landed and was deleted since.

    Raises:
        SessionDeletedError: naming that plan's session.
    """
    for plan in plans:
        if not plan.is_new or plan.certain:
            continue
        row = await docs.sessions.get_pymongo_collection().find_one(
            {"_id": plan.session_id}, {"incarnation": 1}, session=client_session
        )
        if row is not None and row.get("incarnation") == plan.incarnation:
            continue  # it landed and is still there: merged into, as any stored session
        if await deletions(docs).find_one({"_id": plan.incarnation}, session=client_session):
            raise SessionDeletedError(plan.session_id)


async def create_collection(database: AsyncDatabase[dict[str, Any]]) -> None:
    """Creates the deletions collection if it is missing (another process may at once)."""
    if DELETIONS_COLLECTION in await database.list_collection_names():
        return
    try:
        await database.create_collection(DELETIONS_COLLECTION)
    except CollectionInvalid:
        pass  # created meanwhile (PyMongo's own check)
    except OperationFailure as exc:
        if exc.code != _NAMESPACE_EXISTS:
            raise
