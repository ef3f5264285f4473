"""Messages stored before search get their tokens on MongoDB (persistence.mongo.backfill).

The update each session needs is built without a server; the whole pass runs on a
real server where PERSISTENCE_TEST_MONGODB_URL names one.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from persistence.mongo.backfill import (
    MARKER_ID,
    META_COLLECTION,
    RETIRED_SESSION_INDEXES,
    token_update,
)
from persistence.mongo.documents import SESSIONS_COLLECTION
from persistence.search import search_document


def test_sets_only_the_missing_tokens_guarded_by_what_was_read() -> None:
    document = {
        "_id": "s-1",
        "revision": 7,
        "messages": [
            {"content": "already indexed", "search_tokens": ["already", "indexed"]},
            {"content": "Crème brûlée at 3.14"},
        ],
    }
    update = token_update(document)
    assert update is not None
    assert update._filter == {"_id": "s-1", "revision": 7, "messages": {"$size": 2}}
    assert update._doc == {
        "$set": {"messages.1.search_tokens": search_document("Crème brûlée at 3.14").split()}
    }


def test_a_document_older_than_revisions_is_guarded_by_their_absence() -> None:
    update = token_update({"_id": "s-2", "messages": [{"content": "hello"}]})
    assert update is not None
    assert update._filter["revision"] == {"$exists": False}


def test_nothing_to_do_when_every_message_has_tokens() -> None:
    assert token_update({"_id": "s-3", "messages": []}) is None
    assert token_update({"_id": "s-4", "messages": [{"content": "", "search_tokens": []}]}) is None


@pytest.mark.mongodb
async def test_initialize_backfills_a_store_written_before_search(mongodb_url: str) -> None:
    import uuid

    from persistence.mongo.backend import MongoDBSessionStorage

    name = f"persistence_backfill_{uuid.uuid4().hex[:10]}"
    storage = MongoDBSessionStorage(mongodb_url, database_name=name)
    try:
        database: Any = storage.client[name]
        now = datetime.now(UTC).replace(microsecond=0)
        legacy = [
            {
                "_id": f"legacy-{index}",
                "model": "m",
                "created_at": now,
                "updated_at": now,
                "metadata": {},
                "status": "active",
                "message_count": 1,
                "messages": [
                    {
                        "message_id": f"legacy-{index}-0",
                        "role": "user",
                        "content": f"capital of France, question {index}",
                        "created_at": now,
                        "metadata": {},
                    }
                ],
            }
            for index in range(450)  # more than two batches
        ]
        await database[SESSIONS_COLLECTION].insert_many(legacy)
        await storage.initialize()
        hits = await storage.search_messages("capit", limit=1000)
        assert len(hits) == 450
        assert await database[META_COLLECTION].find_one({"_id": MARKER_ID}) is not None
    finally:
        await storage.client.drop_database(name)
        await storage.close()


@pytest.mark.mongodb
async def test_initialize_drops_the_text_index_of_the_first_version(mongodb_url: str) -> None:
    """Found by review: the `$text` index the first version created stayed, and every
    write to `messages` tokenized the whole history again for it."""
    import uuid

    from pymongo import TEXT, IndexModel

    from persistence.mongo.backend import MongoDBSessionStorage

    name = f"persistence_retired_{uuid.uuid4().hex[:10]}"
    storage = MongoDBSessionStorage(mongodb_url, database_name=name)
    try:
        sessions: Any = storage.client[name][SESSIONS_COLLECTION]
        await sessions.create_indexes(
            [IndexModel([("messages.content", TEXT)], name=RETIRED_SESSION_INDEXES[0])]
        )
        await storage.initialize()
        names = set(await sessions.index_information())
        assert RETIRED_SESSION_INDEXES[0] not in names
        assert "ix_chat_sessions_search_tokens" in names
    finally:
        await storage.client.drop_database(name)
        await storage.close()
