"""The unit of work without a server: with and without a transaction, writes wait for commit.

Its client points at a port where nothing listens, so any command it tried to send
would fail: a block that leaves without error sent nothing.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from pymongo import AsyncMongoClient

from persistence.errors import InvalidDataError, PersistenceError
from persistence.models import ChatMessage, ChatSession
from persistence.mongo.documents import bind_documents
from persistence.mongo.uow import MongoUnitOfWork
from tests.factories import file_record

TOKEN = "storage-token"


@pytest.fixture
async def client() -> AsyncIterator[AsyncMongoClient[dict[str, object]]]:
    client: AsyncMongoClient[dict[str, object]] = AsyncMongoClient(
        "mongodb://127.0.0.1:1/", serverSelectionTimeoutMS=300, connect=False
    )
    yield client
    await client.close()


@pytest.fixture(params=[False, True], ids=["standalone", "transaction"])
def transactional(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


def _unit(client: AsyncMongoClient[dict[str, object]], transactional: bool) -> MongoUnitOfWork:
    return MongoUnitOfWork(client, bind_documents(), TOKEN, transactional=transactional)


def _stored(session_id: str = "s-1", messages: int = 1) -> ChatSession:
    session = ChatSession.create("m", session_id=session_id)
    for index in range(messages):
        session.add_message("user", f"message {index}")
    session.saved_to(TOKEN, session.plan_save(TOKEN), 4, "inc", exact=True)
    return session


async def test_nothing_is_sent_before_commit(
    client: AsyncMongoClient[dict[str, object]], transactional: bool
) -> None:
    session = ChatSession.create("m", session_id="s-1")
    session.add_message("user", "hello")
    async with _unit(client, transactional) as uow:
        await uow.sessions.add(session)
        session.add_message("user", "after add")
        await uow.sessions.add(session)
    # Rolled back: the store is not assumed to hold anything.
    assert session.revision is None
    assert session.plan_save(TOKEN).is_new


async def test_a_rolled_back_unit_of_work_leaves_the_objects_pending(
    client: AsyncMongoClient[dict[str, object]], transactional: bool
) -> None:
    session = _stored()
    session.metadata["title"] = "t"
    added = session.add_message("user", "in the unit")
    async with _unit(client, transactional) as uow:
        await uow.sessions.add(session)
    plan = session.plan_save(TOKEN)
    assert plan.revision == 4 and plan.appends == (added,)
    assert set(plan.metadata_changes) == {"title"}


async def test_bad_input_is_refused_at_add_even_when_writes_wait_for_commit(
    client: AsyncMongoClient[dict[str, object]], transactional: bool
) -> None:
    session = ChatSession.create("m", session_id="s-1")
    session.messages.append(ChatMessage(session_id="someone-else", role="user", content="x"))
    async with _unit(client, transactional) as uow:
        with pytest.raises(InvalidDataError, match="someone-else"):
            await uow.sessions.add(session)


async def test_a_history_changed_behind_the_models_back_is_refused_at_add(
    client: AsyncMongoClient[dict[str, object]], transactional: bool
) -> None:
    session = _stored(messages=2)
    session.messages.reverse()
    async with _unit(client, transactional) as uow:
        with pytest.raises(InvalidDataError, match="directly in `messages`"):
            await uow.sessions.add(session)


async def test_a_committed_unit_of_work_cannot_be_reused(
    client: AsyncMongoClient[dict[str, object]], transactional: bool
) -> None:
    async with _unit(client, transactional) as uow:
        await uow.commit()
        with pytest.raises(PersistenceError, match="already committed"):
            await uow.sessions.add(ChatSession.create("m"))


async def test_a_unit_of_work_must_be_entered(
    client: AsyncMongoClient[dict[str, object]], transactional: bool
) -> None:
    uow = _unit(client, transactional)
    with pytest.raises(PersistenceError, match="async with"):
        await uow.sessions.add(ChatSession.create("m"))


async def test_the_unit_of_work_reads_its_own_pending_writes(
    client: AsyncMongoClient[dict[str, object]], transactional: bool
) -> None:
    session = ChatSession.create("m", session_id="s-1")
    session.add_message("user", "hello")
    record = file_record(file_id="f-1")
    async with _unit(client, transactional) as uow:
        await uow.sessions.add(session)
        await uow.files.add(record)
        # The object held for saving itself: changing and adding it again holds the newer plan.
        assert await uow.sessions.get("s-1") is session
        assert await uow.files.get("f-1") == record

        assert await uow.sessions.delete("s-1") is True
        assert await uow.files.delete("f-1") is True
        assert await uow.sessions.get("s-1") is None
        assert await uow.files.get("f-1") is None
        assert await uow.sessions.delete("s-1") is False
        assert await uow.files.delete("f-1") is False


async def test_a_second_add_of_one_object_holds_one_save_with_all_its_changes(
    client: AsyncMongoClient[dict[str, object]], transactional: bool
) -> None:
    session = _stored()
    async with _unit(client, transactional) as uow:
        two = session.add_message("user", "two")
        await uow.sessions.add(session)
        three = session.add_message("user", "three")
        await uow.sessions.add(session)
        held = [item for item in uow._held if item.session is session]
        assert len(held) == 1
        plan = held[0].plan
        assert plan is not None and plan.appends == (two, three)
        pending = await uow.sessions.get("s-1")
        assert pending is session and pending.messages[-1] == three
    # Rolled back: only what was stored before the unit of work counts as stored.
    assert session.plan_save(TOKEN).appends == (two, three)


async def test_a_rolled_back_transaction_leaves_every_change_pending(
    client: AsyncMongoClient[dict[str, object]], transactional: bool
) -> None:
    session = _stored(messages=2)
    session.edit_message(session.messages[0].message_id, content="edited")
    session.pop_message()
    async with MongoUnitOfWork(client, bind_documents(), TOKEN, transactional=True) as uow:
        await uow.sessions.add(session)
        await uow.rollback()
        # Rolled back: the unit no longer holds it, and the object was never confirmed.
        assert uow.added_sessions == {}
    plan = session.plan_save(TOKEN)
    assert (len(plan.edits), len(plan.removals), plan.revision) == (1, 1, 4)
