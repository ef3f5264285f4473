"""Session counts on PostgreSQL: each transaction counts in one slot, taken whole.

Found by attack: concurrent multi-row inserts of new sessions deadlocked (8 tasks
inserting batches of 30 sessions each: 111 of 120 batches failed with "deadlock
detected"; `migrate` into PostgreSQL beside a writer failed the same way). Each row's
trigger added to the count row of its session id's slot (0004), so one statement
locked several count rows in the order its rows came, and two statements each held a
row the other wanted. Now every count change of a transaction goes to the slot of
that transaction (`txid_current() % 16`), and takes a transaction-level advisory
lock on that slot first: a transaction holds the count rows of one slot only, taken
before any of them, so count rows never close a circle, and two transactions that
draw one slot take turns. A count is the sum of its slots, as before: no row moves.

SQLite (one writer at a time, one slot) is unchanged.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-05
"""

from __future__ import annotations

from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

SLOTS = 16
# The advisory lock's first key: "pers" in ASCII, the second is the slot.
LOCK_CLASS = 0x70657273

_UPSERT = """INSERT INTO chat_session_counts (status, slot, sessions)
        {rows}
        ON CONFLICT (status, slot)
        DO UPDATE SET sessions = chat_session_counts.sessions + EXCLUDED.sessions"""
# The slot of the running transaction, locked before any of its count rows.
_SLOT = f"(txid_current() % {SLOTS})::int"
_LOCK = f"pg_advisory_xact_lock({LOCK_CLASS}, {_SLOT})"

# Only the constants above are formatted into these statements.
_ADD_BY_TRANSACTION = f"""CREATE OR REPLACE FUNCTION chat_session_counts_add(
    counted_status text, session_id text, delta bigint
) RETURNS void LANGUAGE sql AS $$
    SELECT {_LOCK};
    {_UPSERT.format(rows=f"VALUES (counted_status, {_SLOT}, delta)")}
$$"""
_ADD_BY_SESSION = f"""CREATE OR REPLACE FUNCTION chat_session_counts_add(
    counted_status text, session_id text, delta bigint
) RETURNS void LANGUAGE sql AS $$
    {_UPSERT.format(rows=f"VALUES (counted_status, abs(hashtext(session_id)) % {SLOTS}, delta)")}
$$"""


def _statement_function(name: str, rows: str, sign: str) -> str:
    """A statement trigger's function: the statement's rows (transition table `rows`)
    counted by status, added (`sign` "") or taken (`-`) in one upsert."""
    counted = f"SELECT status, {_SLOT}, {sign}count(*) FROM {rows} GROUP BY status ORDER BY status"  # noqa: S608
    return f"""CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF NOT EXISTS (SELECT FROM {rows}) THEN
            RETURN NULL;
        END IF;
        PERFORM {_LOCK};
        {_UPSERT.format(rows=counted)};
        RETURN NULL;
    END $$"""


# Inserts and deletes count by statement, from transition tables: one upsert a
# statement instead of one a row. A change of status stays a row trigger (0004's,
# through chat_session_counts_add).
_UPGRADE = [
    _ADD_BY_TRANSACTION,
    _statement_function("chat_session_counts_inserted", "inserted_rows", ""),
    _statement_function("chat_session_counts_deleted", "deleted_rows", "-"),
    "DROP TRIGGER chat_session_counts_insert_delete ON chat_sessions",
    """CREATE TRIGGER chat_session_counts_insert AFTER INSERT ON chat_sessions
    REFERENCING NEW TABLE AS inserted_rows
    FOR EACH STATEMENT EXECUTE FUNCTION chat_session_counts_inserted()""",
    """CREATE TRIGGER chat_session_counts_delete AFTER DELETE ON chat_sessions
    REFERENCING OLD TABLE AS deleted_rows
    FOR EACH STATEMENT EXECUTE FUNCTION chat_session_counts_deleted()""",
]
_DOWNGRADE = [
    "DROP TRIGGER chat_session_counts_insert ON chat_sessions",
    "DROP TRIGGER chat_session_counts_delete ON chat_sessions",
    "DROP FUNCTION chat_session_counts_inserted()",
    "DROP FUNCTION chat_session_counts_deleted()",
    """CREATE TRIGGER chat_session_counts_insert_delete AFTER INSERT OR DELETE ON chat_sessions
    FOR EACH ROW EXECUTE FUNCTION chat_session_counts_trigger()""",
    _ADD_BY_SESSION,
]


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for statement in _UPGRADE:
            op.execute(statement)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for statement in _DOWNGRADE:
            op.execute(statement)
