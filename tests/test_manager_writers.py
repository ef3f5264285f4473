"""Two SessionManagers on one store, as two server processes: nothing lost, undone or revived."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import pytest

from persistence import ChatSession, SessionStorage
from persistence.manager import SessionManager
from tests import servers
from tests.factories import conversation


async def _load(storage: SessionStorage, session_id: str) -> ChatSession:
    loaded = await storage.load_session(session_id)
    assert loaded is not None
    return loaded


async def _shared(storage: SessionStorage, turns: int = 2) -> ChatSession:
    session = conversation(turns)
    await storage.save_session(session)
    return session


async def test_a_stale_manager_keeps_another_managers_archive_and_title(
    sql_storage: SessionStorage,
) -> None:
    shared = await _shared(sql_storage)
    async with servers.second_holder(sql_storage) as other_storage:
        a, b = SessionManager(sql_storage), SessionManager(other_storage)
        in_a = await a.get_session(shared.session_id)
        in_b = await b.get_session(shared.session_id)
        assert in_a is not None and in_b is not None

        in_a.metadata["title"] = "Holiday"
        assert await a.auto_save(in_a)
        assert await a.archive_session(shared.session_id)

        in_b.add_message("user", "and the hotel?")
        assert await b.auto_save(in_b) is True
        assert not b.has_unsaved_changes(shared.session_id)

    stored = await _load(sql_storage, shared.session_id)
    assert stored.status == "archived" and stored.metadata == {"title": "Holiday"}
    assert [m.content for m in stored.messages][-1] == "and the hotel?"
    assert stored.message_count == 3


async def test_the_manager_resolves_a_conflict_and_its_own_values_win(
    sql_storage: SessionStorage, caplog: pytest.LogCaptureFixture
) -> None:
    shared = await _shared(sql_storage)
    async with servers.second_holder(sql_storage) as other_storage:
        a, b = SessionManager(sql_storage), SessionManager(other_storage)
        in_a = await a.get_session(shared.session_id)
        in_b = await b.get_session(shared.session_id)
        assert in_a is not None and in_b is not None

        in_a.metadata.update(title="A's title", tags=["a"])
        in_a.add_message("assistant", "from A")
        assert await a.auto_save(in_a)

        in_b.metadata["title"] = "B's title"
        in_b.add_message("user", "from B")
        with caplog.at_level(logging.WARNING, logger="persistence.manager"):
            assert await b.auto_save(in_b) is True

        assert "metadata['title']" in caplog.text
        # B's object now holds the merged state, and nothing is pending.
        assert in_b.metadata == {"title": "B's title", "tags": ["a"]}
        assert [m.content for m in in_b.messages][-2:] == ["from A", "from B"]
        assert not b.has_unsaved_changes(shared.session_id)

    stored = await _load(sql_storage, shared.session_id)
    assert stored.metadata == {"title": "B's title", "tags": ["a"]}
    assert [m.content for m in stored.messages] == ["message 0", "message 1", "from A", "from B"]


async def test_a_conflicting_edit_is_reapplied_over_the_reloaded_session(
    sql_storage: SessionStorage,
) -> None:
    shared = await _shared(sql_storage, turns=3)
    target = shared.messages[0].message_id
    async with servers.second_holder(sql_storage) as other_storage:
        a, b = SessionManager(sql_storage), SessionManager(other_storage)
        in_a = await a.get_session(shared.session_id)
        in_b = await b.get_session(shared.session_id)
        assert in_a is not None and in_b is not None

        in_a.edit_message(target, content="A's prompt")
        in_a.add_message("user", "after A's edit")
        assert await a.auto_save(in_a)

        in_b.edit_message(target, content="B's prompt")
        in_b.pop_message()
        assert await b.auto_save(in_b)

    stored = await _load(sql_storage, shared.session_id)
    assert [m.content for m in stored.messages] == [
        "B's prompt",
        "message 1",
        "after A's edit",
    ]
    assert stored.message_count == 3


async def test_a_session_deleted_elsewhere_is_dropped_and_never_saved_again(
    sql_storage: SessionStorage, caplog: pytest.LogCaptureFixture
) -> None:
    shared = await _shared(sql_storage)
    async with servers.second_holder(sql_storage) as other_storage:
        a, b = SessionManager(sql_storage), SessionManager(other_storage)
        in_b = await b.get_session(shared.session_id)
        assert in_b is not None
        assert await a.delete_session(shared.session_id)

        in_b.add_message("user", "hello?")
        with caplog.at_level(logging.WARNING, logger="persistence.manager"):
            assert await b.auto_save(in_b) is False
        assert "deleted by another writer" in caplog.text
        assert shared.session_id not in b.cached_session_ids
        await b.shutdown()

    assert await sql_storage.load_session(shared.session_id) is None
    assert (await sql_storage.count()).messages == 0


async def test_a_message_added_while_a_save_is_in_flight_is_not_recorded_as_saved(
    sql_storage: SessionStorage,
) -> None:
    manager = SessionManager(sql_storage)
    session = await manager.create_session("m")
    session.add_message("user", "first")
    saving = asyncio.create_task(manager.auto_save(session))
    await asyncio.sleep(0)
    session.add_message("assistant", "added during the save")
    assert await saving is True

    assert manager.has_unsaved_changes(session.session_id)
    assert (await manager.get_statistics())["unsaved_sessions"] == 1
    await manager.shutdown()

    stored = await _load(sql_storage, session.session_id)
    assert [m.content for m in stored.messages] == ["first", "added during the save"]


async def test_eviction_saves_a_message_added_while_a_save_was_in_flight(
    sql_storage: SessionStorage,
) -> None:
    manager = SessionManager(sql_storage, max_cached_sessions=1)
    first = await manager.create_session("m")
    first.add_message("user", "one")
    saving = asyncio.create_task(manager.auto_save(first))
    await asyncio.sleep(0)
    first.add_message("assistant", "two")
    await saving

    await manager.create_session("m")  # evicts `first`
    assert first.session_id not in manager.cached_session_ids
    stored = await _load(sql_storage, first.session_id)
    assert [m.content for m in stored.messages] == ["one", "two"]


async def test_get_session_last_gives_a_partial_session_that_saves(
    sql_storage: SessionStorage,
) -> None:
    shared = await _shared(sql_storage, turns=30)
    manager = SessionManager(sql_storage)

    tail = await manager.get_session(shared.session_id, last=5)
    assert tail is not None
    assert len(tail.messages) == 5 and tail.message_count == 30
    tail.add_message("user", "message 30")
    assert await manager.auto_save(tail)

    whole = await manager.get_session(shared.session_id)
    assert whole is not None and whole is not tail
    assert len(whole.messages) == 31 == whole.message_count


async def _tail_of_300(
    storage: SessionStorage,
) -> tuple[SessionManager, ChatSession, ChatSession]:
    """A manager, a stored session of 300 messages and the manager's copy of its last 5."""
    shared = await _shared(storage, turns=300)
    manager = SessionManager(storage)
    mine = await manager.get_session(shared.session_id, last=5)
    assert mine is not None
    return manager, shared, mine


def _messages_read(manager: SessionManager) -> list[int]:
    """The number of messages each load of `manager`'s storage returns, from now on."""
    read: list[int] = []
    load = manager.storage.load_session

    async def counted(session_id: str, **options: Any) -> ChatSession | None:
        loaded = await load(session_id, **options)
        read.append(0 if loaded is None else len(loaded.messages))
        return loaded

    manager.storage.load_session = counted  # type: ignore[method-assign]
    return read


async def _changed_by_another_writer(
    storage: SessionStorage,
    session_id: str,
    change: Callable[[ChatSession], object],
    *,
    last: int | None = None,
) -> None:
    """Another writer loads the session (its newest `last` messages, or all of it),
    applies `change` to its copy and saves it."""
    async with servers.second_holder(storage) as other_storage:
        theirs = await other_storage.load_session(session_id, last=last)
        assert theirs is not None
        change(theirs)
        assert await other_storage.save_session(theirs)


async def _forty_appended_by_another_writer(storage: SessionStorage, session_id: str) -> None:
    """Another writer sets metadata `k` to 1 and appends `theirs 0` to `theirs 39`: more
    than a copy of the last 5 carries, so its oldest message is pushed out of them."""

    def append_forty(theirs: ChatSession) -> None:
        theirs.metadata["k"] = 1
        for index in range(40):
            theirs.add_message("user", f"theirs {index}")

    await _changed_by_another_writer(storage, session_id, append_forty, last=1)


async def test_a_partial_copys_edit_and_rewind_resolve_a_conflict_from_its_own_part(
    sql_storage: SessionStorage,
) -> None:
    """Found by attack: a `last=` copy holding an edit or a rewind resolved a conflict
    by reloading the whole history, and carried all of it after."""
    manager, shared, mine = await _tail_of_300(sql_storage)
    await _forty_appended_by_another_writer(sql_storage, shared.session_id)

    mine.metadata["k"] = 2
    mine.edit_message(mine.messages[1].message_id, content="edited")  # message 296
    mine.rewind(mine.messages[2].message_id)  # removes messages 298 and 299
    mine.add_message("user", "mine")
    assert await manager.auto_save(mine)

    stored = await _load(sql_storage, shared.session_id)
    contents = [m.content for m in stored.messages]
    assert contents == [
        *(f"message {turn}" for turn in range(296)),
        "edited",
        "message 297",
        *(f"theirs {index}" for index in range(40)),
        "mine",
    ]
    assert stored.metadata == {"k": 2} and stored.message_count == 339
    # The copy now carries from its oldest message on, and no more.
    assert mine.omitted_messages == 295 and mine.message_count == 339
    assert [m.message_id for m in mine.messages] == [m.message_id for m in stored.messages[295:]]
    assert not manager.has_unsaved_changes(shared.session_id)


async def test_a_partial_copys_edit_of_what_another_writer_rewound_is_dropped(
    sql_storage: SessionStorage,
) -> None:
    """The messages the copy touched removed by another writer: the resolution reads
    back as far as the copy was loaded from, then the whole history once, and brings
    nothing removed back. Found by attack: a search for the copy's oldest message read
    2.6 times the history in 16 loads."""
    manager, shared, mine = await _tail_of_300(sql_storage)
    read = _messages_read(manager)

    def rewind_to_200(theirs: ChatSession) -> None:
        theirs.rewind(theirs.messages[0].message_id)  # keeps messages 0-200
        theirs.add_message("user", "theirs")

    await _changed_by_another_writer(sql_storage, shared.session_id, rewind_to_200, last=100)

    mine.edit_message(mine.messages[2].message_id, content="edited")
    mine.rewind(mine.messages[3].message_id)
    mine.add_message("user", "mine")
    assert await manager.auto_save(mine)
    assert len(read) <= 3 and sum(read) <= 5 + 202  # what it carries, then the whole

    stored = await _load(sql_storage, shared.session_id)
    assert [m.content for m in stored.messages] == [
        *(f"message {turn}" for turn in range(201)),
        "theirs",
        "mine",
    ]
    assert stored.message_count == 203 == mine.omitted_messages + len(mine.messages)


async def test_a_partial_copys_conflict_finds_the_messages_another_writer_added_back(
    sql_storage: SessionStorage,
) -> None:
    """Found by attack: another writer rewound and appended the removed messages again,
    in another order; a resolution that read only from the copy's oldest message on
    missed the others, dropped the copy's edit and left its pop undone."""
    session = conversation(10)
    await sql_storage.save_session(session)
    manager = SessionManager(sql_storage)
    mine = await manager.get_session(session.session_id, last=4)  # messages 6-9
    assert mine is not None

    def add_back_reordered(theirs: ChatSession) -> None:
        removed = theirs.rewind(theirs.messages[5].message_id)
        for index in (3, 2, 0, 1):  # messages 9, 8, 6, 7
            theirs.messages.append(removed[index])
        theirs.add_message("user", "theirs")
        theirs.metadata["k"] = 1

    await _changed_by_another_writer(sql_storage, session.session_id, add_back_reordered)

    mine.metadata["k"] = 2
    mine.edit_message(mine.messages[2].message_id, content="edited")  # message 8
    mine.pop_message()  # message 9
    assert await manager.auto_save(mine)

    stored = await _load(sql_storage, session.session_id)
    assert [m.content for m in stored.messages] == [
        *(f"message {turn}" for turn in range(6)),
        "edited",
        "message 6",
        "message 7",
        "theirs",
    ]
    assert stored.metadata == {"k": 2}


async def test_a_partial_copys_conflict_reads_a_long_history_at_most_once(
    sql_storage: SessionStorage,
) -> None:
    """Found by attack: the message the copy edited popped by another writer, who then
    appended most of the history, was looked for back to the copy's load (all those
    appends), then in the whole history: twice the history read."""
    session = conversation(10)
    await sql_storage.save_session(session)
    manager = SessionManager(sql_storage)
    mine = await manager.get_session(session.session_id, last=2)
    assert mine is not None
    read = _messages_read(manager)

    def pop_and_append_300(theirs: ChatSession) -> None:
        theirs.pop_message()
        for index in range(300):
            theirs.add_message("user", f"theirs {index}")
        theirs.metadata["k"] = 1

    await _changed_by_another_writer(sql_storage, session.session_id, pop_and_append_300)

    mine.edit_message(mine.messages[1].message_id, content="edited")
    mine.metadata["k"] = 2
    assert await manager.auto_save(mine)
    assert read == [2, 309]  # what it carries, then the whole history

    stored = await _load(sql_storage, session.session_id)
    assert [m.content for m in stored.messages][8:10] == ["message 8", "theirs 0"]
    assert stored.message_count == 309 and stored.metadata == {"k": 2}


async def test_a_partial_copy_that_popped_all_it_carried_resolves_from_its_own_part(
    sql_storage: SessionStorage,
) -> None:
    """Found by attack: a copy of the last reply that regenerated it (pop, then add)
    carried no stored message, and its conflict reloaded the whole history."""
    shared = await _shared(sql_storage, turns=300)
    manager = SessionManager(sql_storage)
    mine = await manager.get_session(shared.session_id, last=1)
    assert mine is not None
    read = _messages_read(manager)
    await _changed_by_another_writer(
        sql_storage, shared.session_id, lambda theirs: theirs.metadata.update(title="theirs")
    )

    mine.pop_message()
    mine.add_message("assistant", "regenerated")
    mine.metadata["title"] = "mine"
    assert await manager.auto_save(mine)
    assert read == [1] and mine.omitted_messages == 299

    stored = await _load(sql_storage, shared.session_id)
    assert [m.content for m in stored.messages][-2:] == ["message 298", "regenerated"]
    assert stored.message_count == 300 and stored.metadata == {"title": "mine"}


@pytest.mark.parametrize("outcome", ["landed", "lost"])
async def test_a_partial_copys_save_of_unknown_outcome_resolves_from_its_own_part(
    sql_storage: SessionStorage, outcome: str
) -> None:
    """Landed, what a save of unknown outcome sent is found among the newest messages,
    and the copy stays partial; lost, only the whole history shows it missing."""
    from tests.reliability.unknown_outcomes import outcomes, save_unknown

    manager, shared, mine = await _tail_of_300(sql_storage)
    mine.add_message("user", "sent")
    outcomes(sql_storage, outcome)
    await save_unknown(sql_storage, mine)
    await _forty_appended_by_another_writer(sql_storage, shared.session_id)

    mine.metadata["k"] = 2
    assert await manager.auto_save(mine)

    stored = await _load(sql_storage, shared.session_id)
    contents = [m.content for m in stored.messages]
    theirs_contents = [f"theirs {index}" for index in range(40)]
    turns = [f"message {turn}" for turn in range(300)]
    if outcome == "landed":
        assert contents == [*turns, "sent", *theirs_contents]
    else:
        assert contents == [*turns, *theirs_contents, "sent"]
    assert stored.metadata == {"k": 2} and mine.message_count == 341
    carried_from = 295 if outcome == "landed" else 0
    assert mine.omitted_messages == carried_from
    assert [m.message_id for m in mine.messages] == [
        m.message_id for m in stored.messages[carried_from:]
    ]


async def test_a_partial_copys_sent_message_appended_again_elsewhere_is_stored_once(
    sql_storage: SessionStorage,
) -> None:
    """A message a landed save of unknown outcome sent, appended again by another writer
    before the copy's oldest one, with as many messages before that one as at its load:
    the newest messages back to there miss it, and only the whole history shows it
    stored (on 41e63e2, a window taking it for lost sent it again, and the save failed:
    `already stored in this session`)."""
    from tests.reliability.unknown_outcomes import outcomes, save_unknown

    session = conversation(10)
    await sql_storage.save_session(session)
    manager = SessionManager(sql_storage)
    mine = await manager.get_session(session.session_id, last=4)  # messages 6-9
    assert mine is not None
    mine.add_message("user", "sent")
    outcomes(sql_storage, "landed")
    await save_unknown(sql_storage, mine)

    def add_back_sent_earlier(theirs: ChatSession) -> None:
        removed = {m.content: m for m in theirs.rewind(theirs.messages[3].message_id)}
        theirs.messages.append(removed["sent"])
        theirs.add_message("user", "X")
        theirs.messages.append(removed["message 6"])  # 6 messages before it, as at load
        for index in range(5):
            theirs.add_message("user", f"Y{index}")
        theirs.metadata["k"] = 1

    await _changed_by_another_writer(sql_storage, session.session_id, add_back_sent_earlier)

    mine.metadata["k"] = 2
    assert await manager.auto_save(mine)

    stored = await _load(sql_storage, session.session_id)
    assert [m.content for m in stored.messages] == [
        *(f"message {turn}" for turn in range(4)),
        "sent",
        "X",
        "message 6",
        *(f"Y{index}" for index in range(5)),
    ]
    assert stored.metadata == {"k": 2}


async def test_cleanup_expires_idle_cached_sessions_and_keeps_a_used_one_active(
    sql_storage: SessionStorage,
) -> None:
    from datetime import timedelta

    from persistence.clock import utc_now

    old = conversation(1)
    old.updated_at = utc_now() - timedelta(hours=100)
    await sql_storage.save_session(old)
    manager = SessionManager(sql_storage, auto_save_enabled=False, expiry_hours=72)
    idle = await manager.get_session(old.session_id)
    used = await manager.get_session(old.session_id)
    assert idle is used is not None

    assert await manager.cleanup_expired_sessions() == 1
    assert used.status == "expired"
    assert not manager.has_unsaved_changes(old.session_id)

    # A copy used after its stored activity went stale keeps its own status.
    other = conversation(1)
    other.updated_at = utc_now() - timedelta(hours=100)
    await sql_storage.save_session(other)
    active = await manager.get_session(other.session_id)
    assert active is not None
    active.add_message("user", "back again")
    assert await manager.cleanup_expired_sessions() == 1
    assert active.status == "active"
    await manager.save_session(active)
    assert (await _load(sql_storage, other.session_id)).status == "active"


async def test_cleanup_leaves_a_copy_active_that_another_holder_kept_in_use(
    sql_storage: SessionStorage,
) -> None:
    """Found by review: the sweep judged the cached copy by its own last save, marked it
    expired although the store (another holder had used it since) did not expire it,
    and the copy's next save expired it in the store."""
    from datetime import timedelta

    from persistence.clock import utc_now

    shared = conversation(1)
    shared.updated_at = utc_now() - timedelta(hours=100)
    await sql_storage.save_session(shared)
    manager = SessionManager(sql_storage, auto_save_enabled=True, expiry_hours=72)
    cached = await manager.get_session(shared.session_id)
    assert cached is not None
    async with servers.second_holder(sql_storage) as other_storage:
        in_use = await _load(other_storage, shared.session_id)
        in_use.add_message("user", "still here")
        assert await other_storage.save_session(in_use)

    assert await manager.cleanup_expired_sessions() == 0

    assert cached.status == "active"
    cached.add_message("user", "a reply through the manager")
    assert await manager.save_session(cached)
    stored = await _load(sql_storage, shared.session_id)
    assert (stored.status, len(stored.messages)) == ("active", 3)
