"""Full-text search: FTS5 on SQLite, a tsvector GIN index on PostgreSQL.

A person's query is reduced to its words before it reaches either engine, and each
dialect gets those words in a form that its engine cannot read as syntax, so no input
(quotes, `*`, `-`, `NEAR`, `:`, parentheses, NUL) raises or matches by accident.
"""

from __future__ import annotations

from sqlalchemy import Dialect, String, TypeDecorator, bindparam, text
from sqlalchemy.sql import ClauseElement

from persistence.sql.tables import MessageRow

# Typed result columns, so timestamps and JSON come back as from any other select.
_RESULT_COLUMNS = tuple(
    MessageRow.__table__.c[name]
    for name in ("message_id", "session_id", "role", "content", "created_at", "metadata")
)
_SQLITE_SEARCH = (
    "SELECT m.message_id, m.session_id, m.role, m.content, m.created_at, m.metadata"
    " FROM chat_messages_fts JOIN chat_messages AS m ON m.id = chat_messages_fts.rowid"
    " WHERE chat_messages_fts MATCH :query ORDER BY m.id DESC LIMIT :limit"
)
# The expression matches the index's exactly (see revision 0001), so the index is used.
_POSTGRESQL_SEARCH = (
    "SELECT message_id, session_id, role, content, created_at, metadata FROM chat_messages"
    " WHERE to_tsvector('simple'::regconfig, left(content, 100000))"
    " @@ plainto_tsquery('simple'::regconfig, :query)"
    " ORDER BY id DESC LIMIT :limit"
)


class SearchWords(TypeDecorator[list[str]]):
    """Binds a list of words as each engine's query: quoted FTS5 strings, or plain text."""

    impl = String
    cache_ok = True

    def process_bind_param(self, value: list[str] | None, dialect: Dialect) -> str | None:
        if value is None:
            return None
        if dialect.name == "sqlite":
            # Every word an FTS5 string: ANDed, and nothing in it is syntax.
            return " ".join('"' + word.replace('"', '""') + '"' for word in value)
        return " ".join(value)


def search_statement(dialect: str) -> ClauseElement:
    sql = _POSTGRESQL_SEARCH if dialect == "postgresql" else _SQLITE_SEARCH
    return (
        text(sql)
        .bindparams(bindparam("query", type_=SearchWords()), bindparam("limit"))
        .columns(*_RESULT_COLUMNS)
    )
