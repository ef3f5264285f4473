"""A save of an object that another task's open unit of work wrote waits for the unit.

Found by attack: the unit's `add` moves the object's base before it commits. A save
from another task, planned from that base, returned True with nothing written, or
wrote only the newer message; after the unit's rollback the older message was
appended after it, out of order.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime

import asyncpg
import pytest

from persistence import (
    ChatSession,
    PersistenceError,
    PostgreSQLSessionStorage,
    SessionManager,
    SessionStorage,
)
from tests import servers
from tests.factories import file_record
from tests.servers import second_holder


async def _contents(storage: SessionStorage, session_id: str) -> list[str]:
    stored = await storage.load_session(session_id)
    assert stored is not None
    assert stored.message_count == len(stored.messages)
    return [message.content for message in stored.messages]


@pytest.mark.parametrize("ending", ["rollback", "commit"])
@pytest.mark.parametrize("added_beside", [False, True])
async def test_a_save_beside_an_open_unit_of_work_waits_for_it(
    sql_storage: SessionStorage, ending: str, added_beside: bool
) -> None:
    session = ChatSession.create("m")
    session.add_message("user", "q")
    await sql_storage.save_session(session)
    session.add_message("assistant", "m1")
    added = asyncio.Event()
    acknowledged: list[list[str]] = []

    async def unit() -> None:
        async with sql_storage.unit_of_work() as uow:
            await uow.sessions.add(session)
            added.set()
            await asyncio.sleep(0.3)
            assert not acknowledged, "the save beside did not wait for the unit"
            if ending == "commit":
                await uow.commit()

    async with second_holder(sql_storage) as other:

        async def beside() -> None:
            await added.wait()
            if added_beside:
                session.add_message("user", "m2")
            assert await other.save_session(session) is True
            acknowledged.append(await _contents(other, session.session_id))

        await asyncio.gather(unit(), beside())

    held = [message.content for message in session.messages]
    assert acknowledged == [held]
    assert await _contents(sql_storage, session.session_id) == held


async def test_a_manager_save_of_what_its_own_unit_holds_fails_at_once(
    sql_storage: SessionStorage,
) -> None:
    # Found by attack: another task's manager save of the session waited for the unit,
    # holding the manager's turn; the unit's own task then saved it through the manager
    # and waited for that turn: both waited for good.
    manager = SessionManager(sql_storage)
    session = await manager.create_session("m")
    beside: asyncio.Task[bool] | None = None
    async with sql_storage.unit_of_work() as uow:
        session.add_message("user", "in the unit")
        await uow.sessions.add(session)
        session.add_message("user", "from another request")
        beside = asyncio.create_task(manager.auto_save(session))
        await asyncio.sleep(0.1)
        assert not beside.done(), "the save beside did not wait for the unit"
        with pytest.raises(PersistenceError, match="held by this task's open unit_of_work"):
            async with asyncio.timeout(10):  # in this task: wait_for would start another
                await manager.auto_save(session)
        await uow.commit()
    assert await asyncio.wait_for(beside, 10) is True
    assert await _contents(sql_storage, session.session_id) == [
        "in the unit",
        "from another request",
    ]


def _pooled(
    storage: PostgreSQLSessionStorage, least: int, most: int, pool_timeout: float
) -> PostgreSQLSessionStorage:
    """The store of `storage` through a pool of its own."""
    url = storage.url.render_as_string(hide_password=False)
    return PostgreSQLSessionStorage(url, least, most, pool_timeout=pool_timeout)


def _one_connection(storage: PostgreSQLSessionStorage) -> PostgreSQLSessionStorage:
    return _pooled(storage, 1, 1, pool_timeout=5)


@pytest.mark.postgresql
async def test_one_connection_a_unit_and_a_save_of_its_object_both_go_on(
    postgresql_storage: PostgreSQLSessionStorage,
) -> None:
    # Found by attack: the unit held the pool's only connection and waited for the
    # object's save turn; a plain save held the turn and waited for a connection, until
    # the pool timeout failed it as "pool exhausted".
    async with _one_connection(postgresql_storage) as storage:
        manager = SessionManager(storage)
        session = await manager.create_session("m")
        started = time.monotonic()
        async with storage.unit_of_work() as uow:
            await uow.files.add(file_record(file_id="f"))
            session.add_message("user", "from another request")
            beside = asyncio.create_task(manager.auto_save(session))
            await asyncio.sleep(0.05)
            session.add_message("user", "from the unit")
            await uow.sessions.add(session)
            await uow.commit()
        assert await beside is True
        assert time.monotonic() - started < 4, "they waited for the pool timeout"
        assert await _contents(storage, session.session_id) == [
            "from another request",
            "from the unit",
        ]


@pytest.mark.postgresql
async def test_one_connection_a_call_beside_the_tasks_own_unit_fails_at_once_while_it_lends(
    postgresql_storage: PostgreSQLSessionStorage,
) -> None:
    # Found by attack: it waited the pool timeout, then failed as "pool exhausted". And
    # on the first fix: every call inside the block was refused, also while the unit
    # held no connection (before its first work, after its commit).
    async with _one_connection(postgresql_storage) as storage:
        session = ChatSession.create("m")
        await storage.save_session(session)
        started = time.monotonic()
        async with storage.unit_of_work() as uow:
            assert await storage.load_session(session.session_id) is not None
            await uow.files.add(file_record(file_id="f"))
            for call in (storage.load_session(session.session_id), storage.save_session(session)):
                with pytest.raises(PersistenceError, match=r"max_pool_size=1\), the unit's"):
                    await call
            await uow.commit()
            session.add_message("user", "after the commit")
            assert await storage.save_session(session) is True
            assert len(await storage.list_sessions()) == 1
        assert time.monotonic() - started < 4
        assert await storage.load_file_record("f") is not None


@pytest.mark.postgresql
async def test_saves_waiting_for_one_object_hold_no_connection(
    postgresql_storage: PostgreSQLSessionStorage,
) -> None:
    # Found by attack on the first fix of the test above: saves lent their connection
    # before they took the object's turn, so saves queued on a busy object held every
    # connection, and a load of another session found the pool exhausted.
    async with _pooled(postgresql_storage, 0, 2, pool_timeout=1) as storage:
        hot, other = ChatSession.create("m"), ChatSession.create("m")
        await storage.save_session(hot)
        await storage.save_session(other)
        url = postgresql_storage.url.render_as_string(hide_password=False)
        locker = await asyncpg.connect(servers.plain_postgresql_url(url))
        try:
            async with locker.transaction():
                # Another process holds the hot session's row for a while.
                await locker.execute(
                    "SELECT 1 FROM chat_sessions WHERE session_id = $1 FOR UPDATE",
                    hot.session_id,
                )

                async def save(n: int) -> bool:
                    hot.add_message("user", f"m{n}")
                    return await storage.save_session(hot)

                saves = [asyncio.create_task(save(n)) for n in range(4)]
                await asyncio.sleep(0.2)
                started = time.monotonic()
                assert await storage.load_session(other.session_id) is not None
                assert time.monotonic() - started < 0.5
                await asyncio.sleep(1.3)  # past the pool timeout
        finally:
            await locker.close()
        assert await asyncio.gather(*saves) == [True] * 4
        assert await _contents(storage, hot.session_id) == ["m0", "m1", "m2", "m3"]


async def test_a_clean_save_of_another_session_beside_a_unit_goes_on(
    sql_storage: SessionStorage,
) -> None:
    # Found by attack on the first fix: SQLite refused any save inside a unit, also one
    # that writes nothing (it only reads that the session is still there).
    manager = SessionManager(sql_storage)
    untouched = await manager.create_session("m")
    held = await manager.create_session("m")
    async with sql_storage.unit_of_work() as uow:
        held.add_message("user", "in the unit")
        await uow.sessions.add(held)
        assert await sql_storage.save_session(untouched) is True
        assert await manager.auto_save(untouched) is True
        await uow.commit()


@pytest.mark.postgresql
async def test_a_save_that_waited_for_a_connection_gives_it_back_to_wait_for_a_unit(
    postgresql_storage: PostgreSQLSessionStorage,
) -> None:
    # Found by attack on the second fix: a save that found the pool full took a
    # connection, then waited with it for a unit of work that had added the object
    # meanwhile; the unit's own load then found the pool exhausted.
    async with _pooled(postgresql_storage, 2, 2, pool_timeout=2) as storage:
        hot, x, y = [await _saved(storage, text) for text in ("q", "x", "y")]
        c_lends, d_lends, b_waits = asyncio.Event(), asyncio.Event(), asyncio.Event()

        async def unit_c() -> None:  # holds a connection, then commits on its own
            async with storage.unit_of_work() as uow:
                y.add_message("user", "y2")
                await uow.sessions.add(y)
                c_lends.set()
                await b_waits.wait()
                await asyncio.sleep(0.5)
                await uow.commit()

        async def unit_d() -> float:  # holds the other one, then adds the hot session
            await c_lends.wait()
            async with storage.unit_of_work() as uow:
                await uow.sessions.get(x.session_id)
                d_lends.set()
                await b_waits.wait()
                await asyncio.sleep(0.1)
                hot.add_message("assistant", "from the unit")
                await uow.sessions.add(hot)
                await asyncio.sleep(1.0)  # C has committed, B has its connection
                started = time.monotonic()
                assert await storage.load_session(x.session_id) is not None
                waited = time.monotonic() - started
                await uow.commit()
            return waited

        async def save_b() -> bool:  # finds the pool full
            await d_lends.wait()
            hot.add_message("user", "from a plain save")
            b_waits.set()
            return await storage.save_session(hot)

        async with asyncio.timeout(30):
            _, waited, saved = await asyncio.gather(unit_c(), unit_d(), save_b())
        assert waited < 0.5 and saved is True
        assert await _contents(storage, hot.session_id) == [
            "q",
            "from a plain save",
            "from the unit",
        ]
        assert storage.engine.sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]


async def _saved(storage: SessionStorage, text: str) -> ChatSession:
    session = ChatSession.create("m")
    session.add_message("user", text)
    await storage.save_session(session)
    return session


async def test_a_write_of_a_row_its_own_unit_wrote_fails_at_once(
    sql_storage: SessionStorage,
) -> None:
    # Found by attack: on PostgreSQL a save of another copy of the session, a delete, a
    # status change or an expiry sweep from the unit's own task waited for the row the
    # unit had locked, for good (its deadlock detector never saw the wait in asyncio).
    session = await _saved(sql_storage, "q")
    copy = await sql_storage.load_session(session.session_id)
    assert copy is not None
    async with sql_storage.unit_of_work() as uow:
        held = await uow.sessions.get(session.session_id)
        assert held is not None
        held.add_message("user", "in the unit")
        await uow.sessions.add(held)
        copy.metadata["k"] = "v"
        for call in (
            lambda: sql_storage.save_session(copy),
            lambda: sql_storage.delete_session(session.session_id),
            lambda: sql_storage.set_status([session.session_id], "archived"),
            lambda: sql_storage.expire_sessions(datetime.now(UTC)),
        ):
            with pytest.raises(PersistenceError, match="written by this task's open unit_of_work"):
                async with asyncio.timeout(10):
                    await call()
        await uow.commit()
    assert await sql_storage.save_session(copy) is True
    stored = await sql_storage.load_session(session.session_id)
    assert stored is not None and stored.metadata == {"k": "v"}
    assert [m.content for m in stored.messages] == ["q", "in the unit"]
