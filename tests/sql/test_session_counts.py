"""Session counts per status are kept by triggers (revision 0004): exact, and cheap to read."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from persistence import ChatSession, PostgreSQLSessionStorage, SessionStorage, SQLiteSessionStorage
from persistence.clock import utc_now
from persistence.sql.runner import traced
from tests.sql.test_migrations import alembic

EMPTY = {"active": 0, "archived": 0, "expired": 0}


async def _counted_by_scan(storage: Any) -> dict[str, int]:
    async with storage.engine.connect() as connection:
        rows = await connection.execute(
            text("SELECT status, count(*) FROM chat_sessions GROUP BY status")
        )
        return {**EMPTY, **{row[0]: row[1] for row in rows}}


async def test_counts_follow_creation_status_changes_upserts_and_deletes(
    sql_storage: SessionStorage,
) -> None:
    assert await sql_storage.count_sessions() == EMPTY
    sessions = [ChatSession.create("m", session_id=f"s{n}") for n in range(6)]
    # updated_at never moves backwards in the store: s3 is idle from its first save.
    sessions[3].updated_at = utc_now() - timedelta(days=30)
    for session in sessions:
        await sql_storage.save_session(session)
    assert await sql_storage.insert_sessions([ChatSession.create("m", session_id="bulk")])
    sessions[0].status = "archived"
    await sql_storage.save_session(sessions[0])
    await sql_storage.set_status(["s1", "s2"], "archived")
    await sql_storage.expire_sessions(utc_now() - timedelta(days=1))
    await sql_storage.delete_session("s4")
    await sql_storage.delete_session("s4")

    counts = await sql_storage.count_sessions()

    assert counts == {"active": 2, "archived": 3, "expired": 1}
    assert counts == await _counted_by_scan(sql_storage)
    assert (await sql_storage.count()).sessions_by_status == counts


async def test_appending_messages_never_touches_the_counts(sql_storage: SessionStorage) -> None:
    session = ChatSession.create("m")
    await sql_storage.save_session(session)
    statements: list[str] = []

    with traced(statements.append):
        for turn in range(3):
            session.add_message("user", str(turn))
            await sql_storage.save_session(session)

    assert not any("chat_session_counts" in sql for sql in statements)
    storage: Any = sql_storage
    async with storage.engine.connect() as connection:
        before = (
            await connection.execute(text("SELECT sum(sessions) FROM chat_session_counts"))
        ).scalar()
    session.add_message("user", "one more")
    await sql_storage.save_session(session)
    async with storage.engine.connect() as connection:
        after = (
            await connection.execute(text("SELECT sum(sessions) FROM chat_session_counts"))
        ).scalar()
    assert before == after == 1


async def test_sessions_created_at_once_by_many_writers_are_all_counted(
    sql_storage: SessionStorage,
) -> None:
    async def create(worker: int) -> None:
        for n in range(10):
            await sql_storage.save_session(ChatSession.create("m", session_id=f"w{worker}-{n}"))

    await asyncio.gather(*(create(worker) for worker in range(8)))

    assert await sql_storage.count_sessions() == {**EMPTY, "active": 80}


async def test_many_writers_inserting_and_changing_sessions_in_batches_never_deadlock(
    sql_storage: SessionStorage,
) -> None:
    """Found by attack: on PostgreSQL 111 of 120 batches of 30 new sessions, inserted by
    8 tasks at once, failed with "deadlock detected": each row's trigger locked the
    count row of its session id's slot, in the order the rows came (revision 0011
    counts a transaction's changes in one slot). Batch status changes and expiry sweeps
    beside them deadlocked too, locking their rows in two orders."""
    old = utc_now() - timedelta(days=30)

    async def insert(worker: int) -> None:
        for batch in range(4):
            sessions = [
                ChatSession.create("m", session_id=f"w{worker}-{batch}-{n:02}") for n in range(30)
            ]
            for session in sessions[::3]:
                session.status = "archived"
            for session in sessions[1::3]:
                session.updated_at = old
            assert await sql_storage.insert_sessions(sessions) is True

    await asyncio.gather(*(insert(worker) for worker in range(8)))
    ids = sorted(session.session_id for session in await sql_storage.list_sessions(limit=1000))
    assert len(ids) == 960

    async def change(worker: int) -> None:
        for turn in range(5):
            if worker % 2:
                await sql_storage.expire_sessions(utc_now() - timedelta(days=1))
            picked = ids[worker::7] if turn % 2 else ids[worker::7][::-1]
            await sql_storage.set_status(picked, ("active", "archived")[(worker + turn) % 2])

    await asyncio.gather(*(change(worker) for worker in range(8)))

    counts = await sql_storage.count_sessions()
    assert counts == await _counted_by_scan(sql_storage)
    assert sum(counts.values()) == 960


async def test_a_postgresql_count_change_never_waits_for_another_transactions_slot(
    postgresql_storage: PostgreSQLSessionStorage, postgresql_url: str
) -> None:
    """Found by attack: revision 0011's first version made a transaction wait for the
    advisory lock of its slot (txid % 16) when another held it, so a count change could
    wait, while holding session rows, for a transaction waiting for those rows (a
    deadlock), or for one waiting in the library for a unit of work (a hang for good).
    Here the second transaction's own slot is the one the first holds: it takes
    another without waiting, within a lock timeout of 2 s."""
    import asyncpg

    plain = postgresql_url.replace("postgresql+asyncpg://", "postgresql://", 1)
    first, second, burner = [await asyncpg.connect(plain) for _ in range(3)]
    insert = (
        "INSERT INTO chat_sessions (session_id, model, created_at, updated_at, message_count,"
        " metadata, status, revision, incarnation, next_position)"
        " VALUES ($1, 'm', now(), now(), 0, '{}', 'active', 1, 'i', 0)"
    )
    try:
        await first.execute("BEGIN")
        await first.execute(insert, "first")
        held = await burner.fetchval(
            "SELECT objid FROM pg_locks WHERE locktype = 'advisory' AND pid = $1",
            first.get_server_pid(),
        )
        # Transaction ids are the server's: another client's transaction between the
        # burner's and the second's takes the id meant for it, so draw again.
        for _ in range(20):
            while (await burner.fetchval("SELECT txid_current()") + 1) % 16 != held:
                pass  # each call uses one transaction id: the next one draws `held`
            await second.execute("BEGIN")
            await second.execute("SET LOCAL lock_timeout = '2s'")
            if await second.fetchval("SELECT txid_current() % 16") == held:
                break
            await second.execute("ROLLBACK")
        else:
            pytest.fail("the second transaction never drew the first one's slot")
        await second.execute(insert, "second")
        await second.execute("COMMIT")
        await first.execute("COMMIT")
    finally:
        for connection in (first, second, burner):
            await connection.close()

    assert await postgresql_storage.count_sessions() == {**EMPTY, "active": 2}
    assert await _counted_by_scan(postgresql_storage) == {**EMPTY, "active": 2}


async def test_postgresql_truncate_empties_the_counts(
    postgresql_storage: PostgreSQLSessionStorage,
) -> None:
    await postgresql_storage.save_session(ChatSession.create("m"))
    async with postgresql_storage.engine.begin() as connection:
        await connection.execute(text("TRUNCATE chat_sessions CASCADE"))

    assert await postgresql_storage.count_sessions() == EMPTY


async def test_revision_0004_counts_the_sessions_a_0003_store_holds(fresh_url: str) -> None:
    alembic(fresh_url, "upgrade", "0003")
    storage: SQLiteSessionStorage | PostgreSQLSessionStorage
    if fresh_url.startswith("sqlite"):
        storage = SQLiteSessionStorage(Path(fresh_url.removeprefix("sqlite:///")))
    else:
        storage = PostgreSQLSessionStorage(fresh_url, min_pool_size=1, max_pool_size=2)
    from sqlalchemy.ext.asyncio import create_async_engine

    from persistence.sql.engines import async_driver_url

    engine = create_async_engine(async_driver_url(fresh_url))
    async with engine.begin() as connection:
        for n, status in enumerate(["active", "active", "archived", "expired", "active"]):
            await connection.execute(
                text(
                    "INSERT INTO chat_sessions (session_id, model, created_at, updated_at,"
                    " message_count, metadata, status, revision, incarnation, next_position)"
                    " VALUES (:id, 'm', :now, :now, 0, '{}', :status, 1, 'x', 0)"
                ),
                {"id": f"old-{n}", "now": utc_now(), "status": status},
            )
    await engine.dispose()

    async with storage:
        assert await storage.count_sessions() == {"active": 3, "archived": 1, "expired": 1}
        await storage.delete_session("old-0")
        assert await storage.count_sessions() == {"active": 2, "archived": 1, "expired": 1}
