"""insert_sessions: the bulk path of migrations and imports, on every backend."""

from __future__ import annotations

import pytest

from persistence import ChatMessage, ChatSession, InvalidDataError, SessionStorage
from tests.contract.conftest import Reopen


def _session(session_id: str, messages: int, prefix: str = "") -> ChatSession:
    session = ChatSession.create("gemini", session_id=session_id, metadata={"k": [1, 2.5]})
    for turn in range(messages):
        session.add_message(
            "user" if turn % 2 else "assistant",
            f"{prefix}turn {turn} of {session_id} marmalade{turn}",
            {"turn": turn} if turn % 3 else None,
        )
    return session


async def test_inserted_sessions_read_back_exactly_and_are_searchable(
    storage: SessionStorage, reopen: Reopen
) -> None:
    batch = [_session(f"s{n}", n) for n in range(5)]

    assert await storage.insert_sessions(batch) is True

    async with reopen(storage) as other:
        assert await other.load_sessions([s.session_id for s in batch]) == batch
        found = await other.search_messages("marmalade3")
        assert sorted(m.message_id for m in found) == sorted(
            s.messages[3].message_id for s in batch if len(s.messages) > 3
        )
        assert (await other.count()).messages == sum(range(5))


async def test_an_inserted_session_takes_appends_like_any_other(storage: SessionStorage) -> None:
    await storage.insert_sessions([_session("s", 3)])
    loaded = await storage.load_session("s")
    assert loaded is not None

    loaded.add_message("user", "after the bulk insert")
    await storage.save_session(loaded)

    again = await storage.load_session("s")
    assert again is not None
    assert [m.content for m in again.messages][-2:] == [
        "turn 2 of s marmalade2",
        "after the bulk insert",
    ]
    assert again.message_count == 4


async def test_a_batch_holding_a_stored_session_id_writes_nothing(
    storage: SessionStorage, reopen: Reopen
) -> None:
    await storage.save_session(_session("taken", 1))

    assert await storage.insert_sessions([_session("new", 2), _session("taken", 2, "x")]) is False

    async with reopen(storage) as other:
        assert await other.load_session("new") is None
        taken = await other.load_session("taken")
        assert taken is not None and taken.message_count == 1


async def test_a_batch_holding_a_stored_message_id_writes_nothing(
    storage: SessionStorage, reopen: Reopen
) -> None:
    owner = _session("owner", 1)
    await storage.save_session(owner)
    clash = ChatSession.create("m", session_id="clash")
    clash.messages.append(
        ChatMessage(
            message_id=owner.messages[0].message_id, session_id="clash", role="user", content="x"
        )
    )
    clash.message_count = 1

    assert await storage.insert_sessions([_session("first", 2), clash]) is False

    async with reopen(storage) as other:
        assert await other.load_sessions(["first", "clash"]) == []


@pytest.mark.parametrize("problem", ["foreign message", "repeated message", "repeated session"])
async def test_a_batch_that_could_never_be_stored_is_refused_before_writing(
    storage: SessionStorage, problem: str
) -> None:
    first, second = _session("a", 2), _session("b", 2)
    if problem == "foreign message":
        second.messages.append(first.messages[0])
    elif problem == "repeated message":
        second.messages.append(second.messages[0])
    else:
        second = _session("a", 1)

    with pytest.raises(InvalidDataError, match=r"session_id|appears twice"):
        await storage.insert_sessions([first, second])

    assert await storage.load_sessions(["a", "b"]) == []


async def test_an_empty_batch_is_a_no_op(storage: SessionStorage) -> None:
    assert await storage.insert_sessions([]) is True
    assert (await storage.count()).total_sessions == 0
