"""MongoDB specifics on a real server (PERSISTENCE_TEST_MONGODB_URL), skipped without one.

The shared contract suite (tests/contract) covers the behaviour every backend has;
these tests look at what only MongoDB has: the document layout, the commands a save
sends, the indexes on the server, the 16 MiB limit, transactions.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pymongo import monitoring

from persistence.errors import InvalidDataError
from persistence.models import ChatMessage, ChatSession, UploadedFileRecord
from persistence.mongo.backend import MongoDBSessionStorage
from persistence.mongo.documents import FILES_COLLECTION, SESSIONS_COLLECTION
from persistence.mongo.errors import MAX_DOCUMENT_BYTES

pytestmark = pytest.mark.mongodb


class _Commands(monitoring.CommandListener):
    """Records every command the client sends."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, Any]]] = []

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        self.sent.append((event.command_name, dict(event.command)))

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass

    def named(self, *names: str) -> list[dict[str, Any]]:
        return [command for name, command in self.sent if name in names]


@asynccontextmanager
async def _second(
    url: str, database_name: str, **options: Any
) -> AsyncIterator[MongoDBSessionStorage]:
    """Another storage, with its own client: a fresh connection to the same database."""
    storage = MongoDBSessionStorage(url, database_name=database_name, **options)
    await storage.initialize()
    try:
        yield storage
    finally:
        await storage.close()


async def _raw(storage: MongoDBSessionStorage, session_id: str) -> dict[str, Any] | None:
    collection = storage.client[storage.database_name][SESSIONS_COLLECTION]
    return await collection.find_one({"_id": session_id})


def _conversation(messages: int, session_id: str = "s-1") -> ChatSession:
    session = ChatSession.create("gemini-pro", session_id=session_id, metadata={"n": 2**40})
    for i in range(messages):
        session.add_message("user" if i % 2 == 0 else "assistant", f"message {i}")
    return session


@pytest.fixture
def mongo(mongodb_storage: Any) -> MongoDBSessionStorage:
    assert isinstance(mongodb_storage, MongoDBSessionStorage)
    return mongodb_storage


async def test_session_is_one_document_with_its_messages_embedded_in_order(
    mongo: MongoDBSessionStorage,
) -> None:
    session = _conversation(3)
    await mongo.save_session(session)
    raw = await _raw(mongo, "s-1")
    assert raw is not None
    assert raw["message_count"] == 3
    assert [m["message_id"] for m in raw["messages"]] == [m.message_id for m in session.messages]
    assert all(
        set(m) == {"message_id", "role", "content", "created_at", "metadata", "seq"}
        for m in raw["messages"]
    )
    assert type(raw["metadata"]["n"]) is int
    assert raw["created_at"].tzinfo is UTC
    assert raw["revision"] == 1 and len(raw["incarnation"]) == 32


async def test_save_after_one_message_sends_one_update_with_only_that_message(
    mongo: MongoDBSessionStorage, mongodb_url: str
) -> None:
    await mongo.save_session(_conversation(50))
    commands = _Commands()
    async with _second(
        mongodb_url, mongo.database_name, driver_options={"event_listeners": [commands]}
    ) as watched:
        session = await watched.load_session("s-1")
        assert session is not None
        added = session.add_message("user", "only me")
        commands.sent.clear()
        await watched.save_session(session)
        # Before the client closes: closing sends endSessions, as it would to any server.
        sent = list(commands.sent)

    assert [name for name, _ in sent] == ["findAndModify"]
    command = sent[0][1]
    # Appends never conflict: guarded by the incarnation seen, not by the revision.
    assert command["query"] == {
        "_id": "s-1",
        "incarnation": session.plan_save(watched.token).incarnation,
        "messages.message_id": {"$nin": [added.message_id]},
    }
    assert not command.get("upsert")
    update = command["update"]
    assert [m["message_id"] for m in update["$push"]["messages"]["$each"]] == [added.message_id]
    assert update["$inc"] == {"revision": 1, "message_count": 1}
    assert "$set" not in update
    raw = await _raw(mongo, "s-1")
    assert raw is not None and raw["message_count"] == len(raw["messages"]) == 51
    assert raw["revision"] == 2 == session.revision


async def test_saving_twice_stores_nothing_twice(mongo: MongoDBSessionStorage) -> None:
    session = _conversation(2)
    await mongo.save_session(session)
    await mongo.save_session(session)
    session.add_message("user", "third")
    await mongo.save_session(session)
    await mongo.save_session(session)
    raw = await _raw(mongo, "s-1")
    assert raw is not None
    assert [m["content"] for m in raw["messages"]] == ["message 0", "message 1", "third"]
    assert raw["message_count"] == 3


async def test_an_object_this_storage_has_not_seen_stores_only_what_is_missing(
    mongo: MongoDBSessionStorage, mongodb_url: str
) -> None:
    session = _conversation(3)
    await mongo.save_session(session)
    copy = ChatSession.model_validate(session.model_dump())
    copy.add_message("user", "new")
    async with _second(mongodb_url, mongo.database_name) as other:
        await other.save_session(copy)
    loaded = await mongo.load_session("s-1")
    assert loaded is not None
    assert [m.content for m in loaded.messages] == [
        "message 0",
        "message 1",
        "message 2",
        "new",
    ]
    assert loaded.message_count == 4


async def test_two_writers_appending_to_one_session_both_keep_their_messages(
    mongo: MongoDBSessionStorage, mongodb_url: str
) -> None:
    await mongo.save_session(_conversation(2))
    async with _second(mongodb_url, mongo.database_name) as other:
        mine, theirs = await mongo.load_session("s-1"), await other.load_session("s-1")
        assert mine is not None and theirs is not None
        mine.add_message("user", "from A")
        theirs.add_message("user", "from B")
        await asyncio.gather(mongo.save_session(mine), other.save_session(theirs))
    loaded = await mongo.load_session("s-1")
    assert loaded is not None
    assert {m.content for m in loaded.messages[2:]} == {"from A", "from B"}
    assert loaded.message_count == len(loaded.messages) == 4


async def test_concurrent_saves_of_one_object_store_its_message_once(
    mongo: MongoDBSessionStorage,
) -> None:
    session = _conversation(1)
    await mongo.save_session(session)
    session.add_message("user", "once")
    await asyncio.gather(*(mongo.save_session(session) for _ in range(5)))
    raw = await _raw(mongo, "s-1")
    assert raw is not None
    assert [m["content"] for m in raw["messages"]] == ["message 0", "once"]
    assert raw["message_count"] == 2


async def test_a_message_id_stored_in_another_session_is_refused(
    mongo: MongoDBSessionStorage,
) -> None:
    first = _conversation(1, "s-1")
    await mongo.save_session(first)
    taken = first.messages[0].message_id
    other = ChatSession(
        model="m",
        session_id="s-2",
        messages=[ChatMessage(message_id=taken, session_id="s-2", role="user", content="x")],
        message_count=1,
    )
    with pytest.raises(InvalidDataError, match="another session"):
        await mongo.save_session(other)
    assert await mongo.load_session("s-2") is None


async def test_growth_past_16_mib_is_refused_and_nothing_is_written(
    mongo: MongoDBSessionStorage,
) -> None:
    session = ChatSession.create("gemini-pro", session_id="big")
    session.add_message("user", "a" * (MAX_DOCUMENT_BYTES - 2 * 1024 * 1024))
    await mongo.save_session(session)
    session.add_message("user", "b" * (3 * 1024 * 1024))
    with pytest.raises(InvalidDataError, match="16 MiB"):
        await mongo.save_session(session)
    loaded = await mongo.load_session("big")
    assert loaded is not None
    assert loaded.message_count == len(loaded.messages) == 1


async def test_indexes_exist_on_the_server(mongo: MongoDBSessionStorage) -> None:
    database = mongo.client[mongo.database_name]
    sessions = {i["name"]: i async for i in await database[SESSIONS_COLLECTION].list_indexes()}
    files = {i["name"]: i async for i in await database[FILES_COLLECTION].list_indexes()}
    assert {
        "ix_chat_sessions_status_updated",
        "ix_chat_sessions_updated",
        "ux_chat_sessions_message_id",
        "tx_chat_sessions_content",
    } <= set(sessions)
    assert sessions["tx_chat_sessions_content"]["default_language"] == "none"
    assert sessions["ux_chat_sessions_message_id"]["unique"] is True
    assert {"ix_uploaded_files_expires_at", "ix_uploaded_files_uploaded"} <= set(files)


async def test_initialize_twice_keeps_the_same_indexes(mongo: MongoDBSessionStorage) -> None:
    await mongo.initialize()
    await mongo.save_session(_conversation(1))
    assert await mongo.load_session("s-1") is not None


async def test_listing_projects_messages_out(
    mongo: MongoDBSessionStorage, mongodb_url: str
) -> None:
    await mongo.save_session(_conversation(20))
    commands = _Commands()
    async with _second(
        mongodb_url, mongo.database_name, driver_options={"event_listeners": [commands]}
    ) as watched:
        (listed,) = await watched.list_sessions()
    assert listed.messages == [] and listed.message_count == 20
    (find,) = commands.named("find")
    assert "messages" not in find["projection"]
    assert find["limit"] == 100


async def test_search_uses_the_token_index_and_the_one_rule(
    mongo: MongoDBSessionStorage, mongodb_url: str
) -> None:
    session = ChatSession.create("m", session_id="s-1")
    session.add_message("user", "The quick brown Fox")
    session.add_message("assistant", "concatenate the cats")
    session.add_message("user", "fox and cat together 日本語のテキスト")
    await mongo.save_session(session)
    commands = _Commands()
    async with _second(
        mongodb_url, mongo.database_name, driver_options={"event_listeners": [commands]}
    ) as watched:
        found = await watched.search_messages("FOX")
        both = await watched.search_messages("cat fox")
        prefix = await watched.search_messages("cat")
        anywhere = await watched.search_messages("テキスト")
        none = await watched.search_messages("cat dog")
        mine = await watched.search_messages("fox", session_id="s-2")
        users = await watched.search_messages("cat", role="assistant")
    assert [m.content for m in found] == [
        "fox and cat together 日本語のテキスト",
        "The quick brown Fox",
    ]
    assert [m.content for m in both] == ["fox and cat together 日本語のテキスト"]
    assert [m.content for m in prefix] == [
        "fox and cat together 日本語のテキスト",
        "concatenate the cats",
    ]
    assert [m.content for m in anywhere] == ["fox and cat together 日本語のテキスト"]
    assert none == [] and mine == []
    assert [m.content for m in users] == ["concatenate the cats"]
    assert all(m.session_id == "s-1" for m in found)
    (aggregate, *_) = commands.named("aggregate")
    first = aggregate["pipeline"][0]["$match"]
    assert "messages.search_tokens" in str(first)
    plan = await mongo.docs.sessions.get_pymongo_collection().find(first).explain()
    assert "ix_chat_sessions_search_tokens" in str(plan)


@pytest.mark.parametrize("query", ['"', "-", "a -b", "(", "\\", "$where", "\x00", "🙂", ""])
async def test_search_never_raises_on_user_text(mongo: MongoDBSessionStorage, query: str) -> None:
    await mongo.save_session(_conversation(2))
    assert isinstance(await mongo.search_messages(query), list)


async def test_round_trip_through_the_server_is_exact(mongo: MongoDBSessionStorage) -> None:
    session = ChatSession.create(
        "m", session_id="s-1", metadata={"big": 2**62, "f": 0.5, "nested": {"l": [1, None, "x"]}}
    )
    session.add_message("user", "héllo ✓", {"k": 2**40})
    await mongo.save_session(session)
    loaded = await mongo.load_session("s-1")
    assert loaded == session
    assert type(loaded.metadata["big"]) is int
    assert loaded.created_at.tzinfo is UTC
    record = UploadedFileRecord(
        file_id="f-1",
        gemini_file_name="files/a",
        gemini_file_uri="u",
        display_name="a",
        size=2**40,
        mime_type="text/plain",
        uploaded_at=datetime(2024, 1, 1, tzinfo=UTC),
        expires_at=datetime(2024, 1, 2, tzinfo=UTC),
    )
    await mongo.save_file_record(record)
    assert await mongo.load_file_record("f-1") == record


async def test_unit_of_work_left_without_commit_writes_nothing(
    mongo: MongoDBSessionStorage, mongodb_url: str
) -> None:
    async with mongo.unit_of_work() as uow:
        await uow.sessions.add(_conversation(2))
    async with _second(mongodb_url, mongo.database_name) as fresh:
        assert await fresh.load_session("s-1") is None


async def test_unit_of_work_writes_are_invisible_until_commit(
    mongo: MongoDBSessionStorage, mongodb_url: str
) -> None:
    record = UploadedFileRecord(
        file_id="f-1",
        gemini_file_name="files/a",
        gemini_file_uri="u",
        display_name="a",
        size=1,
        mime_type="text/plain",
        uploaded_at=datetime.now(UTC),
        expires_at=datetime.now(UTC) + timedelta(days=1),
    )
    async with _second(mongodb_url, mongo.database_name) as fresh:
        async with mongo.unit_of_work() as uow:
            await uow.sessions.add(_conversation(2))
            await uow.files.add(record)
            # A transaction (replica set) or held-back writes (standalone): not visible yet.
            assert await fresh.load_session("s-1") is None
            assert await fresh.load_file_record("f-1") is None
            await uow.commit()
        loaded = await fresh.load_session("s-1")
        assert loaded is not None and loaded.message_count == 2
        assert await fresh.load_file_record("f-1") == record


async def test_unit_of_work_appends_after_get_without_rewriting_history(
    mongo: MongoDBSessionStorage,
) -> None:
    await mongo.save_session(_conversation(3))
    async with mongo.unit_of_work() as uow:
        session = await uow.sessions.get("s-1")
        assert session is not None
        session.add_message("user", "in uow")
        await uow.sessions.add(session)
        await uow.commit()
    raw = await _raw(mongo, "s-1")
    assert raw is not None
    assert raw["message_count"] == len(raw["messages"]) == 4
    assert raw["messages"][-1]["content"] == "in uow"


async def test_transactions_are_used_where_the_server_has_them(
    mongo: MongoDBSessionStorage, mongodb_url: str
) -> None:
    commands = _Commands()
    async with _second(
        mongodb_url, mongo.database_name, driver_options={"event_listeners": [commands]}
    ) as watched:
        async with watched.unit_of_work() as uow:
            await uow.sessions.add(_conversation(1))
            await uow.commit()
        transactional = watched.supports_transactions
    writes = commands.named("insert", "update", "findAndModify", "aggregate")
    assert commands.named("insert"), "the unit of work sent no insert"
    sent_in_transaction = all(command.get("autocommit") is False for command in writes)
    assert sent_in_transaction is transactional
    assert bool(commands.named("commitTransaction")) is transactional
    # Every command of the unit of work (its checks and its writes) carried one session.
    assert len({str(command["lsid"]) for command in writes}) == 1


async def test_storages_on_two_databases_do_not_share_documents(
    mongo: MongoDBSessionStorage, mongodb_url: str
) -> None:
    other_name = f"{mongo.database_name}_b"
    async with _second(mongodb_url, other_name) as other:
        try:
            await mongo.save_session(_conversation(1, "only-in-a"))
            await other.save_session(_conversation(1, "only-in-b"))
            assert await mongo.load_session("only-in-b") is None
            assert await other.load_session("only-in-a") is None
            assert (await mongo.count()).total_sessions == 1
        finally:
            await other.drop_database()


async def test_counts_are_computed_by_aggregation(
    mongo: MongoDBSessionStorage, mongodb_url: str
) -> None:
    await mongo.save_session(_conversation(3, "a"))
    await mongo.save_session(_conversation(2, "b"))
    await mongo.set_status(["b"], "archived")
    commands = _Commands()
    async with _second(
        mongodb_url, mongo.database_name, driver_options={"event_listeners": [commands]}
    ) as watched:
        commands.sent.clear()
        counts = await watched.count()
        # Before the client closes: closing sends endSessions, as it would to any server.
        sent = [name for name, _ in commands.sent]
    assert counts.sessions_by_status == {"active": 1, "archived": 1, "expired": 0}
    assert counts.messages == 5
    assert sent == ["aggregate", "aggregate"]
