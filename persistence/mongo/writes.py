"""A save of a session on MongoDB, as single-document commands that check revisions.

The work takes a `SavePlan` (what the holder changed since its last load or save) and
sends the cheapest command that keeps every guarantee (API.md, Writes):

- a new object: one insert of the whole document (revision 1, the incarnation its
  bookkeeping drew; a retried creation of unknown outcome takes the checked path);
- appends only: one `findAndModify` that pushes them, guarded by the incarnation;
- other changes from a holder whose base is exact: one update guarded by the revision
  it saw (compare-and-set);
- otherwise, or when one of those did not match (someone wrote since, the session was
  deleted, a new object's id is taken, a message id is stored elsewhere): the checked
  path reads what is stored, refuses or merges, and sends an update guarded by the
  revision it read, reading again if another writer won the race.

Inside a transaction every save takes the checked path: a failed write (a duplicate
key) would abort the whole transaction, so nothing is sent that may fail.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Collection, Sequence
from typing import Any

from pymongo import ReturnDocument
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import DuplicateKeyError

from persistence.changes import SavePlan
from persistence.errors import InvalidDataError, PersistenceError
from persistence.mongo import inspection, updates
from persistence.mongo.deletions import record_merge, refuse_deleted_creations
from persistence.mongo.documents import LEGACY_INCARNATION, DocumentSet
from persistence.mongo.updates import Saved, Write

# A checked save that loses the race to other writers this many times gives up; it
# waits up to _BACKOFF * 2**attempt seconds before each new attempt (0.5 s in all).
ATTEMPTS = 10
_BACKOFF = 0.0005
# Plans and message ids per inspection: its command stays far below 16 MiB.
_INSPECT_PLANS = 200
_INSPECT_IDS = 5000


def _sessions(docs: DocumentSet) -> AsyncCollection[dict[str, Any]]:
    return docs.sessions.get_pymongo_collection()


def in_transaction(client_session: AsyncClientSession | None) -> bool:
    return client_session is not None and client_session.in_transaction


def creating(plan: SavePlan) -> str:
    """The incarnation a plan's session gets if the plan creates it: a new object's own,
    drawn by its bookkeeping and kept for a retry (only a new object's plan creates; any
    other carries its base's, which `inspection.prepare` does not use)."""
    assert plan.incarnation is not None, "every plan carries an incarnation"
    return plan.incarnation


async def still_there(
    docs: DocumentSet, client_session: AsyncClientSession | None, plan: SavePlan
) -> bool:
    """Whether the session a plan with nothing to write came from is still stored."""
    if plan.is_new:
        return False
    row = await _sessions(docs).find_one(
        {"_id": plan.session_id}, {"incarnation": 1}, session=client_session
    )
    if row is None:
        return False
    stored = row.get("incarnation")
    return (LEGACY_INCARNATION if stored is None else stored) == plan.incarnation


async def write_plan(
    docs: DocumentSet,
    client_session: AsyncClientSession | None,
    plan: SavePlan,
    *,
    force: bool = False,
) -> Saved:
    """Writes `plan` (in the caller's transaction, if `client_session` has one).

    With `force`, the plan's values win over another writer's for what it changed
    (edits of messages removed meanwhile change nothing) instead of a conflict.

    Raises:
        SessionConflictError: another writer changed what the plan changes (not with
            `force`).
        SessionDeletedError: the session the plan's base came from is gone.
        InvalidDataError: a new message's id is stored in another session, or the
            session would cross the 16 MiB document limit.
        PersistenceError: other writers won the race `ATTEMPTS` times (nothing written).
    """
    if not in_transaction(client_session) and (plan.certain or not plan.is_new):
        saved = await _direct(docs, client_session, plan)
        if saved is not None:
            return saved
    return await write_checked(docs, client_session, plan, force=force)


async def _direct(
    docs: DocumentSet, client_session: AsyncClientSession | None, plan: SavePlan
) -> Saved | None:
    """The one-command paths; None when the store was not as the plan expects."""
    collection = _sessions(docs)
    try:
        if plan.is_new:
            incarnation = creating(plan)
            document = updates.new_document(plan, incarnation)
            await collection.insert_one(document, session=client_session)
            return Saved(1, incarnation, exact=True)
        assert plan.revision is not None and plan.incarnation is not None
        if plan.certain and plan.appends_only:
            query, update = updates.append(plan)
            row = await collection.find_one_and_update(
                query,
                update,
                projection={"_id": 0, "revision": 1},
                return_document=ReturnDocument.AFTER,
                session=client_session,
            )
            if row is None:
                return None
            revision = int(row["revision"])
            exact = plan.exact and revision == plan.revision + 1
            return Saved(revision, plan.incarnation, exact)
        if plan.certain and plan.exact:
            write = updates.compare_and_set(plan)
            if await send(docs, client_session, write):
                return write.saved
    except DuplicateKeyError:
        # The id is taken (the checked path merges) or a message id is stored in
        # another session (it names the message); nothing of this command was written.
        pass
    return None


async def send(docs: DocumentSet, client_session: AsyncClientSession | None, write: Write) -> bool:
    """Sends one prepared write; False if its guard no longer matched (nothing written)."""
    collection = _sessions(docs)
    if write.insert is not None:
        await collection.insert_one(write.insert, session=client_session)
        return True
    result = await collection.update_one(write.query, write.pipeline, session=client_session)
    return result.matched_count == 1


async def inspect(
    docs: DocumentSet, client_session: AsyncClientSession | None, plans: Sequence[SavePlan]
) -> inspection.Inspection:
    """Reads, in one round trip, what the checked path needs for `plans`."""
    cursor = await _sessions(docs).aggregate(inspection.inspection(plans), session=client_session)
    return inspection.Inspection(await cursor.to_list())


async def write_checked(
    docs: DocumentSet,
    client_session: AsyncClientSession | None,
    plan: SavePlan,
    *,
    force: bool = False,
) -> Saved:
    """The checked path: read, refuse or merge, write guarded by what was read; repeat."""
    await refuse_deleted_creations(docs, client_session, [plan])
    for attempt in range(ATTEMPTS):
        if attempt:
            # Lost the race (appenders move the revision too): back off a little, at random.
            await asyncio.sleep(random.uniform(0, _BACKOFF * 2**attempt))  # noqa: S311
        seen = await inspect(docs, client_session, [plan])
        write = seen.prepare(plan, creating(plan), force=force)
        await record_merge(docs, client_session, plan, write)
        try:
            if await send(docs, client_session, write):
                return write.saved
        except DuplicateKeyError as exc:
            # A new id or message id taken since the read; a transaction is aborted.
            if in_transaction(client_session):
                raise await _taken_error(docs, plan) from exc
    raise PersistenceError(
        f"save session {plan.session_id!r}: other writers changed it {ATTEMPTS} times"
        " during this save; nothing was written (save again)"
    )


async def send_prepared(
    docs: DocumentSet,
    client_session: AsyncClientSession | None,
    plan: SavePlan,
    write: Write | None,
) -> Saved:
    """Sends a write prepared earlier; if the store changed since, saves the plan anew."""
    if write is not None:
        await record_merge(docs, client_session, plan, write)
        try:
            if await send(docs, client_session, write):
                return write.saved
        except DuplicateKeyError as exc:
            if in_transaction(client_session):
                raise await _taken_error(docs, plan) from exc
    return await write_checked(docs, client_session, plan)


async def _taken_error(docs: DocumentSet, plan: SavePlan) -> PersistenceError:
    """Names the new message id another session took, once a duplicate key aborted a
    transaction (read outside it: the aborted transaction can read nothing more)."""
    taken = (await inspect(docs, None, [plan])).taken(plan)
    for message_id, holder in taken.items():
        return InvalidDataError(
            f"message_id {message_id!r} is already stored in another session ({holder!r});"
            " the transaction was aborted, nothing of it was written"
        )
    return PersistenceError(
        f"save session {plan.session_id!r}: another writer stored the same id meanwhile;"
        " the transaction was aborted, nothing of it was written (retry the unit of work)"
    )


def _chunks(plans: Sequence[SavePlan]) -> list[list[SavePlan]]:
    chunks: list[list[SavePlan]] = []
    ids = 0
    for plan in plans:
        named = len(plan.appends) + len(plan.edits) + len(plan.removals)
        if not chunks or len(chunks[-1]) >= _INSPECT_PLANS or ids + named > _INSPECT_IDS:
            chunks.append([])
            ids = 0
        chunks[-1].append(plan)
        ids += named
    return chunks


async def prepare_all(
    docs: DocumentSet,
    client_session: AsyncClientSession | None,
    plans: Sequence[SavePlan],
    *,
    after_delete: Collection[int] = (),
) -> list[Write]:
    """Checks every plan against the store and prepares its write, sending nothing.

    A plan in `after_delete` (by `id`: its session is deleted before it is sent) is
    checked as one of a session not stored: a new object's becomes an insert, any
    other is refused.

    Raises:
        SessionConflictError, SessionDeletedError, InvalidDataError: as `write_plan`,
            for the first plan refused; also if two plans add one message id.
    """
    inspection.refuse_shared_ids(plans)
    await refuse_deleted_creations(docs, client_session, plans, after_delete=after_delete)
    prepared: list[Write] = []
    for chunk in _chunks(plans):
        seen = await inspect(docs, client_session, chunk)
        prepared.extend(
            seen.prepare(plan, creating(plan), absent=id(plan) in after_delete) for plan in chunk
        )
    return prepared
