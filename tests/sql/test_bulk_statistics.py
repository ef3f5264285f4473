"""PostgreSQL: bulk loads keep the planner's statistics in step (persistence.sql.statistics)."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from persistence import ChatSession, PostgreSQLSessionStorage
from persistence.sql.statistics import FIRST_ANALYZE_AFTER, BulkLoadStatistics


def test_analyses_when_the_rows_added_double() -> None:
    statistics = BulkLoadStatistics(first=100)
    assert not statistics.added(99)
    assert statistics.added(1)  # 100
    assert not statistics.added(99)  # 199
    assert statistics.added(1)  # 200
    assert not statistics.added(199)  # 399
    assert statistics.added(1)  # 400


async def _reltuples(storage: PostgreSQLSessionStorage, table: str) -> float:
    async with storage.engine.connect() as connection:
        query = text("SELECT reltuples FROM pg_class WHERE relname = :table")
        return float((await connection.execute(query, {"table": table})).scalar_one())


def _sessions(count: int) -> list[ChatSession]:
    batch = []
    for index in range(count):
        session = ChatSession.create("m")
        session.add_message("user", f"message {index}")
        batch.append(session)
    return batch


@pytest.mark.postgresql
async def test_a_bulk_load_leaves_the_tables_analysed(
    postgresql_storage: PostgreSQLSessionStorage,
) -> None:
    async with postgresql_storage.engine.begin() as connection:
        for table in ("chat_sessions", "chat_messages"):
            await connection.execute(text(f"ALTER TABLE {table} SET (autovacuum_enabled = false)"))
    # Never analysed: PostgreSQL keeps -1 until the first ANALYZE.
    assert await _reltuples(postgresql_storage, "chat_sessions") == -1
    per_batch = 1_000  # 2,000 rows: a session and its message
    batches = FIRST_ANALYZE_AFTER // (2 * per_batch)
    for _ in range(batches - 1):
        assert await postgresql_storage.insert_sessions(_sessions(per_batch))
    assert await _reltuples(postgresql_storage, "chat_sessions") == -1
    assert await postgresql_storage.insert_sessions(_sessions(per_batch))
    assert await _reltuples(postgresql_storage, "chat_sessions") == batches * per_batch
    assert await _reltuples(postgresql_storage, "chat_messages") == batches * per_batch
