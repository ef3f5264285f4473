"""iter_search_messages: a search's matches in batches, newest first, each batch below
the last message of the one before."""

from __future__ import annotations

from typing import Any

import pytest

from persistence import ChatSession, InvalidDataError, SessionStorage

SESSIONS = 6
PER_SESSION = 250


def _content(number: int) -> str:
    """Every message holds `common`; every 40th `rare`; only the first and last 5 of the
    store `edges` (the index must find the oldest, far below the newest)."""
    words = ["common", f"n{number}"]
    if number % 40 == 0:
        words.append("rare")
    if number < 5 or number >= SESSIONS * PER_SESSION - 5:
        words.append("edges")
    return " ".join(words)


@pytest.fixture
async def stored(storage: SessionStorage) -> list[tuple[str, str, str]]:
    """(message id, session id, content) of every message, in stored order."""
    order = []
    for index in range(SESSIONS):
        session = ChatSession.create("m", session_id=f"s{index}")
        for number in range(index * PER_SESSION, (index + 1) * PER_SESSION):
            session.add_message("user" if number % 2 else "assistant", _content(number))
        await storage.save_session(session)
        order += [(m.message_id, m.session_id, m.content) for m in session.messages]
    return order


async def _batches(
    storage: SessionStorage, query: str, size: int, **options: Any
) -> list[list[str]]:
    return [
        [m.message_id for m in batch]
        async for batch in storage.iter_search_messages(query, size, **options)
    ]


def _expected(
    stored: list[tuple[str, str, str]], word: str, session_id: str | None = None
) -> list[str]:
    return [
        message_id
        for message_id, session, content in reversed(stored)
        if word in content.split() and session_id in (None, session)
    ]


@pytest.mark.parametrize("query", ["common", "rare", "edges", "absent"])
@pytest.mark.parametrize("size", [7, 64, 2000])
async def test_batches_hold_every_match_once_newest_first(
    storage: SessionStorage, stored: list[tuple[str, str, str]], query: str, size: int
) -> None:
    expected = _expected(stored, query)

    batches = await _batches(storage, query, size)

    assert [m for batch in batches for m in batch] == expected
    assert all(0 < len(batch) <= size for batch in batches)
    assert len(batches) == -(-len(expected) // size)
    whole = await storage.search_messages(query, len(stored))
    assert [m.message_id for m in whole] == expected


async def test_batches_in_one_session_and_up_to_a_limit(
    storage: SessionStorage, stored: list[tuple[str, str, str]]
) -> None:
    in_session = _expected(stored, "common", "s2")

    assert [m for b in await _batches(storage, "common", 9, session_id="s2") for m in b] == (
        in_session
    )
    limited = await _batches(storage, "common", 9, session_id="s2", limit=20)
    assert [len(batch) for batch in limited] == [9, 9, 2]
    assert [m for batch in limited for m in batch] == in_session[:20]
    assert await _batches(storage, "rare", 5, limit=0) == []
    assert await _batches(storage, "common", 5, session_id="missing") == []
    by_role = await _batches(storage, "rare", 4, role="assistant")
    assert [m for batch in by_role for m in batch] == _expected(stored, "rare")


async def test_a_message_stored_while_batches_are_read_is_left_out(
    storage: SessionStorage, stored: list[tuple[str, str, str]]
) -> None:
    seen: list[str] = []
    late = ChatSession.create("m", session_id="late")
    late.add_message("user", "common rare edges written meanwhile")
    async for batch in storage.iter_search_messages("rare", 10):
        seen += [m.message_id for m in batch]
        if len(seen) == 10:
            await storage.save_session(late)

    assert seen == _expected(stored, "rare")
    assert (await storage.search_messages("meanwhile"))[0].session_id == "late"


@pytest.mark.parametrize(
    ("arguments", "named"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": "2"}, "batch_size"),
        ({"limit": -1}, "limit"),
        ({"role": "robot"}, "role"),
        ({"query": 5}, "query"),
        ({"session_id": 5}, "session_id"),
    ],
)
async def test_bad_arguments_are_named(
    storage: SessionStorage, arguments: dict[str, Any], named: str
) -> None:
    call: dict[str, Any] = {"query": "common", **arguments}
    with pytest.raises(InvalidDataError, match=named):
        async for _ in storage.iter_search_messages(**call):
            pass


async def test_batches_of_a_session_end_when_it_is_created_again(
    storage: SessionStorage, stored: list[tuple[str, str, str]]
) -> None:
    """Found by attack: a session deleted and created again under its id starts its
    positions again, and the batches went on into the new session's messages."""
    seen: list[str] = []
    async for batch in storage.iter_search_messages("common", 100, session_id="s3"):
        seen += [m.message_id for m in batch]
        if len(seen) == 100:
            assert await storage.delete_session("s3")
            again = ChatSession.create("m", session_id="s3")
            for number in range(PER_SESSION):
                again.add_message("user", f"common again {number}")
            await storage.save_session(again)

    assert seen == _expected(stored, "common", "s3")[:100]
    again_found = await storage.search_messages("again", 1000, session_id="s3")
    assert len(again_found) == PER_SESSION
