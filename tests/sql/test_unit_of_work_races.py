"""Units of work and saves of one shared object, in several tasks of one process.

A SessionManager shares its cached objects between tasks, so two tasks may change
and write one ChatSession object at once: in two units of work, or a unit and a
plain save. Each write must plan from what the store holds once it can write, and
units that wait for each other's objects must not wait for good.
"""

from __future__ import annotations

import asyncio

from persistence import ChatSession, PersistenceError, SessionStorage
from tests.factories import conversation


def _contents(session: ChatSession) -> list[str]:
    return [message.content for message in session.messages]


async def _stored(storage: SessionStorage, session_id: str) -> ChatSession:
    stored = await storage.load_session(session_id)
    assert stored is not None
    return stored


async def test_a_unit_plans_an_objects_save_only_once_it_can_write(
    sql_storage: SessionStorage,
) -> None:
    """Found by attack: unit B planned its save of Y, then waited for the write lock
    (SQLite) or a connection (PostgreSQL, pool exhausted) that unit A held; A added Y
    with a newer message and committed; B's stale plan then landed, and Y's record of
    the store lost A's message: popping it later left it stored."""
    other, shared = conversation(1), conversation(2)
    await sql_storage.save_session(other)
    await sql_storage.save_session(shared)
    first_id = shared.messages[0].message_id
    a_wrote_other = asyncio.Event()

    async def unit_a() -> None:
        async with sql_storage.unit_of_work() as uow:
            other.add_message("user", "A-other")
            await uow.sessions.add(other)  # begins A's transaction
            a_wrote_other.set()
            await asyncio.sleep(0.3)  # B changes the shared object and adds it meanwhile
            shared.add_message("user", "A-shared")
            await uow.sessions.add(shared)
            await uow.commit()

    async def unit_b() -> None:
        await a_wrote_other.wait()
        async with sql_storage.unit_of_work() as uow:
            shared.edit_message(first_id, content="B-edit")
            await uow.sessions.add(shared)
            await uow.commit()

    await asyncio.gather(unit_a(), unit_b())
    expected = ["B-edit", "message 1", "A-shared"]
    assert _contents(shared) == expected
    assert _contents(await _stored(sql_storage, shared.session_id)) == expected
    assert not sql_storage.has_unsaved_changes(shared)
    # The object's record of the store is right: its next changes land as made.
    assert shared.pop_message() is not None
    shared.add_message("assistant", "again")
    assert await sql_storage.save_session(shared) is True
    stored = await _stored(sql_storage, shared.session_id)
    assert _contents(stored) == ["B-edit", "message 1", "again"] == _contents(shared)


async def test_two_units_adding_two_objects_in_opposite_orders_do_not_wait_for_good(
    sql_storage: SessionStorage,
) -> None:
    """Found by attack: on PostgreSQL both units waited for each other's object for
    good (they locked different rows, so the server's deadlock detector never saw
    it). One of them now fails as a deadlock; the other commits."""
    first, second = conversation(1), conversation(1)
    await sql_storage.save_session(first)
    await sql_storage.save_session(second)
    both_began = asyncio.Barrier(2)

    async def unit(one: ChatSession, other: ChatSession, tag: str) -> str:
        async with sql_storage.unit_of_work() as uow:
            one.add_message("user", f"{tag}-1")
            await uow.sessions.add(one)
            await both_began.wait()
            other.add_message("user", f"{tag}-2")
            await uow.sessions.add(other)
            await uow.commit()
        return tag

    if sql_storage.backend_name == "sqlite":
        # One writer at a time: the second unit waits for the first's write lock
        # before it adds anything, so the two never hold an object each.
        both_began = asyncio.Barrier(1)
    results = await asyncio.wait_for(
        asyncio.gather(unit(first, second, "A"), unit(second, first, "B"), return_exceptions=True),
        timeout=60,
    )
    failed = [result for result in results if isinstance(result, BaseException)]
    if sql_storage.backend_name == "sqlite":
        assert failed == []
        return
    assert len(failed) == 1 and isinstance(failed[0], PersistenceError)
    assert "deadlock" in str(failed[0])
    # What the failed unit added to the shared objects is still theirs to save.
    for session in (first, second):
        assert await sql_storage.save_session(session) is True
        stored = _contents(await _stored(sql_storage, session.session_id))
        assert stored == _contents(session) and len(set(stored)) == len(stored) == 3
