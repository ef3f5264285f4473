"""PostgreSQL hands timestamps back aware and in UTC whatever the server's time zone:
asyncpg converts them, so the library adds no processing of its own (types.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone

import pytest
from sqlalchemy import make_url, text

from persistence import ChatSession, PostgreSQLSessionStorage
from tests import servers
from tests.factories import file_record

pytestmark = pytest.mark.postgresql


@pytest.fixture
def kolkata_url(postgresql_admin_url: str) -> Iterator[str]:
    """A database whose sessions run in Asia/Kolkata (+05:30), not UTC."""
    with servers.throwaway_postgresql_database(postgresql_admin_url) as url:
        name = make_url(url).database
        asyncio.run(
            servers._admin(url, f"ALTER DATABASE \"{name}\" SET timezone TO 'Asia/Kolkata'")
        )
        yield url


async def test_every_read_gives_utc_datetimes_in_a_database_of_another_zone(
    kolkata_url: str,
) -> None:
    moment = datetime(2025, 10, 16, 15, 30, 1, 123000, tzinfo=timezone(timedelta(hours=-8)))
    async with PostgreSQLSessionStorage(kolkata_url) as storage:
        async with storage.engine.connect() as connection:
            zone = (await connection.execute(text("SHOW timezone"))).scalar()
        assert zone == "Asia/Kolkata"
        session = ChatSession.create("m")
        session.created_at = moment
        for turn in range(3):
            session.add_message("user", f"turn {turn}")
        await storage.save_session(session)
        await storage.save_file_record(file_record(uploaded_at=moment))

        loaded = await storage.load_session(session.session_id)
        listed = await storage.list_sessions(limit=1)
        found = await storage.search_messages("turn")
        records = await storage.list_file_records()
    assert loaded is not None and loaded == session
    values = [
        loaded.created_at,
        loaded.updated_at,
        listed[0].created_at,
        listed[0].updated_at,
        *(message.created_at for message in [*loaded.messages, *found]),
        records[0].uploaded_at,
    ]
    assert all(value.tzinfo is UTC for value in values)
    assert loaded.created_at == listed[0].created_at == records[0].uploaded_at == moment
    assert [m.created_at for m in loaded.messages] == [m.created_at for m in session.messages]
