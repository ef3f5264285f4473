# ruff: noqa: S608  # the one formatted statement takes a constant
"""PostgreSQL: a message removed while another transaction writes its pending terms
leaves no terms behind.

Found by attack: a search's catch-up (persistence.sql.indexing) took a pending range
and wrote the terms of the rows it held; a session deleted (or rewound) meanwhile by
another process ran the delete trigger of 0009, which could not see those terms,
uncommitted, and removed none. The catch-up then committed terms of messages that no
longer exist: results stayed right (a search joins the messages), but the terms table
kept them for good. Two changes close it:

- The catch-up is one function, `persistence_write_pending_terms(ranges)`, of two
  statements: the first takes the ranges (their rows locked until commit), the second
  reads the messages in a snapshot taken after the locks are held. A removal committed
  before the ranges were taken is seen there, and its messages get no terms.
- The delete trigger first locks, FOR SHARE, the pending ranges that reach the removed
  rows (those between the first and the last of them). A catch-up that took one holds
  it: the trigger waits for its commit, then deletes the terms in a new snapshot,
  which holds them. A range not taken yet stays locked until the removal commits, so a
  catch-up skips it (SKIP LOCKED) and a later one reads the messages gone.
- The update trigger (an edit's new terms) locks the range of the row it changes the
  same way, before it writes: an UPDATE that cleared a document or changed a row's id
  left the catch-up's terms behind too (found by attack). And a catch-up can no longer
  wait for a transaction that waits for it: its only waits are on terms rows a
  transaction wrote, which in a pending range only the update trigger writes, holding
  the range, which the catch-up then skips. Found by attack: a unit of work that edited
  a pending row, then deleted a session in its range while a catch-up held it, was
  aborted as a deadlock when the catch-up reached the edited row within the second
  PostgreSQL waits before it looks for one.

- A range is recorded with its rows, at its statement's commit: a removal whose
  trigger ran before then cannot see, nor lock, a range that spans its rows (found by
  attack: a slow INSERT ... SELECT spanning another session's rows, committed while a
  unit of work deleting that session stayed open; the catch-up then wrote the terms of
  all 40 deleted rows). So a catch-up records the ranges it wrote in
  `chat_terms_recheck`, and a catch-up after every transaction then running has ended
  deletes, in those ranges, the terms of rows gone or without a document.

SQLite is unchanged (its documents live in the message rows).

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-06
"""

from __future__ import annotations

from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def _terms_changed(lock: str) -> str:
    """The update trigger's function: 0009's, `lock` first."""
    return f"""CREATE OR REPLACE FUNCTION persistence_terms_changed() RETURNS trigger
    LANGUAGE plpgsql AS $$
    BEGIN{lock}
        IF NEW.search_text IS NULL THEN
            DELETE FROM chat_message_terms WHERE id = NEW.id;
        ELSE
            INSERT INTO chat_message_terms (id, terms)
            VALUES (NEW.id, persistence_search_terms(NEW.search_text))
            ON CONFLICT (id) DO UPDATE SET terms = EXCLUDED.terms;
        END IF;
        IF NEW.id <> OLD.id THEN
            DELETE FROM chat_message_terms WHERE id = OLD.id;
        END IF;
        RETURN NULL;
    END $$"""


UPGRADE = [
    # The ranges a catch-up wrote, to look at again once every transaction running
    # while it wrote has ended (`settled_at`: a transaction id; all below it ended).
    """CREATE TABLE chat_terms_recheck (
        recheck bigserial CONSTRAINT pk_chat_terms_recheck PRIMARY KEY,
        first_id bigint NOT NULL,
        last_id bigint NOT NULL,
        settled_at bigint NOT NULL)""",
    # Each statement of a plpgsql function takes its own snapshot (READ COMMITTED).
    # OFFSET 0 keeps the planner from joining the ranges to a scan of the whole table
    # (200 ms for 16 ranges at 50,000 rows, not 26). A row of another writer inside a
    # range and not yet visible has a range of its own, or got its terms in its own
    # statement; an edited row's terms are already written (DO NOTHING).
    """CREATE FUNCTION persistence_write_pending_terms(
        ranges integer, OUT taken bigint, OUT written bigint)
    LANGUAGE plpgsql AS $$
    DECLARE
        firsts bigint[];
        lasts bigint[];
    BEGIN
        -- Ranges written by catch-ups that every transaction then running has ended
        -- since: terms of rows those removed or cleared go (a fresh snapshot sees them).
        WITH settled AS (DELETE FROM chat_terms_recheck WHERE recheck IN
            (SELECT recheck FROM chat_terms_recheck
             WHERE settled_at <= txid_snapshot_xmin(txid_current_snapshot())
             ORDER BY recheck LIMIT ranges FOR UPDATE SKIP LOCKED)
            RETURNING first_id, last_id)
        DELETE FROM chat_message_terms AS t USING settled AS r
        WHERE t.id BETWEEN r.first_id AND r.last_id AND NOT EXISTS
            (SELECT 1 FROM chat_messages AS m WHERE m.id = t.id AND m.search_text IS NOT NULL);
        WITH took AS (DELETE FROM chat_terms_pending WHERE pending IN
            (SELECT pending FROM chat_terms_pending ORDER BY pending LIMIT ranges
             FOR UPDATE SKIP LOCKED) RETURNING first_id, last_id)
        SELECT coalesce(array_agg(first_id), '{}'), coalesce(array_agg(last_id), '{}'),
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
    END $$""",
    """CREATE OR REPLACE FUNCTION persistence_terms_truncated() RETURNS trigger
    LANGUAGE plpgsql AS $$
    BEGIN
        TRUNCATE chat_message_terms, chat_terms_pending, chat_terms_recheck;
        RETURN NULL;
    END $$""",
    """CREATE OR REPLACE FUNCTION persistence_terms_deleted() RETURNS trigger
    LANGUAGE plpgsql AS $$
    DECLARE
        first_removed bigint;
        last_removed bigint;
    BEGIN
        SELECT min(id), max(id) INTO first_removed, last_removed FROM removed;
        IF first_removed IS NULL THEN
            RETURN NULL;
        END IF;
        -- Waits for a catch-up writing terms of these rows (0013).
        PERFORM 1 FROM chat_terms_pending
        WHERE first_id <= last_removed AND last_id >= first_removed FOR SHARE;
        DELETE FROM chat_message_terms AS t USING removed WHERE t.id = removed.id;
        RETURN NULL;
    END $$""",
    _terms_changed(
        """
        -- Waits for a catch-up writing terms of this row (0013).
        PERFORM 1 FROM chat_terms_pending
        WHERE first_id <= greatest(NEW.id, OLD.id) AND last_id >= least(NEW.id, OLD.id)
        FOR SHARE;"""
    ),
]

DOWNGRADE = [
    _terms_changed(""),
    """CREATE OR REPLACE FUNCTION persistence_terms_deleted() RETURNS trigger
    LANGUAGE plpgsql AS $$
    BEGIN
        DELETE FROM chat_message_terms AS t USING removed WHERE t.id = removed.id;
        RETURN NULL;
    END $$""",
    """CREATE OR REPLACE FUNCTION persistence_terms_truncated() RETURNS trigger
    LANGUAGE plpgsql AS $$
    BEGIN
        TRUNCATE chat_message_terms, chat_terms_pending;
        RETURN NULL;
    END $$""",
    "DROP FUNCTION persistence_write_pending_terms(integer)",
    "DROP TABLE chat_terms_recheck",
]


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for statement in UPGRADE:
            op.execute(statement)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for statement in DOWNGRADE:
            op.execute(statement)
