"""The standalone-server unit of work, without a server.

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


def _standalone(client: AsyncMongoClient[dict[str, object]]) -> MongoUnitOfWork:
    return MongoUnitOfWork(client, bind_documents(), TOKEN, transactional=False)


async def test_without_transactions_nothing_is_sent_before_commit(
    client: AsyncMongoClient[dict[str, object]],
) -> None:
    session = ChatSession.create("m", session_id="s-1")
    session.add_message("user", "hello")
    async with _standalone(client) as uow:
        await uow.sessions.add(session)
        session.add_message("user", "after add")
        await uow.sessions.add(session)
    # Rolled back: the store is not assumed to hold anything.
    assert session.unstored_messages(TOKEN) == (session.messages, False)


async def test_bad_input_is_refused_at_add_even_when_writes_wait_for_commit(
    client: AsyncMongoClient[dict[str, object]],
) -> None:
    session = ChatSession.create("m", session_id="s-1")
    session.messages.append(ChatMessage(session_id="someone-else", role="user", content="x"))
    async with _standalone(client) as uow:
        with pytest.raises(InvalidDataError, match="someone-else"):
            await uow.sessions.add(session)


async def test_a_committed_unit_of_work_cannot_be_reused(
    client: AsyncMongoClient[dict[str, object]],
) -> None:
    async with _standalone(client) as uow:
        await uow.commit()
        with pytest.raises(PersistenceError, match="already committed"):
            await uow.sessions.add(ChatSession.create("m"))


async def test_a_unit_of_work_must_be_entered(
    client: AsyncMongoClient[dict[str, object]],
) -> None:
    uow = _standalone(client)
    with pytest.raises(PersistenceError, match="async with"):
        await uow.sessions.add(ChatSession.create("m"))


async def test_without_transactions_the_unit_of_work_reads_its_own_pending_writes(
    client: AsyncMongoClient[dict[str, object]],
) -> None:
    session = ChatSession.create("m", session_id="s-1")
    session.add_message("user", "hello")
    record = file_record(file_id="f-1")
    async with _standalone(client) as uow:
        await uow.sessions.add(session)
        await uow.files.add(record)
        seen = await uow.sessions.get("s-1")
        assert seen == session and seen is not session
        assert await uow.files.get("f-1") == record

        assert await uow.sessions.delete("s-1") is True
        assert await uow.files.delete("f-1") is True
        assert await uow.sessions.get("s-1") is None
        assert await uow.files.get("f-1") is None
        assert await uow.sessions.delete("s-1") is False
        assert await uow.files.delete("f-1") is False


async def test_a_second_add_in_one_unit_of_work_holds_only_the_new_messages(
    client: AsyncMongoClient[dict[str, object]],
) -> None:
    session = ChatSession.create("m", session_id="s-1")
    session.add_message("user", "one")
    session.mark_stored(TOKEN)
    async with _standalone(client) as uow:
        session.add_message("user", "two")
        await uow.sessions.add(session)
        assert session.unstored_messages(TOKEN) == ([], True)
        added = session.add_message("user", "three")
        await uow.sessions.add(session)
        assert session.unstored_messages(TOKEN) == ([], True)
        pending = await uow.sessions.get("s-1")
        assert pending is not None and pending.messages[-1] == added
    # Rolled back: only what was stored before the unit of work counts as stored.
    assert session.unstored_messages(TOKEN) == (session.messages[1:], True)
