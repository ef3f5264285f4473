"""Gives messages stored before search (issue 12) their search tokens, on MongoDB.

SQL stores get theirs from alembic revision 0003; a MongoDB store has no revisions,
so `initialize()` runs this once per database: it walks the sessions whose messages
lack `search_tokens` in `_id` order, in batches, and sets the tokens of those
messages with one guarded update per session. The guard is the session's revision
(or its absence, for documents older than revisions) and its message count: a
session written meanwhile is left for the next initialize, never overwritten. When a
pass leaves nothing behind, a marker in `persistence_meta` makes later starts skip
the scan, so startup stays flat.
"""

from __future__ import annotations

from typing import Any

from pymongo import UpdateOne

from persistence.clock import utc_now
from persistence.mongo.documents import SESSIONS_COLLECTION
from persistence.search import search_document

META_COLLECTION = "persistence_meta"
MARKER_ID = "search_tokens"
BATCH_SIZE = 200

_MISSING = {"messages": {"$elemMatch": {"search_tokens": {"$exists": False}}}}
_PROJECTION = {"revision": 1, "messages.content": 1, "messages.search_tokens": 1}


def token_update(document: dict[str, Any]) -> UpdateOne | None:
    """The update that gives a session document's messages their missing tokens.

    None when every message has them. The filter matches only the document as read:
    same revision (or still none) and same number of messages.
    """
    messages = document.get("messages") or []
    tokens = {
        f"messages.{index}.search_tokens": search_document(message.get("content", "")).split()
        for index, message in enumerate(messages)
        if "search_tokens" not in message
    }
    if not tokens:
        return None
    revision = document.get("revision")
    guard: dict[str, Any] = {
        "_id": document["_id"],
        "revision": {"$exists": False} if revision is None else revision,
        "messages": {"$size": len(messages)},
    }
    return UpdateOne(guard, {"$set": tokens})


# Before its own search rule (issue 12), the backend searched through a `$text` index on
# every message's content. Kept, it made every write to `messages` tokenize the whole
# history again for an index nothing reads (found by review).
RETIRED_SESSION_INDEXES = ("tx_chat_sessions_content",)


async def drop_retired_indexes(database: Any) -> list[str]:
    """Drops the indexes earlier versions created that nothing reads; returns their names.

    `database` is a PyMongo AsyncDatabase of the store.
    """
    sessions = database[SESSIONS_COLLECTION]
    names = await sessions.index_information()
    retired = [name for name in RETIRED_SESSION_INDEXES if name in names]
    for name in retired:
        await sessions.drop_index(name)
    return retired


async def backfill_search_tokens(database: Any, batch_size: int = BATCH_SIZE) -> int:
    """Sets missing search tokens; returns how many sessions it updated.

    `database` is a PyMongo AsyncDatabase of the store.
    """
    meta = database[META_COLLECTION]
    if await meta.find_one({"_id": MARKER_ID}) is not None:
        return 0
    sessions = database[SESSIONS_COLLECTION]
    updated = skipped = 0
    last_id: Any = None
    while True:
        query = dict(_MISSING) if last_id is None else {**_MISSING, "_id": {"$gt": last_id}}
        cursor = sessions.find(query, _PROJECTION).sort("_id", 1).limit(batch_size)
        batch = await cursor.to_list()
        if not batch:
            break
        last_id = batch[-1]["_id"]
        updates = [update for update in map(token_update, batch) if update is not None]
        if updates:
            result = await sessions.bulk_write(updates, ordered=False)
            updated += result.modified_count
            skipped += len(updates) - result.matched_count
    if skipped == 0:
        await meta.update_one({"_id": MARKER_ID}, {"$set": {"done_at": utc_now()}}, upsert=True)
    return updated
