"""Ties in pages are broken by id in code point order, whatever PostgreSQL's collation.

Found by attack: on a database whose default collation is a language's (here ICU
en-US, as on most servers), sessions sharing an `updated_at` came back from
`list_sessions` in another order than on SQLite.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from persistence import ChatSession, PostgreSQLSessionStorage, SessionStorage, SQLiteSessionStorage
from tests import servers
from tests.factories import file_record

IDS = ["a", "_x", "Z", "ab", "a_b", "B", "é", "e", "f", "a-b", "A"]
STAMP = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


@pytest.fixture(params=["sqlite", "postgresql"])
async def storage(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[SessionStorage]:
    request.applymarker(getattr(pytest.mark, request.param))
    if request.param == "sqlite":
        async with SQLiteSessionStorage(tmp_path / "store.db") as storage:
            yield storage
        return
    admin = request.getfixturevalue("postgresql_admin_url")
    name = f"persistence_test_{uuid.uuid4().hex[:12]}"
    await servers._admin(
        admin,
        f"CREATE DATABASE \"{name}\" TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE 'en-US'"
        " LOCALE 'C.UTF-8'",
    )
    try:
        url = servers.with_database(servers.plain_postgresql_url(admin), name)
        async with PostgreSQLSessionStorage(url, min_pool_size=1, max_pool_size=2) as storage:
            yield storage
    finally:
        await servers._admin(admin, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def test_sessions_of_one_time_are_listed_by_id_in_code_point_order(
    storage: SessionStorage,
) -> None:
    for session_id in IDS:
        await storage.save_session(
            ChatSession(session_id=session_id, model="m", created_at=STAMP, updated_at=STAMP)
        )
    newest_first = sorted(IDS, reverse=True)

    assert [s.session_id for s in await storage.list_sessions()] == newest_first
    pages = [await storage.list_sessions(limit=3, offset=start) for start in range(0, 12, 3)]
    assert [s.session_id for page in pages for s in page] == newest_first
    active = await storage.list_sessions(status="active", limit=4, offset=2)
    assert [s.session_id for s in active] == newest_first[2:6]


async def test_file_records_of_one_time_are_listed_by_id_in_code_point_order(
    storage: SessionStorage,
) -> None:
    for file_id in IDS:
        await storage.save_file_record(
            file_record(file_id=file_id, uploaded_at=STAMP, expires_at=STAMP + timedelta(days=365))
        )

    assert [r.file_id for r in await storage.list_file_records()] == sorted(IDS, reverse=True)
