"""Sessions read through a unit of work that does not commit.

Found by attack: `uow.sessions.get` after the unit's own write to the session returns
the unit's uncommitted state, and the object kept that base after a rollback: the
rolled-back revision and removal count. Once another writer's saves brought the store
to that revision, a save of the object overwrote that writer's metadata without a
conflict, and a message that writer had removed came back. Such an object's saves
are now refused (SessionConflictError) until the session is loaded again; an object
read before any write of the unit to its session holds committed state and stays
usable.
"""

from __future__ import annotations

import asyncio
import copy

import pytest

from persistence import ChatSession, SessionConflictError, SessionStorage
from tests.reliability.unknown_outcomes import outcomes
from tests.servers import second_holder


async def _stored(storage: SessionStorage) -> ChatSession:
    session = ChatSession.create("m", metadata={"title": "first"})
    for content in ("a", "b", "c"):
        session.add_message("user", content)
    await storage.save_session(session)
    return session


async def _read_in_a_rolled_back_unit(storage: SessionStorage, session_id: str) -> ChatSession:
    """Pops a message in a unit of work, reads the session back there, rolls back."""
    async with storage.unit_of_work() as uow:
        writer = await storage.load_session(session_id)
        assert writer is not None
        writer.pop_message()
        writer.metadata["title"] = "rolled back"
        await uow.sessions.add(writer)
        read = await uow.sessions.get(session_id)
        assert read is not None
        assert [m.content for m in read.messages] == ["a", "b"]
    return read


async def _contents(storage: SessionStorage, session_id: str) -> tuple[list[str], dict[str, str]]:
    stored = await storage.load_session(session_id)
    assert stored is not None
    return [m.content for m in stored.messages], stored.metadata


async def test_a_read_after_the_units_write_is_refused_after_a_rollback(
    sql_storage: SessionStorage,
) -> None:
    session = await _stored(sql_storage)
    read = await _read_in_a_rolled_back_unit(sql_storage, session.session_id)
    assert sql_storage.has_unsaved_changes(read)

    read.add_message("assistant", "X")
    with pytest.raises(SessionConflictError, match="read in a unit of work"):
        await sql_storage.save_session(read)
    assert await _contents(sql_storage, session.session_id) == (
        ["a", "b", "c"],
        {"title": "first"},
    )
    # Loaded again, the session saves as usual.
    reloaded = await sql_storage.load_session(session.session_id)
    assert reloaded is not None
    reloaded.add_message("assistant", "X")
    assert await sql_storage.save_session(reloaded) is True


async def test_another_writers_metadata_is_not_overwritten_at_the_rolled_back_revision(
    sql_storage: SessionStorage,
) -> None:
    """The object's base said revision 2; another writer's save made the store's
    revision 2 too, and the object's compare-and-set matched it."""
    session = await _stored(sql_storage)
    read = await _read_in_a_rolled_back_unit(sql_storage, session.session_id)
    async with second_holder(sql_storage) as other:
        theirs = await other.load_session(session.session_id)
        assert theirs is not None
        theirs.metadata["title"] = "another writer's"
        await other.save_session(theirs)

    read.metadata["note"] = "mine"
    with pytest.raises(SessionConflictError):
        await sql_storage.save_session(read)
    assert await _contents(sql_storage, session.session_id) == (
        ["a", "b", "c"],
        {"title": "another writer's"},
    )


async def test_a_message_another_writer_removed_does_not_come_back(
    sql_storage: SessionStorage,
) -> None:
    """The object's base counted the rolled-back pop as a removal; a save of unknown
    outcome of it landed, another writer removed its message and wrote once more."""
    session = await _stored(sql_storage)
    read = await _read_in_a_rolled_back_unit(sql_storage, session.session_id)
    read.add_message("assistant", "X")
    # Refused now before anything is sent: the landed save of the attack cannot happen.
    outcomes(sql_storage, "landed")
    with pytest.raises(SessionConflictError):
        await sql_storage.save_session(read)
    assert await _contents(sql_storage, session.session_id) == (
        ["a", "b", "c"],
        {"title": "first"},
    )


@pytest.mark.parametrize("ending", ["rollback", "commit of unknown outcome", "deleted"])
async def test_every_ending_without_a_commit_voids_the_read(
    sql_storage: SessionStorage, ending: str
) -> None:
    session = await _stored(sql_storage)
    async with sql_storage.unit_of_work() as uow:
        if ending == "deleted":
            await uow.sessions.delete(session.session_id)
            # Deleted in the unit: nothing to read.
            assert await uow.sessions.get(session.session_id) is None
            writer = ChatSession.create("m", session_id=session.session_id)
            await uow.sessions.add(writer)
        else:
            writer = await sql_storage.load_session(session.session_id)
            assert writer is not None
            writer.add_message("user", "d")
            await uow.sessions.add(writer)
        read = await uow.sessions.get(session.session_id)
        assert read is not None
        if ending == "commit of unknown outcome":
            uow_run = type(uow)._end.__get__(uow)

            async def _end(verb: str) -> None:
                await uow_run(verb)
                if verb == "COMMIT":
                    raise asyncio.CancelledError  # it landed; its caller never knew

            uow._end = _end  # type: ignore[method-assign]
            with pytest.raises(asyncio.CancelledError):
                await uow.commit()
    with pytest.raises(SessionConflictError, match="read in a unit of work"):
        await sql_storage.save_session(read)


async def test_a_copy_made_inside_the_unit_is_refused_too(sql_storage: SessionStorage) -> None:
    """A copy is another holder that knows what the read knew: the same base."""
    session = await _stored(sql_storage)
    async with sql_storage.unit_of_work() as uow:
        writer = await uow.sessions.get(session.session_id)
        assert writer is not None
        writer.pop_message()
        await uow.sessions.add(writer)
        read = await uow.sessions.get(session.session_id)
        assert read is not None
        copied = copy.copy(read)
    copied.metadata["note"] = "from the copy"
    with pytest.raises(SessionConflictError, match="read in a unit of work"):
        await sql_storage.save_session(copied)
    assert await _contents(sql_storage, session.session_id) == (
        ["a", "b", "c"],
        {"title": "first"},
    )


async def test_a_read_before_the_units_write_and_a_committed_read_stay_usable(
    sql_storage: SessionStorage,
) -> None:
    session = await _stored(sql_storage)
    async with sql_storage.unit_of_work() as uow:
        before = await uow.sessions.get(session.session_id)
        assert before is not None
        other = await uow.sessions.get(session.session_id)
        assert other is not None
        other.add_message("user", "d")
        await uow.sessions.add(other)
    # Rolled back: `before` holds what was committed.
    before.add_message("user", "e")
    assert await sql_storage.save_session(before) is True
    assert (await _contents(sql_storage, session.session_id))[0] == ["a", "b", "c", "e"]

    async with sql_storage.unit_of_work() as uow:
        writer = await uow.sessions.get(session.session_id)
        assert writer is not None
        writer.add_message("user", "f")
        await uow.sessions.add(writer)
        after = await uow.sessions.get(session.session_id)
        assert after is not None
        await uow.commit()
    after.add_message("user", "g")
    assert await sql_storage.save_session(after) is True
    assert (await _contents(sql_storage, session.session_id))[0] == ["a", "b", "c", "e", "f", "g"]
