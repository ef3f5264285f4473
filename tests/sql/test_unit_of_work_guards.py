"""Units of work: a call inside an open SQLite one fails at once; bad ids are invalid data."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from persistence import InvalidDataError, PersistenceError, SessionStorage, SQLiteSessionStorage
from tests.factories import conversation


async def test_a_save_inside_an_open_unit_of_work_fails_at_once(tmp_path: Path) -> None:
    storage = SQLiteSessionStorage(tmp_path / "s.db", busy_timeout=5.0)
    async with storage:
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
