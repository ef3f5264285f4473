"""Fixtures of the SQL-specific tests."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from persistence import ChatSession, PostgreSQLSessionStorage
from tests import servers


@pytest.fixture(params=["sqlite", "postgresql"])
def fresh_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The URL of an empty database on each SQL backend."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'fresh.db'}"
        return
    admin = request.getfixturevalue("postgresql_admin_url")
    with servers.throwaway_postgresql_database(admin) as url:
        yield url


@pytest.fixture
async def one_connection(postgresql_url: str) -> AsyncIterator[PostgreSQLSessionStorage]:
    """A PostgreSQL storage whose every call runs on the same server process (one plan
    cache), on emptied tables that autovacuum never analyses."""
    async with PostgreSQLSessionStorage(
        postgresql_url, min_pool_size=1, max_pool_size=1
    ) as storage:
        async with storage.engine.begin() as connection:
            await connection.execute(
                text(
                    "TRUNCATE chat_messages, chat_sessions, uploaded_files RESTART IDENTITY CASCADE"
                )
            )
            for table in ("chat_sessions", "chat_messages"):
                await connection.execute(
                    text(f"ALTER TABLE {table} SET (autovacuum_enabled = false)")
                )
        yield storage


@pytest.fixture
async def analysed_alone(one_connection: PostgreSQLSessionStorage) -> ChatSession:
    """A session stored in `one_connection`, with chat_sessions analysed while it held
    only this row: to the planner a scan of the table is then its cheapest read."""
    session = ChatSession.create("m")
    assert await one_connection.save_session(session)
    async with one_connection.engine.begin() as connection:
        await connection.execute(text("ANALYZE chat_sessions"))
    return session
