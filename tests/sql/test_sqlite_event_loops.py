"""A SQLite storage used from several event loops: one after another, and at once.

Its own connection answers any loop; its units of work use an engine per loop
(persistence/sql/loop_engines.py), each disposed of by close() at the latest.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from persistence import ChatSession, PersistenceError, SQLiteSessionStorage
from persistence.sql import engines
from tests.factories import conversation


def _threads_left(before: set[threading.Thread]) -> set[threading.Thread]:
    """The threads started since `before` still alive, given up to 2 s to end: a closed
    connection's thread ends just after its close() returned."""
    deadline = time.monotonic() + 2.0
    while (left := set(threading.enumerate()) - before) and time.monotonic() < deadline:
        time.sleep(0.01)
    return left


def _descriptors_on(path: Path) -> int:
    """How many of this process's file descriptors are open on the store's files."""
    found = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            found += os.readlink(f"/proc/self/fd/{fd}").startswith(str(path))
    return found


async def _units(storage: SQLiteSessionStorage, sessions: list[ChatSession]) -> None:
    async def one(session: ChatSession) -> None:
        session.add_message("user", "in a unit of work")
        async with storage.unit_of_work() as uow:
            await uow.sessions.add(session)
            await asyncio.sleep(0.01)
            await uow.commit()

    await asyncio.gather(*(one(session) for session in sessions))


def test_units_of_work_queue_for_connections_in_a_second_event_loop(tmp_path: Path) -> None:
    """Found by attack: once units of work had queued for a pooled connection in one
    `asyncio.run`, every one that queued in the next failed with a raw RuntimeError
    ("bound to a different event loop"); the README says a SQLite storage works from
    another loop. More units run at once than the pool holds (5 and 10 more)."""
    storage = SQLiteSessionStorage(tmp_path / "store.db")
    sessions = [conversation(1) for _ in range(20)]

    async def burst() -> list[BaseException | None]:
        async def one(session: ChatSession) -> None:
            async with storage.unit_of_work() as uow:
                await uow.sessions.add(session)
                await asyncio.sleep(0.01)
                await uow.commit()

        return await asyncio.gather(*(one(s) for s in sessions), return_exceptions=True)

    async def first() -> list[BaseException | None]:
        await storage.initialize()
        return await burst()

    async def second() -> tuple[list[BaseException | None], int]:
        try:
            for session in sessions:
                session.add_message("user", "from the second loop")
            return await burst(), (await storage.count()).messages
        finally:
            await storage.close()

    assert asyncio.run(first()) == [None] * 20
    outcomes, messages = asyncio.run(second())
    assert outcomes == [None] * 20
    assert messages == 40


def test_close_disposes_of_the_engines_of_loops_that_ended(tmp_path: Path) -> None:
    """Found by attack: the engine of a loop before was disposed of in a task of the next
    loop, cancelled when that loop ended; nothing disposed of it again, and close() left
    its connections' threads and descriptors open."""
    path = tmp_path / "store.db"
    before = set(threading.enumerate())
    storage = SQLiteSessionStorage(path)
    sessions = [conversation(1) for _ in range(5)]

    async def first() -> None:
        await storage.initialize()
        await _units(storage, sessions)

    async def nothing() -> None:
        async with storage.unit_of_work():
            pass  # a loop that ends as soon as its unit of work has taken its engine

    asyncio.run(first())
    asyncio.run(_units(storage, sessions))  # a second loop's engine, connections pooled
    asyncio.run(nothing())
    asyncio.run(storage.close())

    assert _threads_left(before) == set()
    assert _descriptors_on(path) == 0


def test_two_threads_loops_at_once_keep_an_engine_each(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by attack: with an engine made at each change of loop, two threads' loops
    made one for nearly every unit of work (new connections and threads each time), and
    two changes at once left an engine, with its pool, that nothing disposed of."""
    path = tmp_path / "store.db"
    opened: list[Any] = []
    connect = engines.connect_sqlite

    async def counted(*args: Any, **kwargs: Any) -> Any:
        connection = await connect(*args, **kwargs)
        opened.append(connection)
        return connection

    monkeypatch.setattr(engines, "connect_sqlite", counted)
    before = set(threading.enumerate())
    storage = SQLiteSessionStorage(path)
    asyncio.run(storage.initialize())
    errors: list[BaseException] = []

    def worker() -> None:
        sessions = [conversation(1) for _ in range(4)]
        try:
            asyncio.run(_many(storage, sessions))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    counts = asyncio.run(_count_and_close(storage))

    assert errors == []
    assert counts == 2 * 4 * (1 + 40)  # each session's first message, then one a unit
    # One engine per loop: its pool's connections (5 and 10 more at most), not one
    # engine and its connections per unit of work.
    assert len(opened) <= 3 * 15
    assert _threads_left(before) == set()
    assert _descriptors_on(path) == 0


async def _many(storage: SQLiteSessionStorage, sessions: list[ChatSession]) -> None:
    for _ in range(40):
        await _units(storage, sessions)


async def _count_and_close(storage: SQLiteSessionStorage) -> int:
    try:
        return (await storage.count()).messages
    finally:
        await storage.close()


def test_loops_dropped_without_closing_keep_no_connections(tmp_path: Path) -> None:
    """Found by attack: the engine of a loop dropped without `close()` (a loop made by
    hand, run, then forgotten) was kept, with its pool's threads and descriptors, and
    the loop itself (its engine refers to it), until the storage closed: 20 such loops
    left 100 threads and 260 descriptors."""
    path = tmp_path / "store.db"
    storage = SQLiteSessionStorage(path)
    sessions = [conversation(1) for _ in range(6)]
    asyncio.run(storage.initialize())
    before = set(threading.enumerate())
    for _ in range(10):
        loop = asyncio.new_event_loop()
        loop.run_until_complete(_units(storage, sessions))
        del loop

    async def last() -> None:
        await _units(storage, sessions)
        await asyncio.sleep(0.5)  # while this loop disposes of the others' engines

    asyncio.run(last())

    # At most the pools of the opening loop's engine and of the last loop's.
    assert len(_threads_left(before)) <= 2 * 15
    asyncio.run(storage.close())
    assert _threads_left(before) == set()
    assert _descriptors_on(path) == 0


def test_a_failed_initialize_again_leaves_the_storage_open(tmp_path: Path) -> None:
    """Found by attack: initialize() again (from another loop, as the README allows)
    failing while another task's unit of work held the write lock past the busy
    timeout closed the storage for every task and loop that was using it."""
    storage = SQLiteSessionStorage(tmp_path / "store.db", busy_timeout=0.3)
    session = conversation(1)

    async def first() -> None:
        await storage.initialize()
        await storage.save_session(session)

    async def second() -> int:
        held = asyncio.Event()

        async def holder() -> None:
            async with storage.unit_of_work() as uow:
                loaded = await uow.sessions.get(session.session_id)
                assert loaded is not None
                loaded.add_message("user", "in the unit of work")
                await uow.sessions.add(loaded)
                held.set()
                await asyncio.sleep(1.0)
                await uow.commit()

        task = asyncio.create_task(holder())
        await held.wait()
        with pytest.raises(PersistenceError, match="locked"):
            await storage.initialize()
        await task
        try:
            return (await storage.count()).messages
        finally:
            await storage.close()

    asyncio.run(first())
    assert asyncio.run(second()) == 2


def _in_threads(count: int, main: Any, timeout: float = 20.0) -> list[str]:
    """Runs `asyncio.run(main())` in `count` threads at once; what each ended with.
    Fails the test if any is still running after `timeout` (a hang)."""
    outcomes: list[str] = []
    barrier = threading.Barrier(count)

    def run() -> None:
        barrier.wait()
        try:
            asyncio.run(main())
            outcomes.append("ok")
        except PersistenceError as exc:
            outcomes.append(f"PersistenceError: {exc}")
        except BaseException as exc:
            outcomes.append(f"raw {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=run, daemon=True) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    assert not any(thread.is_alive() for thread in threads), f"hung: {outcomes}"
    return outcomes


@pytest.mark.parametrize("through", ["storage", "manager"])
def test_one_object_from_loops_in_several_threads_is_refused_clearly_never_hangs(
    tmp_path: Path, through: str
) -> None:
    """Found by attack: an asyncio lock taking turns per object (and a SessionManager's
    per session) was shared by loops in several threads: raw RuntimeErrors ("bound to
    a different event loop"), then one thread waited for good."""
    from persistence import SessionManager

    storage = SQLiteSessionStorage(tmp_path / "store.db")
    session = conversation(1)
    asyncio.run(storage.initialize())
    asyncio.run(storage.save_session(session))
    manager = SessionManager(storage)

    async def save() -> None:
        for _ in range(20):
            if through == "manager":
                held = await manager.get_session(session.session_id)
                assert held is not None
                held.add_message("user", "again")
                await manager.auto_save(held)
            else:
                session.add_message("user", "again")
                await storage.save_session(session)

    try:
        for _ in range(5):
            outcomes = _in_threads(4, save)
            assert all(
                outcome == "ok" or "in another event loop" in outcome for outcome in outcomes
            ), outcomes
    finally:
        asyncio.run(storage.close())


def test_a_loop_closed_with_a_call_in_flight_leaves_the_storage_working(tmp_path: Path) -> None:
    """Found by attack: aiosqlite's thread answered the call's closed loop, which raised,
    and the thread died: every later call from every loop, and close(), waited for
    good (under wait_for too)."""
    storage = SQLiteSessionStorage(tmp_path / "store.db")

    async def fill() -> None:
        await storage.initialize()
        for _ in range(50):
            await storage.save_session(conversation(10))

    asyncio.run(fill())
    for _ in range(3):
        # Keeps the connection's thread busy, so the read is surely still queued (once,
        # on a busy machine, it was answered within the loop's one step).
        storage._connection._tx.put_nowait((None, lambda: time.sleep(0.2)))  # type: ignore[union-attr]
        loop = asyncio.new_event_loop()
        pending = loop.create_task(storage.list_sessions(limit=1000))
        loop.run_until_complete(asyncio.sleep(0))  # the read is queued on the thread
        assert not pending.done()
        loop.close()  # before its answer

    async def use() -> None:
        assert len(await asyncio.wait_for(storage.list_sessions(limit=100), 10)) == 50
        await asyncio.wait_for(storage.close(), 10)

    assert _in_threads(1, use) == ["ok"]


def test_a_write_group_answers_every_caller_when_one_callers_loop_has_closed(
    tmp_path: Path,
) -> None:
    """Found by attack: answering a closed loop's write raised, and the writes after it in
    the same group were committed but never answered."""
    storage = SQLiteSessionStorage(tmp_path / "store.db")
    asyncio.run(storage.initialize())
    # Keeps the connection's thread busy, so both saves wait in one write group.
    storage._connection._tx.put_nowait((None, lambda: time.sleep(0.5)))  # type: ignore[union-attr]
    loop = asyncio.new_event_loop()
    pending = loop.create_task(storage.save_session(conversation(1)))
    loop.run_until_complete(asyncio.sleep(0.05))  # its save waits in the group
    assert not pending.done()
    loop.close()

    async def save() -> None:
        assert await storage.save_session(conversation(1)) is True
        assert len(await storage.list_sessions()) == 2
        await storage.close()

    assert _in_threads(1, save) == ["ok"]


def test_short_lived_loops_dispose_of_engines_without_errors_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Found by attack: the engine of the loop before was disposed of as a task of the
    new loop; a loop that ended at once cancelled it, and SQLAlchemy logged each
    connection it was closing at ERROR, with a CancelledError traceback."""
    storage = SQLiteSessionStorage(tmp_path / "store.db")
    asyncio.run(storage.initialize())
    session = conversation(1)
    asyncio.run(storage.save_session(session))

    async def unit(read: bool) -> None:
        async with storage.unit_of_work() as uow:
            if read:
                await uow.sessions.get(session.session_id)
            await uow.commit()

    before = set(threading.enumerate())
    for index in range(60):
        asyncio.run(unit(index % 2 == 0))  # every other loop ends at once
    asyncio.run(storage.close())
    assert not [
        r for r in caplog.records if r.levelname == "ERROR" and r.name.startswith("sqlalchemy")
    ]
    assert not _threads_left(before)
    assert _descriptors_on(tmp_path) == 0


@pytest.mark.parametrize("through", ["storage", "manager"])
def test_a_loop_closed_in_the_middle_of_a_save_leaves_the_object_to_the_next_loop(
    tmp_path: Path, through: str
) -> None:
    """Found by attack: a loop closed with a save (or a manager's load) of the object in
    flight kept its turn for good: every later loop was refused as "in another event
    loop". A closed loop's turn is taken over; the store then holds each message once."""
    from persistence import SessionManager
    from persistence.turns import _SAVES

    storage = SQLiteSessionStorage(tmp_path / "store.db")
    asyncio.run(storage.initialize())
    manager = SessionManager(storage)
    session = ChatSession.create("m")
    for index in range(20_000):
        session.add_message("user", f"message {index}")
    if through == "manager":  # a long load to be in the middle of
        asyncio.run(storage.save_session(session))
    dead = asyncio.new_event_loop()
    if through == "manager":
        busy = manager._loading.busy
        task = dead.create_task(manager.get_session(session.session_id))
    else:
        busy = _SAVES.busy
        task = dead.create_task(storage.save_session(session))
    for _ in range(4000):  # until the work holds its turn
        dead.run_until_complete(asyncio.sleep(0.0005))
        if busy():
            break
    assert busy() and not task.done()
    dead.close()  # in the middle of it

    async def again() -> None:
        await asyncio.sleep(0.5)  # the thread has ended the closed loop's write by now
        if through == "manager":
            held = await manager.get_session(session.session_id)
            assert held is not None
            held.add_message("user", "after")
            assert await manager.auto_save(held)
        else:
            session.add_message("user", "after")
            assert await storage.save_session(session) is True
        stored = await storage.load_session(session.session_id)
        assert stored is not None
        contents = [message.content for message in stored.messages]
        assert len(contents) == len(set(contents)) == stored.message_count
        await storage.close()

    assert _in_threads(1, again) == ["ok"]
