"""PostgreSQL databases that do not store text as UTF-8 are refused, nothing written.

Found by attack: on SQL_ASCII a long non-ASCII word was not found through the index
(the server cut terms at 200 bytes, queries at 200 characters); on LATIN1 a save of
`日本語` failed with the server's UntranslatableCharacterError.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from persistence import ChatSession, MigrationError, PostgreSQLSessionStorage
from tests import servers

pytestmark = pytest.mark.postgresql


@pytest.fixture(params=["SQL_ASCII", "LATIN1", "UTF8"])
async def database(postgresql_admin_url: str, request: pytest.FixtureRequest) -> AsyncIterator[str]:
    """A database of the given encoding; its URL."""
    name = f"persistence_test_{uuid.uuid4().hex[:12]}"
    await servers._admin(
        postgresql_admin_url,
        f"CREATE DATABASE \"{name}\" ENCODING '{request.param}' LC_COLLATE 'C' LC_CTYPE 'C'"
        " TEMPLATE template0",
    )
    try:
        yield servers.with_database(servers.plain_postgresql_url(postgresql_admin_url), name)
    finally:
        await servers._admin(postgresql_admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def _tables(url: str) -> list[str]:
    connection = await asyncpg.connect(servers.plain_postgresql_url(url))
    try:
        rows = await connection.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY 1"
        )
    finally:
        await connection.close()
    return [row[0] for row in rows]


async def test_only_a_utf8_database_is_initialized(database: str) -> None:
    encoding = await _encoding(database)
    storage = PostgreSQLSessionStorage(database, min_pool_size=1, max_pool_size=2)
    try:
        if encoding != "UTF8":
            with pytest.raises(MigrationError) as refused:
                await storage.initialize()
            assert f"stores text as {encoding}" in str(refused.value)
            assert "ENCODING 'UTF8'" in str(refused.value)
            assert await _tables(database) == []
            return
        await storage.initialize()
        session = ChatSession.create("m")
        session.add_message("user", "日本語のテキスト " + "ж" * 150)
        await storage.save_session(session)
        for query in ("日本語", "ж" * 150):
            found = await storage.search_messages(query)
            assert [m.message_id for m in found] == [session.messages[0].message_id]
    finally:
        await storage.close()


async def _encoding(url: str) -> str:
    connection = await asyncpg.connect(servers.plain_postgresql_url(url))
    try:
        return str(await connection.fetchval("SHOW server_encoding"))
    finally:
        await connection.close()
