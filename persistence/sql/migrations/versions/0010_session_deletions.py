"""A record of deleted sessions, so that a save of unknown outcome never brings one back.

A new session's first save can fail with its outcome unknown (cancelled, cut off at
COMMIT). If it landed and another writer then deleted the session, the object's next
save found no row and created the session again: the store kept no record of the
delete. Now every row deleted from `chat_sessions`, by the library or by hand, leaves
its id and incarnation in `chat_session_deletions` (a trigger), and a save that
retries such a creation looks there first (persistence.sql.writes). An incarnation is
drawn for each creation, so a session created again under the same id is another row
of this table, never confused with the one deleted.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa

from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

_POSTGRESQL = [
    """CREATE FUNCTION chat_session_deletions_record() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        INSERT INTO chat_session_deletions (session_id, incarnation, deleted_at)
        VALUES (OLD.session_id, OLD.incarnation, now())
        ON CONFLICT DO NOTHING;
        RETURN NULL;
    END $$""",
    """CREATE TRIGGER chat_session_deletions_record AFTER DELETE ON chat_sessions
    FOR EACH ROW EXECUTE FUNCTION chat_session_deletions_record()""",
]
# The timestamp in UtcDateTime's SQLite form (persistence.sql.types).
_SQLITE = [
    """CREATE TRIGGER chat_session_deletions_record AFTER DELETE ON chat_sessions BEGIN
        INSERT OR IGNORE INTO chat_session_deletions (session_id, incarnation, deleted_at)
        VALUES (old.session_id, old.incarnation,
                strftime('%Y-%m-%d %H:%M:%f', 'now') || '000+00:00');
    END""",
]


def upgrade() -> None:
    op.create_table(
        "chat_session_deletions",
        sa.Column("session_id", sa.String(255), nullable=False),
        sa.Column("incarnation", sa.String(32), nullable=False),
        sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint(
            "session_id", "incarnation", name=op.f("pk_chat_session_deletions")
        ),
    )
    postgresql = op.get_bind().dialect.name == "postgresql"
    for statement in _POSTGRESQL if postgresql else _SQLITE:
        op.execute(statement)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS chat_session_deletions_record ON chat_sessions")
        op.execute("DROP FUNCTION IF EXISTS chat_session_deletions_record()")
    else:
        op.execute("DROP TRIGGER IF EXISTS chat_session_deletions_record")
    op.drop_table("chat_session_deletions")
