"""Saving, loading, listing and deleting sessions: the same on every backend."""

from __future__ import annotations

import asyncio
import copy
import pickle
from datetime import UTC, datetime, timedelta

import pytest

from persistence import ChatSession, InvalidDataError, SessionDeletedError, SessionStorage
from tests.factories import conversation


async def test_load_returns_what_was_saved(storage: SessionStorage) -> None:
    session = conversation(3, metadata={"user": "ada", "tags": ["a", "b"]})
    assert await storage.save_session(session) is True

    loaded = await storage.load_session(session.session_id)

    assert loaded == session
    assert loaded is not None and loaded.message_count == 3


async def test_load_of_unknown_session_is_none(storage: SessionStorage) -> None:
    assert await storage.load_session("no-such-session") is None


async def test_saving_twice_stores_nothing_twice(storage: SessionStorage) -> None:
    session = conversation(2)
    await storage.save_session(session)
    await storage.save_session(session)

    loaded = await storage.load_session(session.session_id)
    assert loaded is not None
    assert [m.message_id for m in loaded.messages] == [m.message_id for m in session.messages]
    assert loaded.message_count == 2


async def test_a_copy_of_a_saved_session_saved_again_adds_nothing(storage: SessionStorage) -> None:
    session = conversation(2)
    await storage.save_session(session)
    stranger = ChatSession.model_validate(session.model_dump())

    await storage.save_session(stranger)

    loaded = await storage.load_session(session.session_id)
    assert loaded is not None and loaded.message_count == 2 and len(loaded.messages) == 2


async def test_save_after_add_message_appends_in_order(storage: SessionStorage) -> None:
    session = conversation(1)
    await storage.save_session(session)
    for turn in range(5):
        session.add_message("assistant", f"reply {turn}")
        await storage.save_session(session)

    loaded = await storage.load_session(session.session_id)
    assert loaded is not None
    assert [m.content for m in loaded.messages] == ["message 0"] + [f"reply {i}" for i in range(5)]
    assert loaded.message_count == 6
    assert loaded.updated_at == session.updated_at


async def test_save_updates_the_session_fields(storage: SessionStorage) -> None:
    session = conversation(1)
    await storage.save_session(session)
    session.model = "gemini-2.5-pro"
    session.metadata = {"title": "renamed"}
    session.status = "archived"

    await storage.save_session(session)

    loaded = await storage.load_session(session.session_id)
    assert loaded is not None
    assert (loaded.model, loaded.metadata, loaded.status) == (
        "gemini-2.5-pro",
        {"title": "renamed"},
        "archived",
    )


async def test_save_never_deletes_messages_the_object_does_not_carry(
    storage: SessionStorage,
) -> None:
    session = conversation(3)
    await storage.save_session(session)
    partial = ChatSession.model_validate(
        session.model_dump() | {"messages": session.model_dump()["messages"][:1]}
    )

    await storage.save_session(partial)

    loaded = await storage.load_session(session.session_id)
    assert loaded is not None and len(loaded.messages) == 3 and loaded.message_count == 3


async def test_messages_with_equal_timestamps_keep_insertion_order(
    storage: SessionStorage,
) -> None:
    moment = datetime(2025, 10, 16, 10, 0, tzinfo=UTC)
    session = ChatSession.create("m")
    session.messages = [
        session.add_message("user", str(i)).model_copy(update={"created_at": moment})
        for i in range(20)
    ]
    # Reversed ids: an order by id or by time would show up here.
    session.messages = [
        m.model_copy(update={"message_id": f"{99 - i:02d}"}) for i, m in enumerate(session.messages)
    ]
    await storage.save_session(session)

    loaded = await storage.load_session(session.session_id)
    assert loaded is not None
    assert [m.content for m in loaded.messages] == [str(i) for i in range(20)]


async def test_two_writers_of_one_session_both_keep_their_messages(
    storage: SessionStorage,
) -> None:
    session = conversation(2)
    await storage.save_session(session)
    first = await storage.load_session(session.session_id)
    second = await storage.load_session(session.session_id)
    assert first is not None and second is not None

    first.add_message("user", "from the first writer")
    second.add_message("user", "from the second writer")
    await storage.save_session(first)
    await storage.save_session(second)

    loaded = await storage.load_session(session.session_id)
    assert loaded is not None
    assert [m.content for m in loaded.messages][2:] == [
        "from the first writer",
        "from the second writer",
    ]
    assert loaded.message_count == 4


async def test_concurrent_appends_lose_nothing(storage: SessionStorage) -> None:
    session = conversation(0)
    await storage.save_session(session)
    writers = [await storage.load_session(session.session_id) for _ in range(8)]

    async def append(index: int, writer: ChatSession | None) -> None:
        assert writer is not None
        for turn in range(5):
            writer.add_message("user", f"writer {index} turn {turn}")
            await storage.save_session(writer)

    await asyncio.gather(*(append(i, w) for i, w in enumerate(writers)))

    loaded = await storage.load_session(session.session_id)
    assert loaded is not None
    assert loaded.message_count == len(loaded.messages) == 40
    for index in range(8):
        mine = [m.content for m in loaded.messages if m.content.startswith(f"writer {index} ")]
        assert mine == [f"writer {index} turn {turn}" for turn in range(5)]


async def test_a_message_id_of_another_session_is_refused(storage: SessionStorage) -> None:
    owner = conversation(1)
    await storage.save_session(owner)
    thief = ChatSession.create("m")
    thief.messages.append(owner.messages[0].model_copy(update={"session_id": thief.session_id}))

    with pytest.raises(InvalidDataError, match="another session"):
        await storage.save_session(thief)

    assert await storage.load_session(thief.session_id) is None


async def test_a_message_of_another_session_object_is_refused(storage: SessionStorage) -> None:
    session = conversation(1)
    session.messages.append(conversation(1).messages[0])

    with pytest.raises(InvalidDataError, match="session_id"):
        await storage.save_session(session)

    assert await storage.load_session(session.session_id) is None


async def test_delete_removes_the_session_and_its_messages(storage: SessionStorage) -> None:
    session = conversation(3)
    keep = conversation(1)
    await storage.save_session(session)
    await storage.save_session(keep)

    assert await storage.delete_session(session.session_id) is True
    assert await storage.delete_session(session.session_id) is False

    assert await storage.load_session(session.session_id) is None
    counts = await storage.count()
    assert counts.messages == 1 and counts.total_sessions == 1
    assert await storage.search_messages("message") == keep.messages


async def test_a_deleted_session_is_not_brought_back_by_the_object_that_saved_it(
    storage: SessionStorage,
) -> None:
    session = conversation(2)
    await storage.save_session(session)
    await storage.delete_session(session.session_id)

    with pytest.raises(SessionDeletedError):
        await storage.save_session(session)
    session.add_message("user", "still there?")
    with pytest.raises(SessionDeletedError):
        await storage.save_session(session)

    assert await storage.load_session(session.session_id) is None


async def test_a_new_object_under_a_deleted_id_creates_a_new_session(
    storage: SessionStorage,
) -> None:
    session = conversation(2)
    await storage.save_session(session)
    await storage.delete_session(session.session_id)

    again = ChatSession.create("m", session_id=session.session_id)
    again.add_message("user", "a fresh start")
    await storage.save_session(again)

    loaded = await storage.load_session(session.session_id)
    assert loaded is not None
    assert [m.content for m in loaded.messages] == ["a fresh start"]
    assert loaded.message_count == 1


async def test_list_sessions_pages_newest_first_with_counts_and_no_messages(
    storage: SessionStorage,
) -> None:
    base = datetime(2025, 1, 1, tzinfo=UTC)
    for index in range(7):
        session = conversation(index % 3)
        session.updated_at = base + timedelta(minutes=index)
        await storage.save_session(session)

    page = await storage.list_sessions(limit=3)
    rest = await storage.list_sessions(limit=10, offset=3)

    times = [s.updated_at for s in page + rest]
    assert times == sorted(times, reverse=True) and len(times) == 7
    assert all(s.messages == [] for s in page + rest)
    assert [s.message_count for s in page] == [6 % 3, 5 % 3, 4 % 3]


async def test_list_sessions_breaks_ties_by_session_id_so_pages_are_stable(
    storage: SessionStorage,
) -> None:
    moment = datetime(2025, 1, 1, tzinfo=UTC)
    for index in range(6):
        session = conversation(0, session_id=f"s-{index}")
        session.updated_at = moment
        await storage.save_session(session)

    pages = [await storage.list_sessions(limit=2, offset=offset) for offset in (0, 2, 4)]

    ids = [s.session_id for page in pages for s in page]
    assert ids == [f"s-{i}" for i in reversed(range(6))]


async def test_pages_after_a_session_follow_it_in_the_page_order(storage: SessionStorage) -> None:
    """`after`: the page that follows a session listed before; ties in updated_at go by
    session_id across the pages, with a status too, and `offset` counts from there."""
    moment = datetime(2025, 1, 1, tzinfo=UTC)
    for index in range(9):
        session = conversation(0, session_id=f"s-{index}")
        session.updated_at = moment + timedelta(minutes=index // 3)  # three at a time
        session.status = "archived" if index % 2 else "active"
        await storage.save_session(session)

    for status in (None, "active", "archived"):
        whole = [s.session_id for s in await storage.list_sessions(status=status)]
        walked: list[str] = []
        page = await storage.list_sessions(status=status, limit=2)
        while page:
            walked += [s.session_id for s in page]
            page = await storage.list_sessions(status=status, limit=2, after=page[-1])
        assert walked == whole and len(set(walked)) == len(walked)
    first = (await storage.list_sessions(limit=1))[0]
    skipped = await storage.list_sessions(limit=2, offset=2, after=first)
    assert [s.session_id for s in skipped] == ["s-5", "s-4"]


async def test_pages_after_a_session_neither_repeat_nor_skip_what_stays_while_others_change(
    storage: SessionStorage,
) -> None:
    """Found by attack: paged by offset, sessions written during a listing moved to
    its top and pushed others back, which were listed twice; a deletion pulls them
    forward, past the next page's start."""
    base = datetime(2025, 1, 1, tzinfo=UTC)
    for index in range(8):
        session = conversation(1, session_id=f"s-{index}")
        session.updated_at = base + timedelta(minutes=index)
        await storage.save_session(session)

    first = await storage.list_sessions(limit=3)
    assert [s.session_id for s in first] == ["s-7", "s-6", "s-5"]
    touched = await storage.load_session("s-1")
    assert touched is not None
    touched.add_message("user", "written during the listing")
    await storage.save_session(touched)  # now the newest
    assert await storage.delete_session("s-6")
    rest = await storage.list_sessions(limit=10, after=first[-1])

    assert [s.session_id for s in rest] == ["s-4", "s-3", "s-2", "s-0"]


async def test_a_walk_that_saves_each_listed_session_lists_each_once(
    storage: SessionStorage,
) -> None:
    """Found by attack: the page after a session started where it was then, not where
    it was listed, so a walk that saved each session it listed restarted at the top
    with every page and never ended."""
    base = datetime(2025, 1, 1, tzinfo=UTC)
    for index in range(9):
        session = conversation(0, session_id=f"s-{index}")
        session.updated_at = base + timedelta(minutes=index)
        await storage.save_session(session)

    walked: list[str] = []
    page = await storage.list_sessions(limit=3)
    while page and len(walked) < 30:
        walked += [s.session_id for s in page]
        for listed in page:
            listed.add_message("system", "seen by the walk")
            await storage.save_session(listed)
        page = await storage.list_sessions(limit=3, after=page[-1])

    assert walked == [f"s-{index}" for index in reversed(range(9))]


async def test_list_sessions_refuses_an_after_that_is_not_a_session(
    storage: SessionStorage,
) -> None:
    with pytest.raises(InvalidDataError, match="after"):
        await storage.list_sessions(after="s-1")  # type: ignore[arg-type]


async def test_list_sessions_filters_by_status(storage: SessionStorage) -> None:
    active, archived = conversation(1), conversation(1)
    archived.status = "archived"
    await storage.save_session(active)
    await storage.save_session(archived)

    assert [s.session_id for s in await storage.list_sessions(status="archived")] == [
        archived.session_id
    ]
    assert [s.session_id for s in await storage.list_sessions(status="active")] == [
        active.session_id
    ]


@pytest.mark.parametrize(
    ("arguments", "named"),
    [({"status": "deleted"}, "status"), ({"limit": -1}, "limit"), ({"offset": -5}, "offset")],
)
async def test_list_sessions_refuses_bad_arguments(
    storage: SessionStorage, arguments: dict[str, object], named: str
) -> None:
    with pytest.raises(ValueError, match=named):
        await storage.list_sessions(**arguments)  # type: ignore[arg-type]


async def test_a_listed_session_deep_copies_and_pickles_and_saves(storage: SessionStorage) -> None:
    """Found by attack: a session from a PostgreSQL listing kept asyncpg's row for its
    bookkeeping until first used, so `copy.deepcopy`, `model_copy(deep=True)` and
    pickling raised a raw TypeError naming asyncpg's Record."""
    session = conversation(1)
    await storage.save_session(session)
    for make in (
        copy.deepcopy,
        lambda listed: listed.model_copy(deep=True),
        lambda listed: pickle.loads(pickle.dumps(listed)),  # our own bytes
    ):
        (listed,) = [s for s in await storage.list_sessions() if s.session_id == session.session_id]
        copied = make(listed)
        assert copied == listed
        copied.add_message("user", "from the copy")
        assert await storage.save_session(copied) is True
    stored = await storage.load_session(session.session_id)
    assert stored is not None and stored.message_count == len(session.messages) + 3
