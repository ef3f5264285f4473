"""Revision 0007: PostgreSQL appends through `persistence_append`, whose plans are kept.

What an append does is the contract suite's (tests/contract); here, what keeping the
plans must never cost: a plan made while chat_sessions held one row is still used
when it holds thousands, so it must not scan the table.
"""

from __future__ import annotations

import pytest
from sqlalchemy import text

from persistence import ChatSession, PostgreSQLSessionStorage

pytestmark = pytest.mark.postgresql


async def _sequential_scans(storage: PostgreSQLSessionStorage) -> int:
    """chat_sessions' sequential scans so far, this server process's own counts included.

    A process sends its counts to the shared statistics when it goes idle, at most once
    a second unless asked: the first transaction asks, the second reads.
    """
    async with storage.engine.begin() as connection:
        await connection.execute(text("SELECT pg_stat_force_next_flush()"))
    async with storage.engine.begin() as connection:
        query = text("SELECT seq_scan FROM pg_stat_user_tables WHERE relname = 'chat_sessions'")
        return int((await connection.execute(query)).scalar_one())


async def _append(storage: PostgreSQLSessionStorage, session: ChatSession, count: int) -> None:
    for index in range(count):
        session.add_message("user", f"message {index}")
        assert await storage.save_session(session)


async def test_a_plan_kept_while_the_sessions_were_few_never_scans_them_all(
    one_connection: PostgreSQLSessionStorage, analysed_alone: ChatSession
) -> None:
    storage, session = one_connection, analysed_alone
    # More appends than PostgreSQL plans for each before it keeps a plan (5).
    await _append(storage, session, 10)
    # The sessions grow, and nothing analyses them (autovacuum is off for the table).
    assert await storage.insert_sessions([ChatSession.create("m") for _ in range(3_000)])
    before = await _sequential_scans(storage)

    await _append(storage, session, 10)

    # Without sequential scans disabled in the function, the kept plans scanned all
    # 3,001 sessions: the update of the session row and each message's foreign-key check.
    assert await _sequential_scans(storage) == before
    loaded = await storage.load_session(session.session_id)
    assert loaded is not None and [m.content for m in loaded.messages] == [
        f"message {index}" for index in (*range(10), *range(10))
    ]
