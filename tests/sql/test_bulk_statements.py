"""Many rows, few statements: bulk inserts, and a save carrying many new messages."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import text

from persistence import ChatSession, SessionStorage
from persistence.sql.bulk import ROWS_PER_STATEMENT, copied_parts
from persistence.sql.runner import traced
from persistence.sql.writes import COPIED_APPENDS


def _message_inserts(statements: list[str]) -> list[str]:
    return [
        sql
        for sql in statements
        if sql.startswith(("INSERT INTO chat_messages", "COPY chat_messages"))
    ]


@pytest.mark.parametrize("stored", [True, False], ids=["stored session", "new session"])
async def test_a_save_of_many_new_messages_sends_few_statements_and_keeps_search_right(
    sql_storage: SessionStorage, stored: bool
) -> None:
    session = ChatSession.create("m")
    if stored:
        await sql_storage.save_session(session)
    for turn in range(1200):
        session.add_message("user", f"message {turn} word{turn}")
    statements: list[str] = []

    with traced(statements.append):
        async with sql_storage.unit_of_work() as uow:
            await uow.sessions.add(session)
            await uow.commit()

    inserts = _message_inserts(statements)
    if sql_storage.backend_name == "postgresql":
        # Stored or new: a COPY in parts of 64, 128, 256, 256, 256 and 240 rows, each
        # part built while the server stores the one before.
        assert list(copied_parts(1200))[:3] == [(0, 64), (64, 192), (192, 448)]
        assert inserts == len(list(copied_parts(1200))) * [
            "COPY chat_messages (message_id, session_id, position, role, content,"
            " created_at, metadata, search_text) FROM STDIN (FORMAT binary)"
        ]
        assert not [sql for sql in statements if "FROM persistence_append(" in sql]
    else:
        # 500 + 500 + 128 + 64 + 8 rows: power-of-two sizes keep the SQL texts few.
        assert len(inserts) == 5
        assert inserts[0].count("(?, ") == ROWS_PER_STATEMENT
    found = await sql_storage.search_messages("word1117")
    assert [m.content for m in found] == ["message 1117 word1117"]
    loaded = await sql_storage.load_session(session.session_id)
    assert loaded is not None and loaded.messages == session.messages


async def test_new_sessions_get_revision_one_a_fresh_incarnation_and_next_positions(
    sql_storage: SessionStorage,
) -> None:
    sessions = [ChatSession.create("m", session_id=f"s{n}") for n in range(3)]
    for n, session in enumerate(sessions):
        for turn in range(n + 1):
            session.add_message("user", str(turn))

    assert await sql_storage.insert_sessions(sessions)

    storage: Any = sql_storage
    async with storage.engine.connect() as connection:
        rows = (
            await connection.execute(
                text(
                    "SELECT session_id, revision, incarnation, next_position, message_count"
                    " FROM chat_sessions ORDER BY session_id"
                )
            )
        ).all()
        positions = (
            await connection.execute(
                text("SELECT session_id, position FROM chat_messages ORDER BY session_id, position")
            )
        ).all()
    assert [(r[0], r[1], r[3], r[4]) for r in rows] == [
        ("s0", 1, 1, 1),
        ("s1", 1, 2, 2),
        ("s2", 1, 3, 3),
    ]
    incarnations = [r[2] for r in rows]
    assert len(set(incarnations)) == 3
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in incarnations)
    assert positions == [("s0", 0), ("s1", 0), ("s1", 1), ("s2", 0), ("s2", 1), ("s2", 2)]


async def test_inserting_a_batch_costs_a_few_statements_whatever_its_size(
    sql_storage: SessionStorage,
) -> None:
    sessions = [ChatSession.create("m", session_id=f"s{n:03d}") for n in range(300)]
    for session in sessions:
        session.add_message("user", "hello")
    statements: list[str] = []

    with traced(statements.append):
        assert await sql_storage.insert_sessions(sessions)

    inserts = [sql for sql in statements if sql.startswith(("INSERT", "COPY"))]
    # PostgreSQL: a COPY of 64 + 128 + 108 rows per table. SQLite: 256 + 32 + 8 + 4.
    per_table = 3 if sql_storage.backend_name == "postgresql" else 4
    assert len([sql for sql in inserts if "chat_sessions" in sql]) == per_table
    assert len(inserts) == 2 * per_table


@pytest.mark.postgresql
@pytest.mark.parametrize("via", ["save_session", "unit_of_work"])
async def test_an_append_goes_by_copy_from_copied_appends_messages_on(
    postgresql_storage: SessionStorage, via: str
) -> None:
    session = ChatSession.create("m")
    await postgresql_storage.save_session(session)
    for appended in (COPIED_APPENDS - 1, COPIED_APPENDS):
        for turn in range(appended):
            session.add_message("user", f"turn {turn}")
        statements: list[str] = []
        with traced(statements.append):
            if via == "save_session":
                await postgresql_storage.save_session(session)
            else:
                async with postgresql_storage.unit_of_work() as uow:
                    await uow.sessions.add(session)
                    await uow.commit()
        functions = [sql for sql in statements if "FROM persistence_append(" in sql]
        copies = _message_inserts(statements)
        if appended < COPIED_APPENDS:
            assert (len(functions), copies) == (1, [])
        else:
            assert (functions, len(copies)) == ([], len(list(copied_parts(appended))))
    loaded = await postgresql_storage.load_session(session.session_id)
    assert loaded is not None and loaded.messages == session.messages
