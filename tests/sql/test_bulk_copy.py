"""PostgreSQL bulk inserts by COPY: a connection that ends mid-COPY ends the save.

asyncpg's COPY waits for the socket to take more data between chunks; once the server
has closed the connection that wait never ended, and a save hung for ever
(persistence.sql.runner `_copy_unless_lost`). Here the server process of a save is
terminated while its COPY streams: the save must fail at once with a connection
error, write nothing, and leave the storage working.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import asyncpg
import pytest

from persistence import ChatSession, PostgreSQLSessionStorage, StorageConnectionError
from tests.servers import plain_postgresql_url

pytestmark = pytest.mark.postgresql

# Enough rows that asyncpg streams many chunks, and the server cannot take them all.
MESSAGES = 100_000


async def _terminate_the_copy(url: str) -> str:
    """Terminates the server process running a COPY into the database; its query."""
    connection = await asyncpg.connect(url)
    try:
        for _ in range(3000):
            rows = await connection.fetch(
                "SELECT pid, query FROM pg_stat_activity WHERE datname = current_database()"
                " AND pid <> pg_backend_pid() AND state = 'active' AND query LIKE 'COPY %'"
            )
            if rows:
                await connection.execute("SELECT pg_terminate_backend($1)", rows[0]["pid"])
                return str(rows[0]["query"])
            await asyncio.sleep(0.005)
        raise AssertionError("no COPY was seen")
    finally:
        await connection.close()


async def _in_a_unit_of_work(storage: PostgreSQLSessionStorage, session: ChatSession) -> None:
    async with storage.unit_of_work() as uow:
        await uow.sessions.add(session)
        await uow.commit()


async def _inserted(storage: PostgreSQLSessionStorage, session: ChatSession) -> None:
    await storage.insert_sessions([session])


@pytest.mark.parametrize(
    ("save", "action"),
    [(_in_a_unit_of_work, "save session"), (_inserted, "insert sessions")],
    ids=["unit of work", "insert_sessions"],
)
async def test_a_connection_ended_mid_copy_fails_the_save_at_once_and_writes_nothing(
    postgresql_storage: PostgreSQLSessionStorage,
    save: Callable[[PostgreSQLSessionStorage, ChatSession], Awaitable[None]],
    action: str,
) -> None:
    storage = postgresql_storage
    session = ChatSession.create("m")
    for index in range(MESSAGES):
        session.add_message("user", f"message {index} with a few words")
    url = plain_postgresql_url(storage.url.render_as_string(hide_password=False))

    terminator = asyncio.create_task(_terminate_the_copy(url))
    started = time.monotonic()
    # The error names what failed (a unit of work's rollback on the dead connection
    # does not replace it).
    with pytest.raises(StorageConnectionError, match=f"^{action}: database unreachable"):
        # Before the fix this waited for ever: the timeout only bounds the test.
        await asyncio.wait_for(save(storage, session), timeout=60)
    assert time.monotonic() - started < 30, "the save waited past the connection's end"
    assert (await terminator).startswith("COPY")

    assert await storage.load_session(session.session_id) is None
    assert (await storage.count()).messages == 0
    after = ChatSession.create("m")
    after.add_message("user", "the storage works on")
    assert await storage.save_session(after)
    loaded = await storage.load_session(after.session_id)
    assert loaded is not None and loaded.messages == after.messages
