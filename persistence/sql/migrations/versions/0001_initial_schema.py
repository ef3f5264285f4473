"""Initial schema: sessions, messages, file records, full-text search.

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
ROW_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
TIMESTAMP = sa.DateTime(timezone=True)

SQLITE_FTS = [
    # External-content FTS5 index over chat_messages.content, kept in step by triggers.
    """CREATE VIRTUAL TABLE chat_messages_fts USING fts5(
        content, content='chat_messages', content_rowid='id',
        tokenize='unicode61 remove_diacritics 0')""",
    """CREATE TRIGGER chat_messages_fts_insert AFTER INSERT ON chat_messages BEGIN
        INSERT INTO chat_messages_fts(rowid, content) VALUES (new.id, new.content);
    END""",
    """CREATE TRIGGER chat_messages_fts_delete AFTER DELETE ON chat_messages BEGIN
        INSERT INTO chat_messages_fts(chat_messages_fts, rowid, content)
        VALUES ('delete', old.id, old.content);
    END""",
    """CREATE TRIGGER chat_messages_fts_update AFTER UPDATE OF content ON chat_messages BEGIN
        INSERT INTO chat_messages_fts(chat_messages_fts, rowid, content)
        VALUES ('delete', old.id, old.content);
        INSERT INTO chat_messages_fts(rowid, content) VALUES (new.id, new.content);
    END""",
]


def upgrade() -> None:
    op.create_table(
        "chat_sessions",
        sa.Column("session_id", sa.String(255), nullable=False),
        sa.Column("model", sa.String(255), nullable=False),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.Column("updated_at", TIMESTAMP, nullable=False),
        sa.Column("message_count", sa.BigInteger(), nullable=False),
        sa.Column("metadata", JSON, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.CheckConstraint(
            "status IN ('active', 'archived', 'expired')", name="ck_chat_sessions_status"
        ),
        sa.CheckConstraint("message_count >= 0", name="ck_chat_sessions_message_count"),
        sa.PrimaryKeyConstraint("session_id", name="pk_chat_sessions"),
    )
    op.create_index("ix_chat_sessions_updated", "chat_sessions", ["updated_at", "session_id"])
    op.create_index(
        "ix_chat_sessions_status_updated", "chat_sessions", ["status", "updated_at", "session_id"]
    )

    op.create_table(
        "chat_messages",
        sa.Column("id", ROW_ID, autoincrement=True, nullable=False),
        sa.Column("message_id", sa.String(255), nullable=False),
        sa.Column("session_id", sa.String(255), nullable=False),
        sa.Column("position", sa.BigInteger(), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("content", sa.Text(), nullable=False),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.Column("metadata", JSON, nullable=False),
        sa.CheckConstraint(
            "role IN ('user', 'assistant', 'system', 'tool')", name="ck_chat_messages_role"
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
    op.create_index(
        "ix_chat_messages_session_position",
        "chat_messages",
        ["session_id", "position"],
        unique=True,
    )

    op.create_table(
        "uploaded_files",
        sa.Column("file_id", sa.String(255), nullable=False),
        sa.Column("gemini_file_name", sa.Text(), nullable=False),
        sa.Column("gemini_file_uri", sa.Text(), nullable=False),
        sa.Column("display_name", sa.Text(), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("mime_type", sa.Text(), nullable=False),
        sa.Column("uploaded_at", TIMESTAMP, nullable=False),
        sa.Column("expires_at", TIMESTAMP, nullable=False),
        sa.Column("metadata", JSON, nullable=False),
        sa.CheckConstraint("size >= 0", name="ck_uploaded_files_size"),
        sa.PrimaryKeyConstraint("file_id", name="pk_uploaded_files"),
    )
    op.create_index("ix_uploaded_files_expires_at", "uploaded_files", ["expires_at"])
    op.create_index("ix_uploaded_files_uploaded", "uploaded_files", ["uploaded_at", "file_id"])

    dialect = op.get_bind().dialect.name
    if dialect == "sqlite":
        for statement in SQLITE_FTS:
            op.execute(statement)
    elif dialect == "postgresql":
        # tsvector holds at most 1 MB; the first 100,000 characters always fit.
        op.execute(
            "CREATE INDEX ix_chat_messages_content_tsv ON chat_messages"
            " USING gin (to_tsvector('simple'::regconfig, left(content, 100000)))"
        )


def downgrade() -> None:
    dialect = op.get_bind().dialect.name
    if dialect == "sqlite":
        for trigger in ("insert", "delete", "update"):
            op.execute(f"DROP TRIGGER IF EXISTS chat_messages_fts_{trigger}")
        op.execute("DROP TABLE IF EXISTS chat_messages_fts")
    elif dialect == "postgresql":
        op.execute("DROP INDEX IF EXISTS ix_chat_messages_content_tsv")
    op.drop_table("uploaded_files")
    op.drop_table("chat_messages")
    op.drop_table("chat_sessions")
