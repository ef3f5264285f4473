"""A cancelled SQLite call is over when its CancelledError is raised.

Every call runs as one function on the aiosqlite connection's thread. Found by attack:
a cancelled save still queued there ran later, after the caller had saved the session
again through another storage (acknowledged), and brought back the message that save
had removed; a cancelled creation likewise brought back a session deleted since. Now
a call still queued never runs, and one running is waited for.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from persistence import ChatSession, SQLiteSessionStorage
from persistence.sql.runner import run_in_thread

pytestmark = pytest.mark.sqlite


async def _contents(storage: SQLiteSessionStorage, session_id: str) -> list[str] | None:
    stored = await storage.load_session(session_id)
    return None if stored is None else [m.content for m in stored.messages]


async def test_a_save_cancelled_while_queued_never_runs(tmp_path: Path) -> None:
    async with SQLiteSessionStorage(tmp_path / "s.db") as storage:
        session = ChatSession.create("m")
        session.add_message("user", "question")
        await storage.save_session(session)
        session.add_message("assistant", "cancelled")
        connection, _ = storage._connection_and_dialect()
        busy = asyncio.ensure_future(run_in_thread(connection, lambda _connection: time.sleep(0.3)))
        await asyncio.sleep(0.05)
        save = asyncio.ensure_future(storage.save_session(session))
        await asyncio.sleep(0.05)
        save.cancel()
        with pytest.raises(asyncio.CancelledError):
            await save
        await busy
        await asyncio.sleep(0.1)

        assert await _contents(storage, session.session_id) == ["question"]


@pytest.mark.parametrize("what", ["pop", "delete"])
async def test_nothing_a_cancelled_save_sent_lands_after_the_next_save(
    tmp_path: Path, what: str
) -> None:
    """The attack's loop: cancelled after k turns of the event loop, the save is then
    undone through another storage; the store must not change afterwards."""
    path = tmp_path / "s.db"
    cancelled = 0
    async with SQLiteSessionStorage(path) as first, SQLiteSessionStorage(path) as second:
        for turns in range(30):
            session = ChatSession.create("m")
            session.add_message("user", "question")
            if what == "pop":
                await first.save_session(session)
            session.add_message("assistant", "to be undone")
            save = asyncio.ensure_future(first.save_session(session))
            for _ in range(turns):
                await asyncio.sleep(0)
            save.cancel()
            try:
                await save
                continue
            except asyncio.CancelledError:
                cancelled += 1
            if what == "pop":
                session.pop_message()
                assert await second.save_session(session) is True
                expected: list[str] | None = ["question"]
            else:
                assert await second.save_session(session) is True
                assert await second.delete_session(session.session_id) is True
                expected = None
            assert await _contents(second, session.session_id) == expected
            await asyncio.sleep(0.05)
            assert await _contents(second, session.session_id) == expected, turns
    assert cancelled > 0
