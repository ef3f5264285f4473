"""Units of work: a call inside an open SQLite one fails at once; bad ids are invalid data."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest

from persistence import (
    InvalidDataError,
    PersistenceError,
    SessionStorage,
    SQLiteSessionStorage,
)
from tests.factories import conversation


async def test_a_save_inside_an_open_unit_of_work_fails_at_once(tmp_path: Path) -> None:
    storage = SQLiteSessionStorage(tmp_path / "s.db", busy_timeout=5.0)
    other = SQLiteSessionStorage(tmp_path / "s.db", busy_timeout=5.0)
    async with storage, other:
        session = conversation(1)
        await storage.save_session(session)
        async with storage.unit_of_work() as uow:
            loaded = await uow.sessions.get(session.session_id)
            assert loaded is not None
            loaded.add_message("user", "inside")
            await uow.sessions.add(loaded)

            started = time.monotonic()
            session.add_message("user", "outside")
            with pytest.raises(PersistenceError, match="open unit_of_work"):
                await storage.save_session(session)
            with pytest.raises(PersistenceError, match="open unit_of_work"):
                await storage.delete_session(session.session_id)
            # Another storage of the same file waits for the same lock: the error says
            # store, not storage (found by attack: it read as if only this object's).
            with pytest.raises(PersistenceError, match="another of the same file"):
                await other.save_session(conversation(1))
            with pytest.raises(PersistenceError, match="another of the same file"):
                async with other.unit_of_work() as inner:
                    await inner.sessions.add(conversation(1))
            assert time.monotonic() - started < 1.0
            # Reads are fine: they see what was committed before the unit of work.
            outside = await storage.load_session(session.session_id)
            assert outside is not None and outside.message_count == 1
            await uow.commit()

        # After it, the same object saves normally.
        await storage.save_session(session)
        final = await storage.load_session(session.session_id)
        assert final is not None
        assert [m.content for m in final.messages] == ["message 0", "inside", "outside"]


async def test_a_duplicate_message_id_in_a_unit_of_work_is_invalid_data(
    sql_storage: SessionStorage,
) -> None:
    owner = conversation(1)
    await sql_storage.save_session(owner)
    thief = conversation(0)
    thief.messages.append(owner.messages[0].model_copy(update={"session_id": thief.session_id}))
    async with sql_storage.unit_of_work() as uow:
        with pytest.raises(InvalidDataError, match=owner.messages[0].message_id):
            await uow.sessions.add(thief)
    assert await sql_storage.load_session(thief.session_id) is None


async def test_a_unit_refuses_more_work_and_its_commit_after_a_call_in_it_failed(
    sql_storage: SessionStorage,
) -> None:
    """What the failed call began may be half done (SQLite) or its transaction aborted
    (PostgreSQL): only a rollback is left."""
    owner, bad, later = conversation(1), conversation(1), conversation(1)
    await sql_storage.save_session(owner)
    bad.messages.append(owner.messages[0].model_copy(update={"session_id": bad.session_id}))
    async with sql_storage.unit_of_work() as uow:
        with pytest.raises(InvalidDataError):
            await uow.sessions.add(bad)
        with pytest.raises(PersistenceError, match=r"failed at 'save session'.*roll"):
            await uow.sessions.add(later)
        with pytest.raises(PersistenceError, match="nothing of it was committed"):
            await uow.commit()
    assert await sql_storage.load_session(later.session_id) is None
    assert await sql_storage.load_session(bad.session_id) is None
    # A new unit of work on the same storage works.
    async with sql_storage.unit_of_work() as uow:
        await uow.sessions.add(later)
        await uow.commit()
    assert await sql_storage.load_session(later.session_id) is not None


async def test_a_task_started_inside_a_unit_of_work_writes_after_it(tmp_path: Path) -> None:
    """Found by attack: the mark of the open unit of work lived in a context variable,
    which a task started inside the unit copied; its every write was refused for the
    rest of its life."""
    async with SQLiteSessionStorage(tmp_path / "s.db") as storage:
        committed = asyncio.Event()

        async def worker() -> bool:
            await committed.wait()
            return await storage.save_session(conversation(1))

        async with storage.unit_of_work() as uow:
            await uow.sessions.add(conversation(1))
            task = asyncio.create_task(worker())
            await uow.commit()
        committed.set()
        assert await task is True
        assert (await storage.count()).total_sessions == 2


async def test_a_second_unit_of_work_of_one_sqlite_storage_in_a_task_fails_at_once(
    tmp_path: Path,
) -> None:
    """Found by attack: it waited the whole busy timeout for the first one's write lock,
    then said another writer held it."""
    async with SQLiteSessionStorage(tmp_path / "s.db", busy_timeout=5.0) as storage:
        async with storage.unit_of_work() as outer:
            await outer.sessions.add(conversation(1))
            started = time.monotonic()
            with pytest.raises(PersistenceError, match="already holds an open unit of work"):
                async with storage.unit_of_work() as inner:
                    await inner.sessions.add(conversation(1))
            assert time.monotonic() - started < 1.0
            await outer.commit()
        # Both closed: the next ones open as usual, one after the other.
        for _ in range(2):
            async with storage.unit_of_work() as uow:
                await uow.sessions.add(conversation(1))
                await uow.commit()
        assert (await storage.count()).total_sessions == 3


async def test_a_unit_of_work_running_through_close_keeps_no_thread(tmp_path: Path) -> None:
    """Found by attack: given back to the pool that close() had disposed of, the unit's
    connection was never closed: its thread and descriptors stayed for good."""

    async def unit(storage: SQLiteSessionStorage, inside: asyncio.Event, go: asyncio.Event) -> None:
        async with storage.unit_of_work() as uow:
            await uow.sessions.add(conversation(1))
            inside.set()
            await go.wait()
            await uow.commit()

    # The threads alive before, not their count: a thread an earlier test's storage
    # left closing may end meanwhile (found when a fresh clone ran the tests in
    # another order: 1 thread where 2 had been).
    before = set(threading.enumerate())
    for round_ in range(3):
        storage = SQLiteSessionStorage(tmp_path / f"s{round_}.db")
        await storage.initialize()
        inside, release = asyncio.Event(), asyncio.Event()
        task = asyncio.create_task(unit(storage, inside, release))
        await inside.wait()
        await storage.close()
        release.set()
        await task
    await asyncio.sleep(0.1)
    assert set(threading.enumerate()) - before == set()


async def test_a_unit_of_work_entered_before_close_borrows_no_connection_after_it(
    tmp_path: Path,
) -> None:
    """Found by attack: a unit of work entered before close(), whose first statement
    came after it (a task awaiting a model's reply while another shut down), borrowed a
    connection from the disposed engine's new pool, committed into the closed store,
    and left its thread and three descriptors open, owned by nobody."""
    before = set(threading.enumerate())
    storage = SQLiteSessionStorage(tmp_path / "store.db")
    await storage.initialize()
    session = conversation(1)
    async with storage.unit_of_work() as uow:
        await storage.close()
        with pytest.raises(PersistenceError, match="sqlite storage is closed"):
            await uow.sessions.add(session)
    await asyncio.sleep(0.1)
    assert set(threading.enumerate()) - before == set()
    async with SQLiteSessionStorage(tmp_path / "store.db") as again:
        assert await again.load_session(session.session_id) is None


@pytest.mark.parametrize("elsewhere", ["unit of work", "save"])
async def test_a_rolled_back_unit_keeps_the_edits_another_store_took_meanwhile(
    tmp_path: Path, elsewhere: str
) -> None:
    """Found by attack: one object in a unit of work on store B while a unit of work (or
    a plain save) on store A committed its edit. A's commit trimmed the object's log of
    edits, B's rollback then gave back a base whose edit was gone, and the next save to
    B returned True without it: B kept the old content for good."""
    async with (
        SQLiteSessionStorage(tmp_path / "a.db") as first,
        SQLiteSessionStorage(tmp_path / "b.db") as second,
    ):
        session = conversation(2)
        await first.save_session(session)
        await second.save_session(session)
        session.edit_message(session.messages[0].message_id, content="edited")
        async with second.unit_of_work() as outer:
            await outer.sessions.add(session)
            if elsewhere == "save":
                await first.save_session(session)
            else:
                async with first.unit_of_work() as inner:
                    await inner.sessions.add(session)
                    await inner.commit()
            # left without commit: rolled back
        assert second.has_unsaved_changes(session)
        assert await second.save_session(session)
        for storage in (first, second):
            loaded = await storage.load_session(session.session_id)
            assert loaded is not None
            assert [m.content for m in loaded.messages] == ["edited", "message 1"]
        # Once no unit of work can roll back, the log is trimmed as before.
        assert len(session._log) == 0
