"""Search documents: one search rule on every backend (issue 12).

Each message gets `search_text`, its search document (persistence.search): its
distinct normalised words, then marked substrings of the words of scripts written
without spaces. SQLite's FTS5 index moves from `content` to that column, with the
`ascii` tokenizer, so it indexes the document's tokens as they are. PostgreSQL indexes
a generated `search_terms` tsvector built from the same tokens by
`persistence_search_terms` (no text-search parser, so no locale can change it).

Existing messages are backfilled in batches with the rule as it stood at this
revision (a copy below: a revision never changes meaning).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

from __future__ import annotations

import unicodedata

import regex  # type: ignore[import-untyped]  # ships no type stubs
import sqlalchemy as sa

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

BATCH = 200

# The search rule of this revision (persistence/search.py at 0003; a test holds the two equal).
_MAX_CHARS = 1 << 20
_MARK = "\u00a7"
_WORD = regex.compile(r"[\p{L}\p{M}\p{N}]+")
_ACCENTS = regex.compile(r"([\p{Latin}\p{Greek}\p{Cyrillic}])\p{M}+")
_SPACELESS = regex.compile(r"[\p{Han}\p{Hiragana}\p{Katakana}\p{Thai}]")


def search_document(content: str) -> str:
    text = content[:_MAX_CHARS]
    if not text.isascii():
        text = unicodedata.normalize("NFKC", text).casefold()
        text = _ACCENTS.sub(r"\1", unicodedata.normalize("NFD", text))
        text = unicodedata.normalize("NFKC", text)
    found = list(dict.fromkeys(_WORD.findall(text.lower() if text.isascii() else text)))
    marked = dict.fromkeys(
        _MARK + word[i : i + 2]
        for word in found
        if _SPACELESS.search(word)
        for i in range(len(word))
    )
    return " ".join([*found, *marked])


SQLITE_FTS = [
    # `ascii`: a token is a run of anything but ASCII separators, so the document's
    # space-separated tokens are indexed as they are. No positions (no phrase queries)
    # and no sizes (no ranking): a smaller index and cheaper writes.
    """CREATE VIRTUAL TABLE chat_messages_fts USING fts5(
        search_text, content='chat_messages', content_rowid='id',
        tokenize='ascii', detail='none', columnsize=0)""",
    """CREATE TRIGGER chat_messages_fts_insert AFTER INSERT ON chat_messages BEGIN
        INSERT INTO chat_messages_fts(rowid, search_text) VALUES (new.id, new.search_text);
    END""",
    """CREATE TRIGGER chat_messages_fts_delete AFTER DELETE ON chat_messages BEGIN
        INSERT INTO chat_messages_fts(chat_messages_fts, rowid, search_text)
        VALUES ('delete', old.id, old.search_text);
    END""",
    # Any UPDATE that changes the document (or the row id) re-indexes the row.
    """CREATE TRIGGER chat_messages_fts_update AFTER UPDATE ON chat_messages
    WHEN old.search_text IS NOT new.search_text OR old.id IS NOT new.id BEGIN
        INSERT INTO chat_messages_fts(chat_messages_fts, rowid, search_text)
        VALUES ('delete', old.id, old.search_text);
        INSERT INTO chat_messages_fts(rowid, search_text) VALUES (new.id, new.search_text);
    END""",
]
SQLITE_FTS_0002 = [
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

# A tsvector holds lexemes of at most 2047 bytes and 1 MB of them in all, and
# array_to_tsvector checks neither: terms are cut to 200 characters (800 bytes at
# most), and a document whose terms exceed 1,000,000 bytes is indexed as the single
# term '§§' (no gram or word is that), which every query also matches and then
# rechecks against the document. PL/pgSQL, whose plans a session keeps: a SQL
# function with a FROM clause would be planned again for every row written.
POSTGRESQL_TERMS_FUNCTION = """
CREATE FUNCTION persistence_search_terms(document text) RETURNS tsvector
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
DECLARE
    terms text[];
BEGIN
    SELECT array_agg(DISTINCT left(token, 200)) INTO terms
    FROM unnest(string_to_array(document, ' ')) AS token
    WHERE token <> '';
    IF terms IS NULL THEN
        RETURN ''::tsvector;
    END IF;
    IF (SELECT sum(octet_length(term)) FROM unnest(terms) AS term) > 1000000 THEN
        RETURN array_to_tsvector(ARRAY[chr(167) || chr(167)]);
    END IF;
    RETURN array_to_tsvector(terms);
END
$$
"""


def _backfill() -> None:
    connection = op.get_bind()
    select = sa.text(
        "SELECT id, content FROM chat_messages WHERE id > :after ORDER BY id LIMIT :batch"
    )
    update = sa.text("UPDATE chat_messages SET search_text = :document WHERE id = :id")
    after = -1
    while True:
        rows = connection.execute(select, {"after": after, "batch": BATCH}).all()
        if not rows:
            return
        connection.execute(
            update, [{"id": row[0], "document": search_document(row[1])} for row in rows]
        )
        after = rows[-1][0]


def upgrade() -> None:
    dialect = op.get_bind().dialect.name
    if dialect == "sqlite":
        for trigger in ("insert", "delete", "update"):
            op.execute(f"DROP TRIGGER IF EXISTS chat_messages_fts_{trigger}")
        op.execute("DROP TABLE IF EXISTS chat_messages_fts")
    elif dialect == "postgresql":
        op.execute("DROP INDEX IF EXISTS ix_chat_messages_content_tsv")
    op.add_column(
        "chat_messages", sa.Column("search_text", sa.Text(), nullable=False, server_default="")
    )
    _backfill()
    if dialect == "sqlite":
        for statement in SQLITE_FTS:
            op.execute(statement)
        op.execute("INSERT INTO chat_messages_fts(chat_messages_fts) VALUES ('rebuild')")
    elif dialect == "postgresql":
        op.execute(POSTGRESQL_TERMS_FUNCTION)
        op.execute(
            "ALTER TABLE chat_messages ADD COLUMN search_terms tsvector"
            " GENERATED ALWAYS AS (persistence_search_terms(search_text)) STORED"
        )
        op.execute(
            "CREATE INDEX ix_chat_messages_search_terms ON chat_messages USING gin (search_terms)"
        )
        # Statistics of the new column at once, so the planner can tell a common word
        # (newest rows first) from a rare one (the index).
        op.execute("ANALYZE chat_messages")


def downgrade() -> None:
    dialect = op.get_bind().dialect.name
    if dialect == "sqlite":
        for trigger in ("insert", "delete", "update"):
            op.execute(f"DROP TRIGGER IF EXISTS chat_messages_fts_{trigger}")
        op.execute("DROP TABLE IF EXISTS chat_messages_fts")
        op.execute("ALTER TABLE chat_messages DROP COLUMN search_text")
        for statement in SQLITE_FTS_0002:
            op.execute(statement)
        op.execute("INSERT INTO chat_messages_fts(chat_messages_fts) VALUES ('rebuild')")
    elif dialect == "postgresql":
        op.execute("DROP INDEX IF EXISTS ix_chat_messages_search_terms")
        op.execute("ALTER TABLE chat_messages DROP COLUMN search_terms")
        op.execute("DROP FUNCTION persistence_search_terms(text)")
        op.drop_column("chat_messages", "search_text")
        op.execute(
            "CREATE INDEX ix_chat_messages_content_tsv ON chat_messages"
            " USING gin (to_tsvector('simple'::regconfig, left(content, 100000)))"
        )
    else:
        op.drop_column("chat_messages", "search_text")
