"""Full-text search: FTS5 on SQLite, a tsvector GIN index on PostgreSQL.

A person's query is reduced to its words before it reaches either engine, so no
input can be read as query syntax (quotes, `*`, `-`, `NEAR`, `:`, parentheses).
"""

from __future__ import annotations

import re

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from persistence.models import ChatMessage
from persistence.sql.mapping import message_from_row
from persistence.sql.tables import MessageRow

# Words beyond this many add nothing a person meant and only slow the engine down.
MAX_QUERY_WORDS = 32
_WORD = re.compile(r"\w+")
# Typed result columns, so timestamps and JSON come back as they do from Core selects.
_RESULT_COLUMNS = tuple(
    MessageRow.__table__.c[name]
    for name in ("message_id", "session_id", "role", "content", "created_at", "metadata")
)

_SQLITE_SEARCH = text(
    "SELECT m.message_id, m.session_id, m.role, m.content, m.created_at, m.metadata"
    " FROM chat_messages_fts JOIN chat_messages AS m ON m.id = chat_messages_fts.rowid"
    " WHERE chat_messages_fts MATCH :query ORDER BY m.id DESC LIMIT :limit"
)
# The expression matches the index's exactly (see revision 0001), so the index is used.
_POSTGRESQL_SEARCH = text(
    "SELECT message_id, session_id, role, content, created_at, metadata FROM chat_messages"
    " WHERE to_tsvector('simple'::regconfig, left(content, 100000))"
    " @@ plainto_tsquery('simple'::regconfig, :query)"
    " ORDER BY id DESC LIMIT :limit"
)


def query_words(query: str) -> list[str]:
    """Returns the words of a typed query, without characters no engine can take."""
    cleaned = query.encode("utf-8", "ignore").decode("utf-8").replace("\x00", " ")
    return _WORD.findall(cleaned)[:MAX_QUERY_WORDS]


def fts5_query(words: list[str]) -> str:
    """Quotes every word as an FTS5 string, so the words are ANDed and nothing is syntax."""
    return " ".join('"' + word.replace('"', '""') + '"' for word in words)


async def search(connection: AsyncConnection, query: str, limit: int) -> list[ChatMessage]:
    words = query_words(query)
    if not words or limit <= 0:
        return []
    if connection.dialect.name == "postgresql":
        statement, bound = _POSTGRESQL_SEARCH, " ".join(words)
    else:
        statement, bound = _SQLITE_SEARCH, fts5_query(words)
    result = await connection.execute(
        statement.columns(*_RESULT_COLUMNS), {"query": bound, "limit": limit}
    )
    return [message_from_row(row) for row in result]
