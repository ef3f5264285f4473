"""Session counts on PostgreSQL: a transaction counts in slots no other one holds.

Found by attack: concurrent multi-row inserts of new sessions deadlocked (8 tasks
inserting batches of 30 sessions each: 111 of 120 batches failed with "deadlock
detected"; `migrate` into PostgreSQL beside a writer failed the same way). Each row's
trigger added to the count row of its session id's slot (0004), so one statement
locked several count rows in the order its rows came, and two statements each held a
row the other wanted; a count row also made a circle with the session rows two
transactions held.

Now a transaction's count changes go to a slot it holds a transaction-level advisory
lock on, taken without waiting (`pg_try_advisory_xact_lock`): the slot
`txid_current() % 16` if free, else the next free one. Only the holder of a slot's
lock touches that slot's rows, so a count change never waits for another
transaction, and counts are in no circle of waits (found by attack: a first version
waited for the slot's lock and so made circles with session rows, and with the
library's own waits between units of work). Only when all 16 slots are held does a
transaction wait for one. Inserts and deletes count by statement, from transition
tables (one upsert a statement instead of one a row); a change of status stays a row
trigger. A count is the sum of its slots, as before: no row moves.

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

# Only the constants above are formatted into these statements.
_SLOT_FUNCTION = f"""CREATE FUNCTION chat_session_counts_slot() RETURNS int
LANGUAGE plpgsql AS $$
    DECLARE
        first int := (txid_current() % {SLOTS})::int;
    BEGIN
        FOR step IN 0..{SLOTS - 1} LOOP
            IF pg_try_advisory_xact_lock({LOCK_CLASS}, (first + step) % {SLOTS}) THEN
                RETURN (first + step) % {SLOTS};
            END IF;
        END LOOP;
        PERFORM pg_advisory_xact_lock({LOCK_CLASS}, first);
        RETURN first;
    END $$"""
_ADD_BY_TRANSACTION = f"""CREATE OR REPLACE FUNCTION chat_session_counts_add(
    counted_status text, session_id text, delta bigint
) RETURNS void LANGUAGE sql AS $$
    {_UPSERT.format(rows="VALUES (counted_status, chat_session_counts_slot(), delta)")}
$$"""
_ADD_BY_SESSION = f"""CREATE OR REPLACE FUNCTION chat_session_counts_add(
    counted_status text, session_id text, delta bigint
) RETURNS void LANGUAGE sql AS $$
    {_UPSERT.format(rows=f"VALUES (counted_status, abs(hashtext(session_id)) % {SLOTS}, delta)")}
$$"""


def _statement_function(name: str, rows: str, sign: str) -> str:
    """A statement trigger's function: the statement's rows (transition table `rows`)
    counted by status, added (`sign` "") or taken (`-`) in one upsert."""
    counted = f"SELECT status, chosen, {sign}count(*) FROM {rows} GROUP BY status ORDER BY status"  # noqa: S608
    return f"""CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $$
    DECLARE
        chosen int;
    BEGIN
        IF NOT EXISTS (SELECT FROM {rows}) THEN
            RETURN NULL;
        END IF;
        chosen := chat_session_counts_slot();
        {_UPSERT.format(rows=counted)};
        RETURN NULL;
    END $$"""


# Inserts and deletes count by statement, from transition tables: one upsert a
# statement instead of one a row. A change of status stays a row trigger (0004's,
# through chat_session_counts_add).
_UPGRADE = [
    _SLOT_FUNCTION,
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
    "DROP FUNCTION chat_session_counts_slot()",
]


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for statement in _UPGRADE:
            op.execute(statement)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for statement in _DOWNGRADE:
            op.execute(statement)
