"""The MongoDB write model on a real server (PERSISTENCE_TEST_MONGODB_URL), skipped without one.

tests/contract/test_writes.py holds what every backend promises; these tests look at
what is MongoDB's own: the commands sent, documents written before revisions, the
update pipeline on the server, and the unit of work without transactions.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from persistence.errors import InvalidDataError, SessionConflictError
from persistence.models import ChatMessage, ChatSession
from persistence.mongo.backend import MongoDBSessionStorage
from persistence.mongo.bulk import documents_for_insert, undo_filter
from persistence.mongo.documents import SESSIONS_COLLECTION
from persistence.mongo.uow import MongoUnitOfWork
from tests.mongo.test_server import _Commands, _conversation, _raw, _second

pytestmark = pytest.mark.mongodb


@pytest.fixture
def mongo(mongodb_storage: Any) -> MongoDBSessionStorage:
    assert isinstance(mongodb_storage, MongoDBSessionStorage)
    return mongodb_storage


def _collection(storage: MongoDBSessionStorage) -> Any:
    return storage.client[storage.database_name][SESSIONS_COLLECTION]


async def _legacy(storage: MongoDBSessionStorage, session: ChatSession) -> None:
    """Stores `session` as a version before revisions wrote it: no revision, no incarnation."""
    await storage.save_session(session)
    await _collection(storage).update_one(
        {"_id": session.session_id}, {"$unset": {"revision": "", "incarnation": ""}}
    )


async def test_a_document_written_before_revisions_is_read_as_revision_1_and_upgraded(
    mongo: MongoDBSessionStorage, mongodb_url: str
) -> None:
    await _legacy(mongo, _conversation(2))
    async with _second(mongodb_url, mongo.database_name) as other:
        first = await mongo.load_session("s-1")
        stale = await other.load_session("s-1")
        assert first is not None and stale is not None
        assert first.revision == stale.revision == 1

        first.metadata["title"] = "first write"
        await mongo.save_session(first)
        raw = await _raw(mongo, "s-1")
        assert raw is not None and (raw["revision"], raw["incarnation"]) == (2, "")

        stale.metadata["title"] = "stale"
        with pytest.raises(SessionConflictError, match="title"):
            await other.save_session(stale)
        # An append from the same stale holder never conflicts, and takes the fast path.
        fresh = await other.load_session("s-1")
        assert fresh is not None
        fresh.add_message("user", "after the upgrade")
        await other.save_session(fresh)
    raw = await _raw(mongo, "s-1")
    assert raw is not None and raw["revision"] == 3 and raw["message_count"] == 3


async def test_a_status_change_upgrades_a_document_written_before_revisions(
    mongo: MongoDBSessionStorage,
) -> None:
    await _legacy(mongo, _conversation(1))
    holder = await mongo.load_session("s-1")
    assert holder is not None
    assert await mongo.set_status(["s-1"], "archived") == 1
    raw = await _raw(mongo, "s-1")
    assert raw is not None and (raw["revision"], raw["incarnation"]) == (2, "")
    holder.status = "expired"
    with pytest.raises(SessionConflictError, match="status"):
        await mongo.save_session(holder)


async def test_edits_removals_and_appends_land_in_one_pipeline_update(
    mongo: MongoDBSessionStorage, mongodb_url: str
) -> None:
    await mongo.save_session(_conversation(5))
    before = await _raw(mongo, "s-1")
    assert before is not None
    commands = _Commands()
    async with _second(
        mongodb_url, mongo.database_name, driver_options={"event_listeners": [commands]}
    ) as watched:
        session = await watched.load_session("s-1")
        assert session is not None
        ids = [m.message_id for m in session.messages]
        session.edit_message(ids[1], content="$where edited", metadata={"v": "$$ROOT"})
        session.rewind(ids[3])
        session.pop_message()
        session.add_message("assistant", "$messages")
        commands.sent.clear()
        await watched.save_session(session)
        sent = [name for name, _ in commands.sent]
    assert sent == ["update"]
    raw = await _raw(mongo, "s-1")
    assert raw is not None
    assert [m["content"] for m in raw["messages"]] == [
        "message 0",
        "$where edited",
        "message 2",
        "$messages",
    ]
    assert raw["messages"][1]["metadata"] == {"v": "$$ROOT"}
    # An edit keeps the message's place and its store sequence (search's tie-break).
    assert raw["messages"][1]["seq"] == before["messages"][1]["seq"]
    assert raw["message_count"] == 4 and raw["revision"] == 2
    loaded = await mongo.load_session("s-1")
    assert loaded is not None and loaded.messages == session.messages


async def test_load_last_slices_on_the_server(
    mongo: MongoDBSessionStorage, mongodb_url: str
) -> None:
    await mongo.save_session(_conversation(30))
    commands = _Commands()
    async with _second(
        mongodb_url, mongo.database_name, driver_options={"event_listeners": [commands]}
    ) as watched:
        tail = await watched.load_session("s-1", last=2)
        (find,) = commands.named("find")
    assert find["projection"]["messages"] == {"$slice": -2}
    assert tail is not None and [m.content for m in tail.messages] == ["message 28", "message 29"]
    assert tail.message_count == 30 and tail.omitted_messages == 28


@pytest.fixture(params=[False, True], ids=["standalone", "transaction"])
def transactional(request: pytest.FixtureRequest, mongo: MongoDBSessionStorage) -> bool:
    if request.param and not mongo.supports_transactions:
        pytest.skip("mongodb: this server has no transactions (a standalone server)")
    return bool(request.param)


def _unit(storage: MongoDBSessionStorage, transactional: bool) -> MongoUnitOfWork:
    # Without a transaction is what a standalone server gets, whatever the test server is.
    return MongoUnitOfWork(storage.client, storage.docs, storage.token, transactional=transactional)


async def test_a_commit_that_hits_a_refused_session_writes_none_of_them(
    mongo: MongoDBSessionStorage, transactional: bool
) -> None:
    owner = _conversation(1, "owner")
    await mongo.save_session(owner)
    batch = [_conversation(2, f"batch-{index}") for index in range(4)]
    taken = ChatMessage(
        message_id=owner.messages[0].message_id,
        session_id="batch-2",
        role="user",
        content="clash",
    )
    batch[2].messages.append(taken)
    async with _unit(mongo, transactional) as uow:
        for session in batch:
            await uow.sessions.add(session)
        with pytest.raises(InvalidDataError, match=taken.message_id):
            await uow.commit()
    assert await mongo.load_sessions([s.session_id for s in batch]) == []
    assert all(session.revision is None for session in batch)


async def test_a_commit_that_hits_a_conflict_writes_none_of_the_batch(
    mongo: MongoDBSessionStorage, mongodb_url: str, transactional: bool
) -> None:
    for index in range(3):
        await mongo.save_session(_conversation(1, f"c-{index}"))
    held = [await mongo.load_session(f"c-{index}") for index in range(3)]
    async with _second(mongodb_url, mongo.database_name) as other:
        theirs = await other.load_session("c-1")
        assert theirs is not None
        theirs.metadata["title"] = "theirs"
        await other.save_session(theirs)
    async with _unit(mongo, transactional) as uow:
        for session in held:
            assert session is not None
            session.metadata["title"] = "mine"
            session.add_message("user", "mine")
            await uow.sessions.add(session)
        with pytest.raises(SessionConflictError, match="c-1"):
            await uow.commit()
    for index in range(3):
        raw = await _raw(mongo, f"c-{index}")
        assert raw is not None and raw["message_count"] == 1
        assert raw["metadata"].get("title") == ("theirs" if index == 1 else None)


async def test_a_commit_sends_checked_writes_and_confirms_each_object(
    mongo: MongoDBSessionStorage, transactional: bool
) -> None:
    await mongo.save_session(_conversation(1, "existing"))
    existing = await mongo.load_session("existing")
    assert existing is not None
    existing.add_message("user", "more")
    fresh = _conversation(2, "fresh")
    async with _unit(mongo, transactional) as uow:
        await uow.sessions.add(existing)
        await uow.sessions.add(fresh)
        await uow.commit()
    assert not mongo.has_unsaved_changes(existing) and not mongo.has_unsaved_changes(fresh)
    assert existing.revision == 2 and fresh.revision == 1
    for name, count in (("existing", 2), ("fresh", 2)):
        raw = await _raw(mongo, name)
        assert raw is not None and raw["message_count"] == len(raw["messages"]) == count


async def test_undoing_a_standalone_batch_deletes_only_documents_no_one_wrote_since(
    mongo: MongoDBSessionStorage,
) -> None:
    """Found by review: the compensating delete of a half-inserted batch (standalone
    server) took every inserted id, also a session another writer had appended to
    meanwhile and been told it was saved."""
    untouched, appended_to = _conversation(1), _conversation(1, "s-appended")
    documents = documents_for_insert([untouched, appended_to])
    await _collection(mongo).insert_many(documents)
    other = await mongo.load_session("s-appended")
    assert other is not None
    other.add_message("assistant", "acknowledged meanwhile")
    await mongo.save_session(other)

    deleted = await _collection(mongo).delete_many(undo_filter(documents))

    assert deleted.deleted_count == 1
    assert await mongo.load_session(untouched.session_id) is None
    kept = await mongo.load_session("s-appended")
    assert kept is not None and kept.messages[-1].content == "acknowledged meanwhile"


@pytest.mark.parametrize("messages", [0, 2])
async def test_a_creation_that_landed_and_was_deleted_meanwhile_stays_deleted(
    mongo: MongoDBSessionStorage,
    mongodb_url: str,
    monkeypatch: pytest.MonkeyPatch,
    messages: int,
) -> None:
    """As tests/reliability/test_unknown_outcomes.py on SQL: the save lands, then is
    cancelled; another writer deletes the session; the next save refuses."""
    from persistence.errors import SessionDeletedError
    from persistence.mongo import backend, deletions

    session = ChatSession.create("unknown")
    for turn in range(messages):
        session.add_message("user", f"turn {turn}")
    write_plan = backend.writes.write_plan

    async def landed_then_cut_off(*args: Any, **kwargs: Any) -> Any:
        await write_plan(*args, **kwargs)
        raise asyncio.CancelledError  # as a cancel arriving just after the write

    monkeypatch.setattr(backend.writes, "write_plan", landed_then_cut_off)
    with pytest.raises(asyncio.CancelledError):
        await mongo.save_session(session)
    monkeypatch.setattr(backend.writes, "write_plan", write_plan)
    async with _second(mongodb_url, mongo.database_name) as other:
        assert await other.delete_session(session.session_id) is True
    recorded = await mongo.client[mongo.database_name][deletions.DELETIONS_COLLECTION].find_one(
        {"session_id": session.session_id}
    )
    assert recorded is not None

    session.add_message("user", "after the delete")
    with pytest.raises(SessionDeletedError):
        await mongo.save_session(session)
    assert await mongo.load_session(session.session_id) is None
