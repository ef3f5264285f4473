# ruff: noqa: S608  # the one formatted statement takes a constant
"""PostgreSQL keeps search terms in a table of their own; bulk inserts leave them pending.

Until now every message row carried a generated `search_terms` tsvector with a GIN
index. Computing the terms and indexing them was about a third of what the server
spent storing a bulk insert (6.7 of 19 ms for 1,000 rows). Now:

- `chat_message_terms(id, terms)` holds the terms of each message, keyed by its row
  id, with the GIN index. Row ids are never reused, so a terms row whose message is
  gone can never be taken for another message's; deletes remove them anyway.
- After every INSERT into chat_messages (COPY and writes that bypass the library
  included), a statement trigger writes the terms of a statement of at most
  SMALL_INSERT rows at once (appends), and records a larger one's range of row ids
  in `chat_terms_pending`. The next search on the primary writes the pending terms
  (persistence.sql.indexing); until then, searches test pending messages against their
  document, which the row still carries (persistence.sql.search).
- A changed document (an edit) rewrites its terms at once; a delete removes them.
- Searches read the GIN index through `persistence_terms_matching()`, which plans its
  one query with sequential scans off. The terms table is narrow, and the planner,
  which prices a tsvector match as a cheap operator, judged a scan of all of it (2 ms
  at 20,000 rows, growing with the store) cheaper than the index (0.3 ms).

The terms are the same tsvector as before (`persistence_search_terms`), moved, not
recomputed. SQLite is unchanged: its inserts already leave their documents pending
(revision 0005).

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-02
"""

from __future__ import annotations

from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

# Statements of at most this many rows get their terms in the statement's trigger.
SMALL_INSERT = 32

UPGRADE = [
    """CREATE TABLE chat_message_terms (
        id bigint CONSTRAINT pk_chat_message_terms PRIMARY KEY,
        terms tsvector NOT NULL)""",
    # Its own sequence orders the ranges, so the oldest are indexed first.
    """CREATE TABLE chat_terms_pending (
        pending bigserial CONSTRAINT pk_chat_terms_pending PRIMARY KEY,
        first_id bigint NOT NULL,
        last_id bigint NOT NULL,
        CONSTRAINT ck_chat_terms_pending_range CHECK (first_id <= last_id))""",
    """INSERT INTO chat_message_terms (id, terms)
        SELECT id, search_terms FROM chat_messages WHERE search_terms IS NOT NULL""",
    "ALTER TABLE chat_messages DROP COLUMN search_terms",
    "CREATE INDEX ix_chat_message_terms_terms ON chat_message_terms USING gin (terms)",
    """CREATE FUNCTION persistence_terms_matching(query tsquery, overflow tsquery)
    RETURNS TABLE (id bigint, overflowed boolean)
    LANGUAGE sql STABLE PARALLEL SAFE ROWS 100 SET enable_seqscan = off AS $$
        SELECT t.id, t.terms @@ overflow FROM chat_message_terms AS t WHERE t.terms @@ query
    $$""",
    f"""CREATE FUNCTION persistence_terms_inserted() RETURNS trigger
    LANGUAGE plpgsql AS $$
    DECLARE
        first_added bigint;
        last_added bigint;
        added_rows bigint;
    BEGIN
        SELECT min(id), max(id), count(*) INTO first_added, last_added, added_rows FROM added;
        IF added_rows = 0 THEN
            RETURN NULL;
        END IF;
        IF added_rows <= {SMALL_INSERT} THEN
            INSERT INTO chat_message_terms (id, terms)
            SELECT id, persistence_search_terms(search_text) FROM added
            WHERE search_text IS NOT NULL
            ON CONFLICT (id) DO UPDATE SET terms = EXCLUDED.terms;
        ELSE
            INSERT INTO chat_terms_pending (first_id, last_id) VALUES (first_added, last_added);
        END IF;
        RETURN NULL;
    END $$""",
    """CREATE TRIGGER chat_message_terms_insert AFTER INSERT ON chat_messages
    REFERENCING NEW TABLE AS added FOR EACH STATEMENT
    EXECUTE FUNCTION persistence_terms_inserted()""",
    # An edit's new terms replace the old at once. Racing a search that writes pending
    # terms from the old document, the two meet on the primary key: whichever commits
    # second finds the other's row, and only this trigger overwrites one.
    """CREATE FUNCTION persistence_terms_changed() RETURNS trigger
    LANGUAGE plpgsql AS $$
    BEGIN
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
    END $$""",
    """CREATE TRIGGER chat_message_terms_update AFTER UPDATE OF search_text, id
    ON chat_messages FOR EACH ROW
    WHEN (OLD.search_text IS DISTINCT FROM NEW.search_text OR OLD.id <> NEW.id)
    EXECUTE FUNCTION persistence_terms_changed()""",
    """CREATE FUNCTION persistence_terms_deleted() RETURNS trigger
    LANGUAGE plpgsql AS $$
    BEGIN
        DELETE FROM chat_message_terms AS t USING removed WHERE t.id = removed.id;
        RETURN NULL;
    END $$""",
    """CREATE TRIGGER chat_message_terms_delete AFTER DELETE ON chat_messages
    REFERENCING OLD TABLE AS removed FOR EACH STATEMENT
    EXECUTE FUNCTION persistence_terms_deleted()""",
    """CREATE FUNCTION persistence_terms_truncated() RETURNS trigger
    LANGUAGE plpgsql AS $$
    BEGIN
        TRUNCATE chat_message_terms, chat_terms_pending;
        RETURN NULL;
    END $$""",
    """CREATE TRIGGER chat_message_terms_truncate AFTER TRUNCATE ON chat_messages
    FOR EACH STATEMENT EXECUTE FUNCTION persistence_terms_truncated()""",
]

DOWNGRADE = [
    "DROP TRIGGER chat_message_terms_truncate ON chat_messages",
    "DROP TRIGGER chat_message_terms_delete ON chat_messages",
    "DROP TRIGGER chat_message_terms_update ON chat_messages",
    "DROP TRIGGER chat_message_terms_insert ON chat_messages",
    "DROP FUNCTION persistence_terms_truncated()",
    "DROP FUNCTION persistence_terms_deleted()",
    "DROP FUNCTION persistence_terms_changed()",
    "DROP FUNCTION persistence_terms_inserted()",
    "DROP FUNCTION persistence_terms_matching(tsquery, tsquery)",
    "ALTER TABLE chat_messages ADD COLUMN search_terms tsvector"
    " GENERATED ALWAYS AS (persistence_search_terms(search_text)) STORED",
    "CREATE INDEX ix_chat_messages_search_terms ON chat_messages USING gin (search_terms)",
    "DROP TABLE chat_terms_pending",
    "DROP TABLE chat_message_terms",
]


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for statement in UPGRADE:
            op.execute(statement)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for statement in DOWNGRADE:
            op.execute(statement)
