"""Units of work and saves of one shared object, in several tasks of one process.

A SessionManager shares its cached objects between tasks, so two tasks may change
and write one ChatSession object at once: in two units of work, or a unit and a
plain save. Each write must plan from what the store holds once it can write, and
units that wait for each other's objects must not wait for good.
"""

from __future__ import annotations

import asyncio

import pytest

from persistence import ChatSession, PersistenceError, SessionStorage
from tests.factories import conversation
from tests.factories import stored as _stored


def _contents(session: ChatSession) -> list[str]:
    return [message.content for message in session.messages]


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


async def test_a_wait_on_a_hold_that_has_ended_is_no_deadlock(
    postgresql_storage: SessionStorage, postgresql_url: str
) -> None:
    """Found by attack: task T1's unit held Y and T1 waited for X, held by T3's first
    unit; T3 committed that unit and at once added Y to its second one. T1 had not run
    since X's hold ended, and the add raised a deadlock that was none. It now waits
    for T1's unit, and both commit."""
    from persistence import PostgreSQLSessionStorage

    x, y, z = conversation(1), conversation(1), conversation(1)
    for session in (x, y, z):
        await postgresql_storage.save_session(session)
    t3_holds_x, t1_holds_y = asyncio.Event(), asyncio.Event()

    async def t3(other: SessionStorage) -> str:
        async with postgresql_storage.unit_of_work() as second:
            z.add_message("user", "z by T3")
            await second.sessions.add(z)
            async with other.unit_of_work() as first:
                x.add_message("user", "x by T3")
                await first.sessions.add(x)
                t3_holds_x.set()
                await t1_holds_y.wait()
                await asyncio.sleep(0.3)  # T1 waits for X meanwhile
                await first.commit()
            y.add_message("user", "y by T3")
            await second.sessions.add(y)  # waits for T1's unit
            await second.commit()
        return "T3"

    async def t1(other: SessionStorage) -> str:
        await t3_holds_x.wait()
        async with postgresql_storage.unit_of_work() as unit:
            y.add_message("user", "y by T1")
            await unit.sessions.add(y)
            t1_holds_y.set()
            x.add_message("user", "x by T1")
            await other.save_session(x)  # waits for T3's first unit
            await unit.commit()
        return "T1"

    async with PostgreSQLSessionStorage(postgresql_url, 1, 4) as other:
        results = await asyncio.wait_for(asyncio.gather(t1(other), t3(other)), timeout=30)
    assert results == ["T1", "T3"]
    for session in (x, y, z):
        assert _contents(await _stored(postgresql_storage, session.session_id)) == _contents(
            session
        )


async def test_a_unit_waiting_for_a_unit_that_waits_for_its_rows_gives_up(
    postgresql_storage: SessionStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by attack: unit A wrote Z, then waited in the library for Y, which unit B
    held; B then wrote Z and waited in PostgreSQL for A's row. Neither the server nor
    the library sees that circle, and both waited for good. A unit now waits for
    another's object UNIT_WAIT_SECONDS at most (shortened here), then raises; B goes on.
    """
    from persistence.sql import held_sessions

    monkeypatch.setattr(held_sessions, "UNIT_WAIT_SECONDS", 1.0)
    y, z = conversation(1), conversation(1)
    await postgresql_storage.save_session(y)
    await postgresql_storage.save_session(z)
    b_holds_y, a_wrote_z = asyncio.Event(), asyncio.Event()

    async def unit_a() -> str:
        await b_holds_y.wait()
        async with postgresql_storage.unit_of_work() as unit:
            z.add_message("user", "z by A")
            await unit.sessions.add(z)
            a_wrote_z.set()
            y.add_message("user", "y by A")
            await unit.sessions.add(y)  # B holds Y, and waits for Z
            await unit.commit()
        return "A"

    async def unit_b() -> str:
        async with postgresql_storage.unit_of_work() as unit:
            y.add_message("user", "y by B")
            await unit.sessions.add(y)
            b_holds_y.set()
            await a_wrote_z.wait()
            other_z = await postgresql_storage.load_session(z.session_id)
            assert other_z is not None
            other_z.add_message("user", "z by B")
            await unit.sessions.add(other_z)  # A's row: waits in the server
            await unit.commit()
        return "B"

    results = await asyncio.wait_for(
        asyncio.gather(unit_a(), unit_b(), return_exceptions=True), timeout=30
    )
    assert results[1] == "B"
    assert isinstance(results[0], PersistenceError) and "still after 1 s" in str(results[0])
    stored_y = _contents(await _stored(postgresql_storage, y.session_id))
    assert stored_y == ["message 0", "y by B"]
