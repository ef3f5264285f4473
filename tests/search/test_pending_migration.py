"""Revision 0005 (documents may be pending) on populated stores, up and down."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from persistence import ChatSession
from persistence.search import search_document
from tests.search.test_migration import (
    _execute,
    _populate_at_0002,
    _storage,
    search_agrees_with_the_rule,
)
from tests.search.test_pending import _check_index, _pending
from tests.sql.test_migrations import alembic

pytestmark = [pytest.mark.sqlite, pytest.mark.postgresql]


async def _refused(url: str, sql: str) -> bool:
    try:
        await _execute(url, (sql, {}))
    except Exception:  # the driver's integrity error, whichever it is
        return True
    return False


async def test_upgrade_keeps_rows_documents_and_constraints(url: str) -> None:
    alembic(url, "upgrade", "0002")
    ids = await _populate_at_0002(url)
    alembic(url, "upgrade", "0004")
    (before,) = await _execute(
        url, ("SELECT id, message_id, content, search_text FROM chat_messages ORDER BY id", {})
    )

    alembic(url, "upgrade", "head")

    (after,) = await _execute(
        url, ("SELECT id, message_id, content, search_text FROM chat_messages ORDER BY id", {})
    )
    assert after == before
    insert = (
        "INSERT INTO chat_messages (message_id, session_id, position, role, content,"
        " created_at, metadata, search_text) VALUES ('{id}', '{session}', {position}, '{role}',"
        " 'x', '2026-01-01 00:00:00+00:00', '{{}}', NULL)"
    )
    assert await _refused(url, insert.format(id="a", session="s0", position=999, role="robot"))
    assert await _refused(url, insert.format(id=ids[0], session="s0", position=999, role="user"))
    assert await _refused(url, insert.format(id="c", session="s0", position=0, role="user"))
    async with _storage(url) as storage:
        assert await _pending(storage) == 0
        await search_agrees_with_the_rule(storage, ids, ["ünïcödé", "row 42", "日本語", "capit"])
        # The session's messages go with it (ON DELETE CASCADE), out of the index too.
        assert await storage.delete_session("s1")
        (left,) = await _execute(
            url, ("SELECT count(*) FROM chat_messages WHERE session_id = 's1'", {})
        )
        assert left == [(0,)]
        assert all(m.session_id != "s1" for m in await storage.search_messages("row", limit=500))
        await _check_index(storage)


# Messages a save leaves pending on SQLite (every insert does).
PENDING = 37


async def test_downgrade_writes_the_pending_documents(url: str) -> None:
    alembic(url, "upgrade", "head")
    session = ChatSession.create("m", session_id="bulk")
    for n in range(PENDING):
        session.add_message("user", f"pending ünïcödé message {n}")
    async with _storage(url) as storage:
        await storage.save_session(session)
    if url.startswith("sqlite"):
        # PostgreSQL wrote the documents with the rows; here they wait for a search.
        (pending,) = await _execute(
            url, ("SELECT count(*) FROM chat_messages WHERE search_text IS NULL", {})
        )
        assert pending == [(PENDING,)]

    alembic(url, "downgrade", "0004")

    (rows,) = await _execute(url, ("SELECT content, search_text FROM chat_messages", {}))
    assert len(rows) == PENDING
    assert all(document == search_document(content) for content, document in rows)
    assert await _refused(
        url, "UPDATE chat_messages SET search_text = NULL WHERE session_id = 'bulk'"
    )
    alembic(url, "upgrade", "head")
    async with _storage(url) as storage:
        found = await storage.search_messages("unicode message 7")
        assert [m.content for m in found] == ["pending ünïcödé message 7"]
        await _check_index(storage)
    (kept,) = await _execute(url, ("SELECT count(*) FROM chat_messages", {}))
    assert kept == [(PENDING,)]


async def test_a_fresh_store_at_head_has_the_pending_index(url: str) -> None:
    alembic(url, "upgrade", "head")
    async with _storage(url) as storage, storage.engine.connect() as connection:
        if connection.dialect.name == "sqlite":
            sql = "SELECT count(*) FROM sqlite_master WHERE name = 'ix_chat_messages_pending'"
        else:
            sql = "SELECT count(*) FROM pg_indexes WHERE indexname = 'ix_chat_messages_pending'"
        assert (await connection.execute(text(sql))).scalar_one() == 1
