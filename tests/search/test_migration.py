"""Revision 0003 on stores populated by 0002; the index kept in step by plain SQL."""

from __future__ import annotations

import importlib.util
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from persistence import (
    ChatSession,
    PostgreSQLSessionStorage,
    SessionStorage,
    SQLiteSessionStorage,
)
from persistence.search import search_document
from persistence.sql.engines import async_driver_url
from tests.search import oracle
from tests.search.test_parity import CORPUS
from tests.sql.test_migrations import alembic

pytestmark = [pytest.mark.sqlite, pytest.mark.postgresql]

REVISION = (
    Path(__file__).resolve().parents[2]
    / "persistence/sql/migrations/versions/0003_search_documents.py"
)
# More rows than one backfill batch, in several sessions.
CONTENTS = [content for _, content in CORPUS[:20]] + [f"row {n} ünïcödé 日本語" for n in range(430)]


def _revision() -> Any:
    spec = importlib.util.spec_from_file_location("revision_0003", REVISION)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def _execute(url: str, *statements: tuple[str, Any]) -> list[Any]:
    engine = create_async_engine(async_driver_url(url))
    results = []
    try:
        async with engine.begin() as connection:
            for sql, params in statements:
                result = await connection.execute(text(sql), params)
                results.append(result.all() if result.returns_rows else result.rowcount)
    finally:
        await engine.dispose()
    return results


async def _populate_at_0002(url: str) -> list[str]:
    """Rows as revision 0002's schema holds them, written with plain SQL."""
    now = datetime.now(UTC)
    sessions = [{"id": f"s{n}", "now": now, "count": 0, "inc": uuid.uuid4().hex} for n in range(3)]
    messages = [
        {
            "mid": uuid.uuid4().hex,
            "sid": f"s{n % 3}",
            "pos": n // 3,
            "content": content,
            "now": now,
        }
        for n, content in enumerate(CONTENTS)
    ]
    await _execute(
        url,
        (
            "INSERT INTO chat_sessions (session_id, model, created_at, updated_at,"
            " message_count, metadata, status, revision, incarnation, next_position)"
            " VALUES (:id, 'm', :now, :now, 150, '{}', 'active', 1, :inc, 150)",
            sessions,
        ),
        (
            "INSERT INTO chat_messages (message_id, session_id, position, role, content,"
            " created_at, metadata) VALUES (:mid, :sid, :pos, 'user', :content, :now, '{}')",
            messages,
        ),
    )
    return [message["mid"] for message in messages]


def _storage(url: str) -> SQLiteSessionStorage | PostgreSQLSessionStorage:
    if url.startswith("sqlite"):
        return SQLiteSessionStorage(url.removeprefix("sqlite:///"))
    return PostgreSQLSessionStorage(url, min_pool_size=1, max_pool_size=2)


async def test_upgrade_backfills_every_message_and_search_finds_them(url: str) -> None:
    alembic(url, "upgrade", "0002")
    ids = await _populate_at_0002(url)

    alembic(url, "upgrade", "head")

    (rows,) = await _execute(url, ("SELECT content, search_text FROM chat_messages", {}))
    assert len(rows) == len(CONTENTS)
    assert all(document == search_document(content) for content, document in rows)
    async with _storage(url) as storage:
        await search_agrees_with_the_rule(
            storage, ids, ["ünïcödé", "row 42", "日本語", "3.14", "capit", "numbatword"]
        )


async def search_agrees_with_the_rule(
    storage: SessionStorage, ids: list[str], queries: list[str]
) -> None:
    """Each query finds exactly the CONTENTS (stored as `ids`) the rule says, newest first."""
    for query in queries:
        found = [m.message_id for m in await storage.search_messages(query, limit=500)]
        expected = [
            message_id
            for message_id, content in reversed(list(zip(ids, CONTENTS, strict=True)))
            if oracle.matches(query, content)
        ]
        assert found == expected, query


async def test_downgrade_to_0002_restores_its_index_and_to_base_empties(url: str) -> None:
    alembic(url, "upgrade", "0002")
    await _populate_at_0002(url)
    alembic(url, "upgrade", "head")

    alembic(url, "downgrade", "0002")
    if url.startswith("sqlite"):
        (found,) = await _execute(
            url,
            (
                "SELECT count(*) FROM chat_messages_fts WHERE chat_messages_fts MATCH 'row'",
                {},
            ),
        )
    else:
        (found,) = await _execute(
            url,
            (
                "SELECT count(*) FROM chat_messages WHERE to_tsvector('simple'::regconfig,"
                " left(content, 100000)) @@ plainto_tsquery('simple'::regconfig, 'row')",
                {},
            ),
        )
    assert found == [(430,)]

    alembic(url, "downgrade", "base")
    (tables,) = await _execute(
        url,
        (
            "SELECT name FROM sqlite_master WHERE type = 'table'"
            if url.startswith("sqlite")
            else "SELECT tablename FROM pg_tables WHERE schemaname = 'public'",
            {},
        ),
    )
    assert [name for (name,) in tables if name != "persistence_alembic_version"] == []
    if not url.startswith("sqlite"):
        (functions,) = await _execute(
            url, ("SELECT proname FROM pg_proc WHERE proname LIKE 'persistence%'", {})
        )
        assert functions == []


async def test_a_plain_sql_update_of_the_document_keeps_the_index_right(url: str) -> None:
    async with _storage(url) as storage:
        session = ChatSession.create("m")
        message = session.add_message("user", "original wording")
        session.add_message("user", "unrelated")
        await storage.save_session(session)

        await _execute(
            url,
            (
                "UPDATE chat_messages SET content = :content, search_text = :document"
                " WHERE message_id = :id",
                {
                    "content": "Edited Wörding",
                    "document": search_document("Edited Wörding"),
                    "id": message.message_id,
                },
            ),
        )

        assert await storage.search_messages("original") == []
        assert [m.content for m in await storage.search_messages("wording")] == ["Edited Wörding"]
        assert [m.content for m in await storage.search_messages("edit")] == ["Edited Wörding"]
        if url.startswith("sqlite"):
            # FTS5 agrees with its content table after the update (no stale entry).
            await _execute(
                url,
                (
                    "INSERT INTO chat_messages_fts(chat_messages_fts, rank)"
                    " VALUES ('integrity-check', 1)",
                    {},
                ),
            )
        await _execute(
            url, ("DELETE FROM chat_messages WHERE message_id = :id", {"id": message.message_id})
        )
        assert await storage.search_messages("wording") == []


@settings(max_examples=300, deadline=None, database=None)
@given(st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=80))
def test_the_revision_backfills_with_the_rule_the_code_writes(content: str) -> None:
    # Revision 0003 keeps its own copy of the rule (a revision never changes meaning):
    # while the rule is the one 0003 wrote, the two agree; a new rule needs a revision.
    assert _revision().search_document(content) == search_document(content)


def test_the_revision_agrees_on_the_parity_corpus() -> None:
    revision = _revision()
    for _, content in CORPUS:
        assert revision.search_document(content) == search_document(content)
