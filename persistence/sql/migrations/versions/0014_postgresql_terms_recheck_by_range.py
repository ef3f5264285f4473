# ruff: noqa: S608  # the one formatted statement takes a constant
"""PostgreSQL: the catch-up's cleanup of settled ranges reads only those ranges.

Found by measuring: revision 0013's catch-up deletes, in the ranges a catch-up wrote
once every transaction then running has ended, the terms of rows gone or without a
document. Its planner hashed the whole messages table for that anti-join, every
call: the first search after a bulk insert of 100,000 messages took 3.1-3.3 s, not
2.0-2.1 s before 0013, and the cost of each call grew with the store (36.9 ms of a
call's cleanup at 100,000 messages, of which 34 ms hashing all of them). Each range
now sets its terms' ids against its own messages' ids, both read by their primary
keys: 3.8 ms for the same 16 ranges, whatever the store's size.

And the candidates are locked before they are deleted, then tested again in a snapshot
taken after: found by attack on the first version of this revision (0013 had it too),
a live row moved onto a gone row's id by an UPDATE from outside the library,
committed while the delete waited on the terms row the move's trigger rewrote, lost
its new terms, and no search found it.

SQLite is unchanged.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-06
"""

from __future__ import annotations

from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


# Revision 0013's catch-up, its first statement `cleanup` (the terms of rows gone from
# the settled ranges), with the further `variables` it declares.
def _write_pending_terms(cleanup: str, variables: str = "") -> str:
    return f"""CREATE OR REPLACE FUNCTION persistence_write_pending_terms(
        ranges integer, OUT taken bigint, OUT written bigint)
    LANGUAGE plpgsql AS $$
    DECLARE
        firsts bigint[];
        lasts bigint[];{variables}
    BEGIN
        -- Ranges written by catch-ups that every transaction then running has ended
        -- since: terms of rows those removed or cleared go (a fresh snapshot sees them).
        WITH settled AS (DELETE FROM chat_terms_recheck WHERE recheck IN
            (SELECT recheck FROM chat_terms_recheck
             WHERE settled_at <= txid_snapshot_xmin(txid_current_snapshot())
             ORDER BY recheck LIMIT ranges FOR UPDATE SKIP LOCKED)
            RETURNING first_id, last_id)
{cleanup}
        WITH took AS (DELETE FROM chat_terms_pending WHERE pending IN
            (SELECT pending FROM chat_terms_pending ORDER BY pending LIMIT ranges
             FOR UPDATE SKIP LOCKED) RETURNING first_id, last_id)
        SELECT coalesce(array_agg(first_id), '{{}}'), coalesce(array_agg(last_id), '{{}}'),
            count(*)
        INTO firsts, lasts, taken FROM took;
        INSERT INTO chat_message_terms (id, terms)
        SELECT m.id, persistence_search_terms(m.search_text)
        FROM unnest(firsts, lasts) AS r(first_id, last_id) CROSS JOIN LATERAL
            (SELECT m.id, m.search_text FROM chat_messages AS m
             WHERE m.id BETWEEN r.first_id AND r.last_id AND m.search_text IS NOT NULL
             OFFSET 0) AS m
        ON CONFLICT (id) DO NOTHING;
        GET DIAGNOSTICS written = ROW_COUNT;
        IF taken > 0 THEN
            INSERT INTO chat_terms_recheck (first_id, last_id, settled_at)
            SELECT r.first_id, r.last_id, txid_snapshot_xmax(txid_current_snapshot())
            FROM unnest(firsts, lasts) AS r(first_id, last_id);
        END IF;
    END $$"""


# One set difference per range, in an array computed once: the candidates, found by
# their keys. Then, each statement in a snapshot of its own, their terms rows are locked
# and deleted where, seen after the locks are held, no message with a document holds
# their id. Found by attack: a row moved onto a candidate's id (an UPDATE of its id from
# outside the library), committed while the delete waited on the terms row its trigger
# rewrote, lost its new terms, as the delete tested only the id again.
_BY_RANGE = """        SELECT coalesce(array_agg(g.id), '{}') INTO gone FROM settled AS r
        CROSS JOIN LATERAL
            (SELECT t.id FROM chat_message_terms AS t
             WHERE t.id BETWEEN r.first_id AND r.last_id
             EXCEPT ALL SELECT m.id FROM chat_messages AS m
             WHERE m.id BETWEEN r.first_id AND r.last_id AND m.search_text IS NOT NULL)
            AS g;
        IF cardinality(gone) > 0 THEN
            PERFORM 1 FROM chat_message_terms WHERE id = ANY (gone) FOR UPDATE;
            DELETE FROM chat_message_terms AS t WHERE t.id = ANY (gone) AND NOT EXISTS
                (SELECT 1 FROM chat_messages AS m
                 WHERE m.id = t.id AND m.search_text IS NOT NULL);
        END IF;"""
# 0013's: an anti-join the planner hashed the whole messages table for.
_ANTI_JOIN = """        DELETE FROM chat_message_terms AS t USING settled AS r
        WHERE t.id BETWEEN r.first_id AND r.last_id AND NOT EXISTS
            (SELECT 1 FROM chat_messages AS m WHERE m.id = t.id AND m.search_text IS NOT NULL);"""
UPGRADE = _write_pending_terms(_BY_RANGE, "\n        gone bigint[];")
DOWNGRADE = _write_pending_terms(_ANTI_JOIN)


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(UPGRADE)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(DOWNGRADE)
