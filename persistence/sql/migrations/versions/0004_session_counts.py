"""Session counts by status, kept by triggers: startup and statistics without a table scan.

`chat_session_counts` holds, per status, the number of sessions, spread over slots so
that sessions created at once by many writers do not queue on one row (PostgreSQL
picks the slot from a hash of the session id; SQLite has one writer at a time, so
one slot). Triggers on `chat_sessions` keep it exact: an insert adds one, a delete
removes one, a change of status moves one. Appending messages changes no status,
so appends never touch it. A count is the sum of a few rows, whatever the store.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

SLOTS = 16

# Only the constant SLOTS is formatted into these statements.
_POSTGRESQL = [
    f"""CREATE FUNCTION chat_session_counts_add(counted_status text, session_id text, delta bigint)
    RETURNS void LANGUAGE sql AS $$
        INSERT INTO chat_session_counts (status, slot, sessions)
        VALUES (counted_status, abs(hashtext(session_id)) % {SLOTS}, delta)
        ON CONFLICT (status, slot)
        DO UPDATE SET sessions = chat_session_counts.sessions + EXCLUDED.sessions
    $$""",  # noqa: S608
    """CREATE FUNCTION chat_session_counts_trigger() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF TG_OP IN ('UPDATE', 'DELETE') THEN
            PERFORM chat_session_counts_add(OLD.status, OLD.session_id, -1);
        END IF;
        IF TG_OP IN ('UPDATE', 'INSERT') THEN
            PERFORM chat_session_counts_add(NEW.status, NEW.session_id, 1);
        END IF;
        RETURN NULL;
    END $$""",
    """CREATE TRIGGER chat_session_counts_insert_delete AFTER INSERT OR DELETE ON chat_sessions
    FOR EACH ROW EXECUTE FUNCTION chat_session_counts_trigger()""",
    """CREATE TRIGGER chat_session_counts_status AFTER UPDATE OF status ON chat_sessions
    FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status)
    EXECUTE FUNCTION chat_session_counts_trigger()""",
    # TRUNCATE fires no row triggers: it empties the counts with the table.
    """CREATE FUNCTION chat_session_counts_clear() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        DELETE FROM chat_session_counts;
        RETURN NULL;
    END $$""",
    """CREATE TRIGGER chat_session_counts_truncate AFTER TRUNCATE ON chat_sessions
    FOR EACH STATEMENT EXECUTE FUNCTION chat_session_counts_clear()""",
]
_POSTGRESQL_BACKFILL = f"""INSERT INTO chat_session_counts (status, slot, sessions)
    SELECT status, abs(hashtext(session_id)) % {SLOTS}, count(*) FROM chat_sessions
    GROUP BY 1, 2"""  # noqa: S608

_SQLITE_ADD = """INSERT INTO chat_session_counts (status, slot, sessions)
        VALUES ({status}, 0, {delta})
        ON CONFLICT (status, slot) DO UPDATE SET sessions = sessions + excluded.sessions;"""
_SQLITE = [
    f"""CREATE TRIGGER chat_session_counts_insert AFTER INSERT ON chat_sessions BEGIN
        {_SQLITE_ADD.format(status="new.status", delta=1)}
    END""",
    f"""CREATE TRIGGER chat_session_counts_delete AFTER DELETE ON chat_sessions BEGIN
        {_SQLITE_ADD.format(status="old.status", delta=-1)}
    END""",
    f"""CREATE TRIGGER chat_session_counts_status AFTER UPDATE OF status ON chat_sessions
    WHEN old.status IS NOT new.status BEGIN
        {_SQLITE_ADD.format(status="old.status", delta=-1)}
        {_SQLITE_ADD.format(status="new.status", delta=1)}
    END""",
]
_SQLITE_BACKFILL = """INSERT INTO chat_session_counts (status, slot, sessions)
    SELECT status, 0, count(*) FROM chat_sessions GROUP BY status"""


def upgrade() -> None:
    op.create_table(
        "chat_session_counts",
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("slot", sa.Integer(), nullable=False),
        sa.Column("sessions", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("status", "slot", name=op.f("pk_chat_session_counts")),
    )
    postgresql = op.get_bind().dialect.name == "postgresql"
    for statement in _POSTGRESQL if postgresql else _SQLITE:
        op.execute(statement)
    op.execute(_POSTGRESQL_BACKFILL if postgresql else _SQLITE_BACKFILL)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS chat_session_counts_status ON chat_sessions")
        op.execute("DROP TRIGGER IF EXISTS chat_session_counts_insert_delete ON chat_sessions")
        op.execute("DROP TRIGGER IF EXISTS chat_session_counts_truncate ON chat_sessions")
        op.execute("DROP FUNCTION IF EXISTS chat_session_counts_clear()")
        op.execute("DROP FUNCTION IF EXISTS chat_session_counts_trigger()")
        op.execute("DROP FUNCTION IF EXISTS chat_session_counts_add(text, text, bigint)")
    else:
        for trigger in ("insert", "delete", "status"):
            op.execute(f"DROP TRIGGER IF EXISTS chat_session_counts_{trigger}")
    op.drop_table("chat_session_counts")
