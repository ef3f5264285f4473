"""A record of deleted sessions, so that a save of unknown outcome never brings one back.

A new session's first save can fail with its outcome unknown (cancelled, cut off at
COMMIT). If it landed and another writer then deleted the session, the object's next
save found no row and created the session again: the store kept no record of the
delete. Now every row deleted from `chat_sessions`, by the library or by hand
(TRUNCATE included on PostgreSQL), leaves its id and incarnation in
`chat_session_deletions` (triggers), and a save that retries such a creation looks
there first (persistence.sql.writes). An incarnation is drawn for each creation, so a
session created again under the same id is another row of this table, never confused
with the one deleted.

A new object whose id is taken merges into the stored session instead of creating it
(README, Several writers): its creation's incarnation is then recorded in
`chat_session_merges`, and the delete of the session it merged into records it as
deleted too (found by attack: such a creation of unknown outcome was created again
after that delete).

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

# What a deleted row's (old.session_id, old.incarnation) records, as {old} names it:
# itself, and the creations merged into it. The timestamp is {now}.
_RECORD = """
        INSERT INTO chat_session_deletions (session_id, incarnation, deleted_at)
        VALUES ({old}.session_id, {old}.incarnation, {now})
        ON CONFLICT DO NOTHING;
        INSERT INTO chat_session_deletions (session_id, incarnation, deleted_at)
        SELECT session_id, incarnation, {now} FROM chat_session_merges
        WHERE session_id = {old}.session_id AND into_incarnation = {old}.incarnation
        ON CONFLICT DO NOTHING;
        DELETE FROM chat_session_merges
        WHERE session_id = {old}.session_id AND into_incarnation = {old}.incarnation;"""

_POSTGRESQL = [
    f"""CREATE FUNCTION chat_session_deletions_record() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN{_RECORD.format(old="OLD", now="now()")}
        RETURN NULL;
    END $$""",
    """CREATE TRIGGER chat_session_deletions_record AFTER DELETE ON chat_sessions
    FOR EACH ROW EXECUTE FUNCTION chat_session_deletions_record()""",
    # TRUNCATE fires no row trigger: every row is recorded before it goes.
    """CREATE FUNCTION chat_session_deletions_truncate() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        INSERT INTO chat_session_deletions (session_id, incarnation, deleted_at)
        SELECT session_id, incarnation, now() FROM chat_sessions
        UNION ALL
        SELECT session_id, incarnation, now() FROM chat_session_merges
        ON CONFLICT DO NOTHING;
        DELETE FROM chat_session_merges;
        RETURN NULL;
    END $$""",
    """CREATE TRIGGER chat_session_deletions_truncate BEFORE TRUNCATE ON chat_sessions
    FOR EACH STATEMENT EXECUTE FUNCTION chat_session_deletions_truncate()""",
]
# The timestamp in UtcDateTime's SQLite form (persistence.sql.types).
_SQLITE_NOW = "strftime('%Y-%m-%d %H:%M:%f', 'now') || '000+00:00'"
_SQLITE = [
    f"""CREATE TRIGGER chat_session_deletions_record AFTER DELETE ON chat_sessions BEGIN{
        _RECORD.format(old="old", now=_SQLITE_NOW)
    }
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
    op.create_table(
        "chat_session_merges",
        sa.Column("session_id", sa.String(255), nullable=False),
        sa.Column("incarnation", sa.String(32), nullable=False),
        sa.Column("into_incarnation", sa.String(32), nullable=False),
        sa.PrimaryKeyConstraint("session_id", "incarnation", name=op.f("pk_chat_session_merges")),
    )
    postgresql = op.get_bind().dialect.name == "postgresql"
    for statement in _POSTGRESQL if postgresql else _SQLITE:
        op.execute(statement)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS chat_session_deletions_record ON chat_sessions")
        op.execute("DROP TRIGGER IF EXISTS chat_session_deletions_truncate ON chat_sessions")
        op.execute("DROP FUNCTION IF EXISTS chat_session_deletions_record()")
        op.execute("DROP FUNCTION IF EXISTS chat_session_deletions_truncate()")
    else:
        op.execute("DROP TRIGGER IF EXISTS chat_session_deletions_record")
    op.drop_table("chat_session_merges")
    op.drop_table("chat_session_deletions")
