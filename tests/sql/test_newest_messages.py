"""PostgreSQL: a partial load (`last=N`) reads about N rows, whatever the statistics say."""

from __future__ import annotations

import json
from typing import Any

import pytest
from sqlalchemy import text

from persistence import ChatSession, PostgreSQLSessionStorage
from persistence.sql import repositories

pytestmark = pytest.mark.postgresql

LAST = 20


async def _explained_rows(storage: PostgreSQLSessionStorage, session_id: str) -> int:
    """The rows of chat_messages that the partial load's first statement reads."""
    statement = repositories.SELECT_SESSION_WITH_NEWEST.compile(storage.engine.dialect)
    sql, params = statement.bind({"session_id": session_id, "last": LAST})
    async with storage.engine.connect() as connection:
        driver = (await connection.get_raw_connection()).driver_connection
        assert driver is not None
        plan = await driver.fetchval("EXPLAIN (ANALYZE, FORMAT JSON) " + sql, *params)

    def rows_read(node: dict[str, Any]) -> int:
        own = node["Actual Rows"] if node.get("Relation Name") == "chat_messages" else 0
        return own + sum(rows_read(child) for child in node.get("Plans", ()))

    # The engine's connections decode JSON themselves.
    tree = plan if isinstance(plan, list) else json.loads(plan)
    return rows_read(tree[0]["Plan"])


async def test_a_session_grown_after_the_statistics_is_read_from_its_newest_end(
    one_connection: PostgreSQLSessionStorage,
) -> None:
    # Statistics taken while every session was ten messages long: to the planner any
    # session is about ten rows, so reading and sorting all of one looked cheaper than
    # walking the index from its end (before the bound it read all 3,000 rows).
    async with one_connection.unit_of_work() as uow:
        for _ in range(2000):
            short = ChatSession.create("m")
            for index in range(10):
                short.add_message("user", f"hello {index}")
            await uow.sessions.add(short)
        await uow.commit()
    async with one_connection.engine.begin() as connection:
        await connection.execute(text("ANALYZE chat_sessions, chat_messages"))
    long = ChatSession.create("m")
    for index in range(3000):
        long.add_message("user", f"message {index}")
    await one_connection.save_session(long)

    assert await _explained_rows(one_connection, long.session_id) <= 2 * LAST
    tail = await one_connection.load_session(long.session_id, last=LAST)
    assert tail is not None and tail.message_count == 3000
    assert [m.content for m in tail.messages] == [f"message {i}" for i in range(2980, 3000)]


@pytest.mark.parametrize(
    "written_around",
    [
        # A count above the messages it holds (and next_position with it).
        "UPDATE chat_sessions SET message_count = message_count + 5,"
        " next_position = next_position + 5",
        # A position below zero.
        "UPDATE chat_messages SET position = -1 WHERE position = 0",
    ],
)
async def test_rows_written_around_the_library_still_give_the_newest(
    postgresql_storage: PostgreSQLSessionStorage, written_around: str
) -> None:
    session = ChatSession.create("m")
    for index in range(30):
        session.add_message("user", f"message {index}")
    await postgresql_storage.save_session(session)
    async with postgresql_storage.engine.begin() as connection:
        await connection.execute(text(written_around))

    for last in (5, 30):
        tail = await postgresql_storage.load_session(session.session_id, last=last)
        assert tail is not None
        assert [m.content for m in tail.messages] == [
            f"message {index}" for index in range(30 - last, 30)
        ]
