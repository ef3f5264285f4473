"""PostgreSQL: reads of one session's newest rows stay about as long as what they return,
whatever the statistics say: a partial load (`last=N`) and the windows of a search scoped
to the session. A session grown since the last ANALYZE looks a few rows long to the
planner, which read and sorted all of it for each of them."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import text

from persistence import ChatSession, PostgreSQLSessionStorage
from persistence.sql import repositories, search, search_statements
from persistence.sql.checkout import driver_connection
from persistence.sql.statements import Statement

pytestmark = pytest.mark.postgresql

LAST = 20
GROWN = 3000
# Every this many messages of the grown session holds the rare word.
RARE_EVERY = 500


async def _rows_read(
    storage: PostgreSQLSessionStorage, statement: Statement, params: dict[str, Any]
) -> int:
    """The rows of chat_messages that `statement` reads, from EXPLAIN ANALYZE."""
    sql, values = statement.compile(storage.engine.dialect).bind(params)
    async with driver_connection(storage.engine) as driver:
        # The engine's connections decode the JSON plan themselves.
        plan = await driver.fetchval("EXPLAIN (ANALYZE, FORMAT JSON) " + sql, *values)

    def rows_read(node: dict[str, Any]) -> int:
        own = node["Actual Rows"] * node["Actual Loops"]
        if node.get("Relation Name") != "chat_messages":
            own = 0
        return own + sum(rows_read(child) for child in node.get("Plans", ()))

    return rows_read(plan[0]["Plan"])


@pytest.fixture
async def grown(one_connection: PostgreSQLSessionStorage) -> ChatSession:
    """A session of GROWN messages saved after the statistics were taken while every
    session was ten messages long: to the planner any session is about ten rows, so
    reading and sorting all of one looked cheaper than walking the index from its end."""
    async with one_connection.unit_of_work() as uow:
        for _ in range(2000):
            short = ChatSession.create("m")
            for index in range(10):
                short.add_message("user", f"hello {index}")
            await uow.sessions.add(short)
        await uow.commit()
    async with one_connection.engine.begin() as connection:
        await connection.execute(text("ANALYZE chat_sessions, chat_messages"))
    session = ChatSession.create("m")
    for index in range(GROWN):
        rare = " zebra" if index % RARE_EVERY == 0 else ""
        session.add_message("user", f"message {index} common{rare}")
    await one_connection.save_session(session)
    await one_connection.index_for_search()
    return session


async def test_a_partial_load_reads_from_the_newest_end(
    one_connection: PostgreSQLSessionStorage, grown: ChatSession
) -> None:
    params = {"session_id": grown.session_id, "last": LAST}
    # It read all 3,000 rows before the bound.
    assert await _rows_read(one_connection, repositories.SELECT_SESSION_WITH_NEWEST, params) <= (
        2 * LAST
    )
    tail = await one_connection.load_session(grown.session_id, last=LAST)
    assert tail is not None and tail.message_count == GROWN
    assert [m.content.split()[1] for m in tail.messages] == [str(i) for i in range(2980, 3000)]


async def test_a_search_in_the_session_reads_its_newest_window_only(
    one_connection: PostgreSQLSessionStorage, grown: ChatSession
) -> None:
    shape = search_statements.Shape(session=True, role=False)
    arity, words = search_statements.word_parameters("postgresql", ["common"], [])
    params = {
        "session_id": grown.session_id,
        "role": None,
        "below": search_statements.TOP,
        "skip": search.PROBE_ROWS - 1,
        "limit": 50,
        **words,
    }
    scan = search_statements.scan_statement(shape, arity)
    # The first window's edge read all 3,000 rows before the bound; now the window and
    # its edge are about PROBE_ROWS each.
    assert await _rows_read(one_connection, scan, params) <= 3 * search.PROBE_ROWS

    found = await one_connection.search_messages("zebra", session_id=grown.session_id)
    assert [m.content.split()[1] for m in found] == [
        str(index) for index in reversed(range(0, GROWN, RARE_EVERY))
    ]


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
