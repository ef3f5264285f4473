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


# Values a bulk path could mangle: COPY's and CSV's special characters, every plane of
# Unicode, empty and long text, and metadata of every JSON type.
_HOSTILE_CONTENTS = [
    "tab\there, newline\nthere, carriage\rreturn",
    "back\\slash \\N \\. end-of-copy marker alone on a line:\n\\.\n",
    "quotes ' \" ` and a comma, ; semicolon",
    "emoji 😀🧪 astral \U0001d518\U0001d52b, CJK 漢字かなカナ,"
    " RTL עברית العربية, e\u0301 combining",
    "",
    "x" * 100_000,
]
_HOSTILE_METADATA = {
    "nested": {"list": [1, -2, 3.25, None, True, False, "s", {"deep": ["é"]}]},
    "big": 2**62,
    "negative": -(2**62),
    "float": 1e-300,
    "unicode key ключ": "värde",
    "empty": {},
    "empty list": [],
}


async def test_a_large_batch_of_hostile_values_reads_back_exactly(
    storage: SessionStorage, reopen: Reopen
) -> None:
    # Enough sessions and messages that every backend takes its bulk form for both, and
    # PostgreSQL's COPY of the messages goes in three parts (bulk.copied_parts).
    batch = [_session(f"s{n:02d}", 1) for n in range(64)]
    long = batch[0]
    long.metadata = dict(_HOSTILE_METADATA)
    for turn in range(300):
        content = _HOSTILE_CONTENTS[turn % len(_HOSTILE_CONTENTS)]
        long.add_message("tool" if turn % 5 == 0 else "user", content, _HOSTILE_METADATA)

    assert await storage.insert_sessions(batch) is True

    async with reopen(storage) as other:
        assert await other.load_sessions([s.session_id for s in batch]) == batch
        found = await other.search_messages("עברית")
        assert len(found) == len([c for c in long.messages if "עברית" in c.content]) > 0


async def test_a_large_batch_holding_a_stored_message_id_writes_nothing(
    storage: SessionStorage, reopen: Reopen
) -> None:
    owner = _session("owner", 1)
    await storage.save_session(owner)
    batch = [_session(f"s{n:02d}", 2) for n in range(64)]
    # The last message of the last session is already stored: the bulk write fails late.
    last = batch[-1]
    last.messages.append(owner.messages[0].model_copy(update={"session_id": last.session_id}))
    last.message_count += 1

    assert await storage.insert_sessions(batch) is False

    async with reopen(storage) as other:
        assert await other.load_sessions([s.session_id for s in batch]) == []
        assert (await other.count()).total_sessions == 1
