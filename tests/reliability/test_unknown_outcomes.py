"""Saves whose outcome the holder never learns: what the next saves make of them.

A save cut off after its transaction committed ("landed") or before anything was sent
("lost") raises, and the object cannot tell which happened. Here each outcome is
made exactly: the storage's own runner does the work, then raises CancelledError, as
a cancel arriving just after the commit does (tests/reliability/test_faults_cancel.py
finds the same cases by cancelling at every step). Whatever the object does after,
the next save leaves the store holding what the object holds, and takes nothing it
sent itself for another writer's work (no SessionConflictError).
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import text

from persistence import ChatSession, SessionConflictError, SessionDeletedError, SessionStorage
from tests.reliability.unknown_outcomes import (
    new_session,
    outcomes,
    save_unknown,
    stored_as_held,
    stored_session,
)
from tests.servers import second_holder


@pytest.mark.parametrize("first", ["landed", "lost"])
async def test_a_message_sent_then_edited_by_a_save_that_was_lost_is_stored_edited(
    sql_storage: SessionStorage, first: str
) -> None:
    session = await stored_session(sql_storage)
    sent = session.add_message("assistant", "first draft")
    outcomes(sql_storage, first, "lost")
    await save_unknown(sql_storage, session)
    session.edit_message(sent.message_id, content="second draft")
    await save_unknown(sql_storage, session)
    session.edit_message(sent.message_id, content="third draft")
    await stored_as_held(sql_storage, session)


@pytest.mark.parametrize("first", ["landed", "lost"])
async def test_changing_again_what_a_save_of_unknown_outcome_sent_is_no_conflict(
    sql_storage: SessionStorage, first: str
) -> None:
    session = await stored_session(sql_storage)
    stored = session.messages[0]
    session.metadata["title"] = "one"
    session.status = "archived"
    session.edit_message(stored.message_id, content="edited once")
    outcomes(sql_storage, first)
    await save_unknown(sql_storage, session)
    session.metadata["title"] = "two"
    session.status = "active"
    session.edit_message(stored.message_id, content="edited twice")
    await stored_as_held(sql_storage, session)


@pytest.mark.parametrize("first", ["landed", "lost"])
async def test_what_a_save_of_unknown_outcome_sent_is_undone_when_the_holder_undoes_it(
    sql_storage: SessionStorage, first: str
) -> None:
    session = await stored_session(sql_storage)
    session.metadata["title"] = "one"
    session.add_message("assistant", "to be popped")
    outcomes(sql_storage, first)
    await save_unknown(sql_storage, session)
    del session.metadata["title"]
    session.pop_message()
    await stored_as_held(sql_storage, session)


async def test_a_value_a_landed_save_set_and_another_writer_set_back_is_a_conflict(
    sql_storage: SessionStorage,
) -> None:
    """Found by attack: the holder's next save took the old value it found for
    "nobody changed it" and wrote its own again, undoing the other writer's change."""
    session = await stored_session(sql_storage)
    session.status = "archived"
    session.metadata["pinned"] = True
    outcomes(sql_storage, "landed")
    await save_unknown(sql_storage, session)
    other = await sql_storage.load_session(session.session_id)
    assert other is not None and (other.status, other.metadata) == ("archived", {"pinned": True})
    other.status = "active"
    del other.metadata["pinned"]
    await sql_storage.save_session(other)

    session.add_message("user", "only an append")
    with pytest.raises(SessionConflictError) as raised:
        await sql_storage.save_session(session)

    assert raised.value.conflicts == ["status", "metadata['pinned']"]
    stored = await sql_storage.load_session(session.session_id)
    assert stored is not None
    assert (stored.status, stored.metadata, stored.message_count) == ("active", {}, 1)


@pytest.mark.parametrize("first", ["landed", "lost"])
async def test_after_one_write_of_another_the_old_value_says_the_save_was_lost(
    sql_storage: SessionStorage, first: str
) -> None:
    """One write since the base: had it been the holder's save, the value would be the
    one it sent; so the old value found means that save was lost, and it is sent again."""
    session = await stored_session(sql_storage)
    session.status = "archived"
    outcomes(sql_storage, first)
    await save_unknown(sql_storage, session)
    if first == "lost":
        other = await sql_storage.load_session(session.session_id)
        assert other is not None
        other.metadata["by"] = "another writer"
        await sql_storage.save_session(other)
        session.metadata["by"] = "another writer"  # the same value: no conflict either
    await stored_as_held(sql_storage, session)


async def test_after_two_writes_of_others_the_old_value_cannot_tell_and_is_a_conflict(
    sql_storage: SessionStorage,
) -> None:
    """The price of the rule above: a lost save, then two writes of others that left
    the value alone, look like a landed save set back. The holder reloads."""
    session = await stored_session(sql_storage)
    session.status = "archived"
    outcomes(sql_storage, "lost")
    await save_unknown(sql_storage, session)
    for turn in range(2):
        other = await sql_storage.load_session(session.session_id)
        assert other is not None
        other.add_message("user", f"another writer {turn}")
        await sql_storage.save_session(other)

    with pytest.raises(SessionConflictError, match="status"):
        await sql_storage.save_session(session)
    stored = await sql_storage.load_session(session.session_id)
    assert stored is not None and stored.status == "active"


@pytest.mark.parametrize("messages", [0, 2])
async def test_a_creation_that_landed_and_was_deleted_meanwhile_stays_deleted(
    sql_storage: SessionStorage, messages: int
) -> None:
    """Found by attack: the next save found no row and created the session again."""
    session = new_session(messages)
    outcomes(sql_storage, "landed")
    await save_unknown(sql_storage, session)
    async with second_holder(sql_storage) as other:
        assert await other.delete_session(session.session_id) is True

    session.add_message("user", "after the delete")
    with pytest.raises(SessionDeletedError):
        await sql_storage.save_session(session)
    assert await sql_storage.load_session(session.session_id) is None
    # The refusal is for good, as for any holder of a deleted session.
    with pytest.raises(SessionDeletedError):
        await sql_storage.save_session(session)


async def test_a_creation_that_landed_is_not_confused_with_a_new_session_of_its_id(
    sql_storage: SessionStorage,
) -> None:
    """Deleted, then created again by another writer: this object's session is gone,
    and the other's new one is left as it was."""
    session = new_session(1)
    outcomes(sql_storage, "landed")
    await save_unknown(sql_storage, session)
    async with second_holder(sql_storage) as other:
        assert await other.delete_session(session.session_id) is True
        again = ChatSession.create("another", session_id=session.session_id)
        again.add_message("user", "another writer's")
        await other.save_session(again)

    with pytest.raises(SessionDeletedError):
        await sql_storage.save_session(session)
    stored = await sql_storage.load_session(session.session_id)
    assert stored is not None
    assert (stored.model, [m.content for m in stored.messages]) == (
        "another",
        ["another writer's"],
    )


@pytest.mark.parametrize("first", ["landed", "lost"])
async def test_a_creation_of_unknown_outcome_is_completed_by_the_next_save(
    sql_storage: SessionStorage, first: str
) -> None:
    session = new_session(2)
    outcomes(sql_storage, first)
    await save_unknown(sql_storage, session)
    session.add_message("user", "after")
    await stored_as_held(sql_storage, session)


async def test_a_lost_creation_merges_into_a_session_another_writer_created_under_its_id(
    sql_storage: SessionStorage,
) -> None:
    """Never landed: the object is a new object under an id the store holds (merged),
    whoever deleted what before."""
    session = new_session(1)
    outcomes(sql_storage, "lost")
    await save_unknown(sql_storage, session)
    async with second_holder(sql_storage) as other:
        first = ChatSession.create("another", session_id=session.session_id)
        await other.save_session(first)
        assert await other.delete_session(session.session_id) is True
        await other.save_session(ChatSession.create("another", session_id=session.session_id))

    assert await sql_storage.save_session(session) is True
    stored = await sql_storage.load_session(session.session_id)
    assert stored is not None
    assert [m.message_id for m in stored.messages] == [m.message_id for m in session.messages]


async def test_every_delete_of_a_session_row_is_recorded(sql_storage: SessionStorage) -> None:
    """By the library's deletes and by hand (the trigger of revision 0010)."""
    kept = new_session(0)
    by_library, by_hand = new_session(1), new_session(1)
    for session in (kept, by_library, by_hand):
        await sql_storage.save_session(session)
    assert await sql_storage.delete_session(by_library.session_id) is True
    storage: Any = sql_storage
    async with storage.engine.begin() as connection:
        await connection.execute(
            text("DELETE FROM chat_sessions WHERE session_id = :id"), {"id": by_hand.session_id}
        )
        recorded = {
            row[0]
            for row in await connection.execute(
                text("SELECT session_id FROM chat_session_deletions")
            )
        }
    ours = {kept.session_id, by_library.session_id, by_hand.session_id}
    assert recorded & ours == {by_library.session_id, by_hand.session_id}


async def test_a_delete_in_flight_when_the_creation_is_retried_is_waited_for(
    sql_storage: SessionStorage,
) -> None:
    """The retry locks the row first: a delete not yet committed (holding the row on
    PostgreSQL, the write lock on SQLite) is waited for, and its record then read."""
    session = new_session(1)
    outcomes(sql_storage, "landed")
    await save_unknown(sql_storage, session)
    storage: Any = sql_storage
    async with storage.engine.connect() as deleting:
        transaction = await deleting.begin()
        await deleting.execute(
            text("DELETE FROM chat_sessions WHERE session_id = :id"), {"id": session.session_id}
        )
        retry = asyncio.ensure_future(sql_storage.save_session(session))
        await asyncio.sleep(0.5)
        assert not retry.done(), "the retry did not wait for the delete"
        await transaction.commit()
    with pytest.raises(SessionDeletedError):
        await retry
    assert await sql_storage.load_session(session.session_id) is None


async def test_a_retry_rolled_back_in_a_unit_of_work_still_knows_its_creation(
    sql_storage: SessionStorage,
) -> None:
    """Found by attack: the rollback took the object back to new and forgot the
    incarnation it had sent, so the save after another writer's delete created it."""
    session = new_session(1)
    outcomes(sql_storage, "landed")
    await save_unknown(sql_storage, session)
    with pytest.raises(RuntimeError, match="rolled back"):
        async with sql_storage.unit_of_work() as uow:
            await uow.sessions.add(session)
            raise RuntimeError("rolled back")
    async with second_holder(sql_storage) as other:
        assert await other.delete_session(session.session_id) is True

    with pytest.raises(SessionDeletedError):
        await sql_storage.save_session(session)
    assert await sql_storage.load_session(session.session_id) is None


async def test_a_creation_merged_into_a_stored_session_stays_deleted_with_it(
    sql_storage: SessionStorage,
) -> None:
    """Found by attack: the creation merged into another writer's session of its id
    (README), landed, and that session was deleted; the retry found no record of its
    own incarnation and created the session again."""
    async with second_holder(sql_storage) as other:
        theirs = ChatSession.create("m", session_id="shared")
        theirs.add_message("user", "theirs")
        await other.save_session(theirs)
        mine = ChatSession.create("m", session_id="shared")
        mine.add_message("user", "mine")
        outcomes(sql_storage, "landed")
        await save_unknown(sql_storage, mine)
        stored = await other.load_session("shared")
        assert stored is not None and [m.content for m in stored.messages] == ["theirs", "mine"]
        assert await other.delete_session("shared") is True

    mine.add_message("user", "mine again")
    with pytest.raises(SessionDeletedError):
        await sql_storage.save_session(mine)
    assert await sql_storage.load_session("shared") is None


async def test_a_truncate_is_recorded_as_the_delete_of_every_session(
    postgresql_storage: SessionStorage,
) -> None:
    """Found by attack: TRUNCATE fires no row trigger (PostgreSQL)."""
    session = new_session(1)
    outcomes(postgresql_storage, "landed")
    await save_unknown(postgresql_storage, session)
    storage: Any = postgresql_storage
    async with storage.engine.begin() as connection:
        await connection.execute(text("TRUNCATE chat_sessions CASCADE"))

    with pytest.raises(SessionDeletedError):
        await postgresql_storage.save_session(session)


async def test_a_forgotten_deletion_no_longer_stops_the_retried_creation(
    sql_storage: SessionStorage,
) -> None:
    """The price of `forget_deletions`, as its documentation says: the record was what
    told the retry its session was deleted."""
    session = new_session(1)
    outcomes(sql_storage, "landed")
    await save_unknown(sql_storage, session)
    async with second_holder(sql_storage) as other:
        assert await other.delete_session(session.session_id) is True
        assert await other.forget_deletions(datetime.now(UTC) + timedelta(minutes=1)) == 1

    assert await sql_storage.save_session(session) is True
    assert await sql_storage.load_session(session.session_id) is not None
