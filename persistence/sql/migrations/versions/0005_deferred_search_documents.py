"""Search documents may wait: a bulk insert leaves `search_text` NULL (issue 14).

A message whose `search_text` is NULL is not yet indexed. On SQLite, bulk inserts
(many messages in one statement: imports, migrations, large saves) write them so, and
the first search afterwards indexes them (persistence.sql.indexing); until then a
search tests them one by one, so it finds them all the same. A partial index finds
them. PostgreSQL keeps writing documents with the rows (indexing.defers says why);
its schema changes the same way, so that one set of models describes both.

- SQLite: the column loses NOT NULL, which takes a rebuild of `chat_messages` (its
  rows, ids and documents copied as they are, so the FTS5 index stays valid). The
  FTS5 triggers index a row only while it has a document, and remove from the index
  only what it holds.
- PostgreSQL: the column loses NOT NULL, and `persistence_search_terms` becomes
  STRICT, so a NULL document costs no call and generates a NULL tsvector.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""

from __future__ import annotations

import importlib
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

PENDING_INDEX = "ix_chat_messages_pending"
BATCH = 500

_TRIGGERS = ("insert", "delete", "update")
SQLITE_FTS_TRIGGERS = [
    """CREATE TRIGGER chat_messages_fts_insert AFTER INSERT ON chat_messages
    WHEN new.search_text IS NOT NULL BEGIN
        INSERT INTO chat_messages_fts(rowid, search_text) VALUES (new.id, new.search_text);
    END""",
    """CREATE TRIGGER chat_messages_fts_delete AFTER DELETE ON chat_messages
    WHEN old.search_text IS NOT NULL BEGIN
        INSERT INTO chat_messages_fts(chat_messages_fts, rowid, search_text)
        VALUES ('delete', old.id, old.search_text);
    END""",
    # Any UPDATE that changes the document (or the row id) re-indexes the row: out goes
    # what the index holds (nothing for a row not yet indexed), in goes the new document.
    """CREATE TRIGGER chat_messages_fts_update AFTER UPDATE ON chat_messages
    WHEN old.search_text IS NOT new.search_text OR old.id IS NOT new.id BEGIN
        INSERT INTO chat_messages_fts(chat_messages_fts, rowid, search_text)
        SELECT 'delete', old.id, old.search_text WHERE old.search_text IS NOT NULL;
        INSERT INTO chat_messages_fts(rowid, search_text)
        SELECT new.id, new.search_text WHERE new.search_text IS NOT NULL;
    END""",
]
_COLUMNS = "id, message_id, session_id, position, role, content, created_at, metadata, search_text"


def _create_sqlite_messages_table(name: str, document_required: bool) -> None:
    """`chat_messages` as this revision (or, `document_required`, 0004) defines it."""
    op.create_table(
        name,
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("message_id", sa.String(255), nullable=False),
        sa.Column("session_id", sa.String(255), nullable=False),
        sa.Column("position", sa.BigInteger(), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("content", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("metadata", sa.JSON(), nullable=False),
        sa.Column(
            "search_text",
            sa.Text(),
            nullable=not document_required,
            server_default="" if document_required else None,
        ),
        sa.CheckConstraint(
            "role IN ('user', 'assistant', 'system', 'tool')", name=op.f("ck_chat_messages_role")
        ),
        sa.ForeignKeyConstraint(
            ["session_id"],
            ["chat_sessions.session_id"],
            name="fk_chat_messages_session_id_chat_sessions",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_chat_messages"),
        sa.UniqueConstraint("message_id", name="uq_chat_messages_message_id"),
    )


def _rebuild_sqlite_messages(document_required: bool) -> None:
    """Copies `chat_messages` into a table of the wanted definition, rows and ids as
    they are (the FTS5 index refers to the ids), and puts its indexes and triggers back."""
    for trigger in _TRIGGERS:
        op.execute(f"DROP TRIGGER IF EXISTS chat_messages_fts_{trigger}")
    op.execute(f"DROP INDEX IF EXISTS {PENDING_INDEX}")
    _create_sqlite_messages_table("chat_messages_0005", document_required)
    op.execute(
        f"INSERT INTO chat_messages_0005 ({_COLUMNS}) SELECT {_COLUMNS} FROM chat_messages"  # noqa: S608
    )
    op.execute("DROP TABLE chat_messages")
    op.execute("ALTER TABLE chat_messages_0005 RENAME TO chat_messages")
    op.create_index(
        "ix_chat_messages_session_position",
        "chat_messages",
        ["session_id", "position"],
        unique=True,
    )
    if document_required:
        # Revision 0003's triggers (its SQLITE_FTS: the FTS5 table, then its triggers).
        triggers = _revision_0003().SQLITE_FTS[1:]
    else:
        triggers = SQLITE_FTS_TRIGGERS
        op.execute(f"CREATE INDEX {PENDING_INDEX} ON chat_messages (id) WHERE search_text IS NULL")
    for statement in triggers:
        op.execute(statement)


def upgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        _rebuild_sqlite_messages(document_required=False)
        return
    op.alter_column("chat_messages", "search_text", nullable=True, server_default=None)
    op.execute("ALTER FUNCTION persistence_search_terms(text) STRICT")
    op.execute(f"CREATE INDEX {PENDING_INDEX} ON chat_messages (id) WHERE search_text IS NULL")


def _revision_0003() -> Any:
    """Revision 0003's module: its search rule and FTS5 triggers, as they stood."""
    return importlib.import_module("persistence.sql.migrations.versions.0003_search_documents")


def _index_pending_with_the_0003_rule() -> None:
    """Writes the document of every message that has none, by revision 0003's rule."""
    rule = _revision_0003()
    connection = op.get_bind()
    select = sa.text(
        "SELECT id, content FROM chat_messages WHERE search_text IS NULL ORDER BY id LIMIT :batch"
    )
    update = sa.text("UPDATE chat_messages SET search_text = :document WHERE id = :id")
    while rows := connection.execute(select, {"batch": BATCH}).all():
        connection.execute(
            update, [{"id": row[0], "document": rule.search_document(row[1])} for row in rows]
        )


def downgrade() -> None:
    _index_pending_with_the_0003_rule()
    if op.get_bind().dialect.name == "sqlite":
        _rebuild_sqlite_messages(document_required=True)
        return
    op.execute(f"DROP INDEX IF EXISTS {PENDING_INDEX}")
    op.execute("ALTER FUNCTION persistence_search_terms(text) CALLED ON NULL INPUT")
    op.alter_column(
        "chat_messages",
        "search_text",
        nullable=False,
        server_default="",
        existing_type=postgresql.TEXT(),
    )
