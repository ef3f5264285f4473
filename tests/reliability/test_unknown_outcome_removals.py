"""A message a save of unknown outcome sent, removed since by another writer.

The holder cannot tell a message its save stored and another writer removed from one
its save never stored. Before, the next save sent it again: the removal was undone.
Now, after two or more writes since the holder's base (one could be that save), a
message sent and not stored is a SessionConflictError and nothing is written, unless
no message of the session was ever removed (SQL); after one write it is certain the
save was lost, and the message is sent again.
"""

from __future__ import annotations

import logging

import pytest

from persistence import ChatSession, SessionConflictError, SessionManager, SessionStorage
from tests.reliability.unknown_outcomes import (
    new_session,
    outcomes,
    save_unknown,
    stored_as_held,
    stored_session,
)
from tests.servers import second_holder


async def _contents(storage: SessionStorage, session_id: str) -> list[str]:
    stored = await storage.load_session(session_id)
    assert stored is not None
    assert stored.message_count == len(stored.messages)
    return [message.content for message in stored.messages]


async def _rewind_elsewhere(storage: SessionStorage, session_id: str, keep: int) -> None:
    async with second_holder(storage) as other:
        theirs = await other.load_session(session_id)
        assert theirs is not None
        theirs.rewind(theirs.messages[keep - 1].message_id if keep else None)
        await other.save_session(theirs)


async def test_a_message_a_landed_save_sent_and_another_writer_removed_stays_removed(
    sql_storage: SessionStorage,
) -> None:
    session = await stored_session(sql_storage)
    sent = session.add_message("assistant", "regenerated elsewhere")
    outcomes(sql_storage, "landed")
    await save_unknown(sql_storage, session)
    await _rewind_elsewhere(sql_storage, session.session_id, keep=1)

    session.add_message("user", "next question")
    with pytest.raises(SessionConflictError) as raised:
        await sql_storage.save_session(session)

    assert raised.value.conflicts == [
        f"message {sent.message_id!r} (sent by a save of unknown outcome, not stored:"
        " another writer may have removed it)"
    ]
    assert await _contents(sql_storage, session.session_id) == ["stored"]
    # Reloaded, the holder sees the removal and goes on from it.
    reloaded = await sql_storage.load_session(session.session_id)
    assert reloaded is not None
    reloaded.add_message("user", "next question")
    assert await sql_storage.save_session(reloaded) is True
    assert await _contents(sql_storage, session.session_id) == ["stored", "next question"]


async def test_a_save_that_was_lost_then_one_other_write_sends_its_message_again(
    sql_storage: SessionStorage,
) -> None:
    """One write since the base: had it been the lost save, it would hold the message."""
    session = await stored_session(sql_storage)
    session.add_message("assistant", "lost once")
    outcomes(sql_storage, "lost")
    await save_unknown(sql_storage, session)
    async with second_holder(sql_storage) as other:
        theirs = await other.load_session(session.session_id)
        assert theirs is not None
        theirs.metadata["title"] = "another writer"
        await other.save_session(theirs)
    session.metadata["title"] = "another writer"

    await stored_as_held(sql_storage, session)


async def test_a_lost_save_then_two_other_writes_and_a_removal_is_a_conflict(
    sql_storage: SessionStorage,
) -> None:
    """The price, as for fields: the holder reloads and adds its message again."""
    session = await stored_session(sql_storage)
    sent = session.add_message("assistant", "lost")
    outcomes(sql_storage, "lost")
    await save_unknown(sql_storage, session)
    async with second_holder(sql_storage) as other:
        theirs = await other.load_session(session.session_id)
        assert theirs is not None
        theirs.add_message("assistant", "another writer's draft")
        await other.save_session(theirs)
        theirs.pop_message()
        await other.save_session(theirs)

    with pytest.raises(SessionConflictError, match=sent.message_id):
        await sql_storage.save_session(session)
    assert await _contents(sql_storage, session.session_id) == ["stored"]


async def test_a_lost_save_in_a_session_nothing_was_ever_removed_from_is_sent_again(
    sql_storage: SessionStorage,
) -> None:
    """Found by the faults test (writers appending to one session, connections
    killed): every lost save conflicted. Positions are never reused, so a session whose
    next position is its message count never lost a message: the save was lost."""
    session = await stored_session(sql_storage)
    session.add_message("assistant", "lost")
    outcomes(sql_storage, "lost")
    await save_unknown(sql_storage, session)
    async with second_holder(sql_storage) as other:
        for turn in range(3):
            theirs = await other.load_session(session.session_id)
            assert theirs is not None
            theirs.add_message("user", f"another writer {turn}")
            await other.save_session(theirs)

    assert await sql_storage.save_session(session) is True
    assert await _contents(sql_storage, session.session_id) == [
        "stored",
        "another writer 0",
        "another writer 1",
        "another writer 2",
        "lost",
    ]


@pytest.mark.parametrize("first", ["landed", "lost"])
async def test_with_no_other_writer_the_message_is_stored_once(
    sql_storage: SessionStorage, first: str
) -> None:
    """Two saves of unknown outcome of the holder's own are no other writer's writes."""
    session = await stored_session(sql_storage)
    session.add_message("assistant", "one")
    outcomes(sql_storage, first, "landed")
    await save_unknown(sql_storage, session)
    session.add_message("assistant", "two")
    await save_unknown(sql_storage, session)
    session.add_message("assistant", "three")
    await stored_as_held(sql_storage, session)


async def test_a_creation_that_landed_does_not_bring_back_a_message_removed_since(
    sql_storage: SessionStorage,
) -> None:
    session = new_session(2)
    outcomes(sql_storage, "landed")
    await save_unknown(sql_storage, session)
    await _rewind_elsewhere(sql_storage, session.session_id, keep=1)

    with pytest.raises(SessionConflictError, match=session.messages[1].message_id):
        await sql_storage.save_session(session)
    assert await _contents(sql_storage, session.session_id) == ["turn 0"]


async def test_a_creation_that_landed_alone_is_completed_with_what_it_lacks(
    sql_storage: SessionStorage,
) -> None:
    """Only the creation wrote: what it lacks was added after it, and is sent."""
    session = new_session(1)
    outcomes(sql_storage, "landed", "lost")
    await save_unknown(sql_storage, session)
    session.add_message("user", "after the creation")
    await save_unknown(sql_storage, session)
    await stored_as_held(sql_storage, session)


async def test_a_creation_merged_into_another_session_does_not_bring_back_its_message(
    sql_storage: SessionStorage,
) -> None:
    """The creation merged into another writer's session of its id, landed, and its
    message was removed there: the merge record says a merge of it landed."""
    async with second_holder(sql_storage) as other:
        theirs = ChatSession.create("m", session_id="shared")
        theirs.add_message("user", "theirs")
        await other.save_session(theirs)
    mine = ChatSession.create("m", session_id="shared")
    sent = mine.add_message("user", "mine")
    outcomes(sql_storage, "landed")
    await save_unknown(sql_storage, mine)
    await _rewind_elsewhere(sql_storage, "shared", keep=1)

    with pytest.raises(SessionConflictError, match=sent.message_id):
        await sql_storage.save_session(mine)
    assert await _contents(sql_storage, "shared") == ["theirs"]


async def test_force_sends_the_message_again(sql_storage: SessionStorage) -> None:
    """With `force` the holder's values win: what it cannot tell it sends."""
    session = await stored_session(sql_storage)
    session.add_message("assistant", "mine win")
    outcomes(sql_storage, "landed")
    await save_unknown(sql_storage, session)
    await _rewind_elsewhere(sql_storage, session.session_id, keep=1)

    assert await sql_storage.save_session(session, force=True) is True
    assert await _contents(sql_storage, session.session_id) == ["stored", "mine win"]


async def test_a_manager_resends_its_message_and_says_so(
    sql_storage: SessionStorage, caplog: pytest.LogCaptureFixture
) -> None:
    """A SessionManager resolves the conflict for its caller (its values win, README),
    logging the message it sends again at WARNING."""
    manager = SessionManager(sql_storage)
    session = await manager.create_session("m")
    session.add_message("user", "asked")
    await manager.save_session(session)
    sent = session.add_message("assistant", "answered")
    outcomes(sql_storage, "landed")
    with pytest.raises(BaseException):
        await manager.save_session(session)
    await _rewind_elsewhere(sql_storage, session.session_id, keep=1)

    with caplog.at_level(logging.WARNING, logger="persistence"):
        await manager.save_session(session)
    assert sent.message_id in caplog.text
    assert await _contents(sql_storage, session.session_id) == ["asked", "answered"]


@pytest.mark.parametrize("first", ["landed", "lost"])
async def test_edits_and_removals_after_a_creation_of_unknown_outcome_are_stored(
    sql_storage: SessionStorage, first: str
) -> None:
    """Found by attack: the retry merged as a new object does and returned True, but the
    store kept the old content and the popped message (no other writer)."""
    session = new_session(2)
    outcomes(sql_storage, first)
    await save_unknown(sql_storage, session)
    session.edit_message(session.messages[0].message_id, content="edited after")
    session.pop_message()
    session.metadata["title"] = "set after"

    await stored_as_held(sql_storage, session)


async def test_a_retried_creation_does_not_undo_what_another_writer_changed_since(
    sql_storage: SessionStorage,
) -> None:
    """Found by attack: the retry put status and a metadata key back to the values it
    had sent, silently. Now the fields and keys it sent are its own only as it sent
    them: another writer's values since are a conflict, and nothing is written."""
    session = new_session(1)
    session.metadata["title"] = "creator's"
    outcomes(sql_storage, "landed")
    await save_unknown(sql_storage, session)
    async with second_holder(sql_storage) as other:
        theirs = await other.load_session(session.session_id)
        assert theirs is not None
        theirs.status = "archived"
        theirs.metadata["title"] = "another writer's"
        await other.save_session(theirs)

    with pytest.raises(SessionConflictError) as raised:
        await sql_storage.save_session(session)
    assert raised.value.conflicts == ["status", "metadata['title']"]
    stored = await sql_storage.load_session(session.session_id)
    assert stored is not None
    assert (stored.status, stored.metadata) == ("archived", {"title": "another writer's"})


async def test_a_retried_creation_keeps_what_another_writer_added_since(
    sql_storage: SessionStorage,
) -> None:
    session = new_session(1)
    outcomes(sql_storage, "landed")
    await save_unknown(sql_storage, session)
    async with second_holder(sql_storage) as other:
        theirs = await other.load_session(session.session_id)
        assert theirs is not None
        theirs.metadata["tag"] = "theirs"
        theirs.add_message("assistant", "another writer's")
        await other.save_session(theirs)
    session.add_message("user", "the creator's next")

    assert await sql_storage.save_session(session) is True
    stored = await sql_storage.load_session(session.session_id)
    assert stored is not None
    assert stored.metadata == {"tag": "theirs"}
    assert [m.content for m in stored.messages] == [
        "turn 0",
        "another writer's",
        "the creator's next",
    ]
    assert stored.message_count == 3


async def test_a_retried_merge_that_landed_keeps_the_holders_edits(
    sql_storage: SessionStorage,
) -> None:
    """The same for a creation that merged into another writer's session of its id."""
    async with second_holder(sql_storage) as other:
        theirs = ChatSession.create("m", session_id="shared")
        theirs.add_message("user", "theirs")
        await other.save_session(theirs)
    mine = ChatSession.create("m", session_id="shared")
    sent = mine.add_message("user", "mine")
    outcomes(sql_storage, "landed")
    await save_unknown(sql_storage, mine)
    mine.edit_message(sent.message_id, content="mine, edited")

    assert await sql_storage.save_session(mine) is True
    assert await _contents(sql_storage, "shared") == ["theirs", "mine, edited"]


async def test_a_manager_keeps_its_values_over_a_retried_creation(
    sql_storage: SessionStorage,
) -> None:
    """Found by attack: rebasing a retried creation took the new object's plan, which
    carries no field or key changes, and dropped the manager's title and status."""
    manager = SessionManager(sql_storage, auto_save_enabled=False)
    session = await manager.create_session("m", metadata={"title": "t0"})
    session.add_message("user", "q")
    outcomes(sql_storage, "landed")
    with pytest.raises(BaseException):
        await manager.save_session(session)
    session.metadata["title"] = "manager's"
    session.status = "archived"
    session.add_message("user", "next")
    async with second_holder(sql_storage) as other:
        theirs = await other.load_session(session.session_id)
        assert theirs is not None
        theirs.metadata["title"] = "another writer's"
        await other.save_session(theirs)

    assert await manager.save_session(session) is True
    stored = await sql_storage.load_session(session.session_id)
    assert stored is not None
    assert (stored.metadata, stored.status) == ({"title": "manager's"}, "archived")
    assert [m.content for m in stored.messages] == ["q", "next"]


async def test_a_value_an_earlier_attempt_sent_set_back_by_another_writer_is_a_conflict(
    sql_storage: SessionStorage,
) -> None:
    """Found by attack: the creation sent "a", its retry "b", both landed; another
    writer set "a" back, and the next save wrote "b" over it, silently."""
    session = new_session(1)
    session.metadata["title"] = "a"
    outcomes(sql_storage, "landed", "landed")
    await save_unknown(sql_storage, session)
    session.metadata["title"] = "b"
    await save_unknown(sql_storage, session)
    async with second_holder(sql_storage) as other:
        theirs = await other.load_session(session.session_id)
        assert theirs is not None and theirs.metadata == {"title": "b"}
        theirs.metadata["title"] = "a"
        await other.save_session(theirs)

    session.add_message("user", "more")
    with pytest.raises(SessionConflictError, match="title"):
        await sql_storage.save_session(session)
    stored = await sql_storage.load_session(session.session_id)
    assert stored is not None and stored.metadata == {"title": "a"}


async def _landed_landed_lost(storage: SessionStorage, session: ChatSession) -> None:
    """Three saves of unknown outcome, each adding a message: two land, one is lost."""
    outcomes(storage, "landed", "landed", "lost")
    for turn in range(3):
        session.add_message("assistant", f"unknown {turn}")
        await save_unknown(storage, session)


async def _drafted_and_popped(storage: SessionStorage) -> ChatSession:
    """A stored session with a message saved, then popped (not saved yet)."""
    session = await stored_session(storage)
    session.add_message("assistant", "draft")
    await storage.save_session(session)
    session.pop_message()
    return session


async def _removed_once(storage: SessionStorage) -> ChatSession:
    """A stored session a message was removed from, loaded afresh."""
    session = await _drafted_and_popped(storage)
    await storage.save_session(session)
    loaded = await storage.load_session(session.session_id)
    assert loaded is not None
    return loaded


@pytest.mark.parametrize("fresh", [True, False], ids=["loaded", "saved"])
async def test_own_saves_of_unknown_outcome_in_a_session_with_removals_are_no_conflict(
    sql_storage: SessionStorage, fresh: bool
) -> None:
    """Found by attack: two of the holder's own saves landed and a third was lost, in a
    session a message was once removed from; with no other writer, the next save
    conflicted over the lost save's message. The removals the store counts at the
    holder's base (positions are never reused) now tell: none since, so that message
    was never stored and is sent again."""
    session = await _removed_once(sql_storage)
    if not fresh:
        # The base a save made, not a load.
        session.add_message("user", "saved base")
        await sql_storage.save_session(session)
    await _landed_landed_lost(sql_storage, session)

    await stored_as_held(sql_storage, session)


async def test_a_removal_by_another_writer_after_the_base_is_still_a_conflict(
    sql_storage: SessionStorage,
) -> None:
    """With removals at the base, one more by another writer since is seen."""
    session = await _removed_once(sql_storage)
    sent = session.add_message("assistant", "landed")
    outcomes(sql_storage, "landed")
    await save_unknown(sql_storage, session)
    await _rewind_elsewhere(sql_storage, session.session_id, keep=1)

    with pytest.raises(SessionConflictError, match=sent.message_id):
        await sql_storage.save_session(session)
    assert await _contents(sql_storage, session.session_id) == ["stored"]


@pytest.mark.parametrize("through", ["save", "unit of work"])
async def test_the_holders_own_removal_moves_its_base_count(
    sql_storage: SessionStorage, through: str
) -> None:
    """A removal the holder saved (exactly, or in a unit of work) is counted in its new
    base: saves of unknown outcome after it are no conflict with no other writer."""
    session = await _drafted_and_popped(sql_storage)
    if through == "save":
        await sql_storage.save_session(session)
    else:
        async with sql_storage.unit_of_work() as uow:
            await uow.sessions.add(session)
            await uow.commit()
    await _landed_landed_lost(sql_storage, session)

    await stored_as_held(sql_storage, session)


async def test_a_removal_by_the_holders_own_save_of_unknown_outcome_is_a_conflict(
    sql_storage: SessionStorage,
) -> None:
    """The price left: a removal that one of the holder's own saves of unknown outcome
    may have made is not told from another writer's."""
    session = await _drafted_and_popped(sql_storage)
    outcomes(sql_storage, "landed", "landed", "lost")
    await save_unknown(sql_storage, session)
    for turn in range(2):
        session.add_message("assistant", f"unknown {turn}")
        await save_unknown(sql_storage, session)

    with pytest.raises(SessionConflictError, match="sent by a save of unknown outcome"):
        await sql_storage.save_session(session)
