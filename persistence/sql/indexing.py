"""Search documents written later: a bulk insert leaves them to the next search.

Writing a message's search document (persistence.search) and indexing it (FTS5 on
SQLite; the tsvector and its GIN index on PostgreSQL) costs more than storing the
message: with it, bulk inserts ran at a fifth of the raw driver's speed. So a
statement that inserts DEFERRED_FROM messages or more stores them with `search_text`
NULL, *pending* (revision 0005), and smaller ones (appends) index at once.

Nothing is missed meanwhile: a search tests the pending messages one by one
(persistence.sql.search), and a search on a store that may write first writes their
documents (`index_some`, in batches, each its own short transaction), so the
searches after it use the index. A document is written only where it is still
missing, so two processes indexing at once do the same work twice at worst, never
overwrite an edit.
"""

from __future__ import annotations

import json
from typing import cast

from sqlalchemy import Table, text

from persistence.search import search_document
from persistence.sql.runner import Execute, Fetch, WhichDialect, Work
from persistence.sql.statements import Statement
from persistence.sql.tables import MessageRow

messages = cast(Table, MessageRow.__table__)

# SQLite inserts of this many messages or more in one statement leave their documents
# pending.
DEFERRED_FROM = 32
# Pending messages indexed per transaction.
BATCH = 1000


def defers(dialect: str) -> bool:
    """Whether bulk inserts on `dialect` leave their documents pending.

    Only SQLite's: writing a pending document is an UPDATE, and on PostgreSQL an UPDATE
    writes a new version of the whole row, into every index. Measured on 100,000
    messages, PostgreSQL's bulk inserts ran 2.9x faster pending, but the first search
    then took 38 s to write the documents, twice the time the inserts had saved;
    SQLite's ran 1.26-1.5x faster, and the first search took back that and 5-15% more.
    """
    return dialect == "sqlite"


def documents_now(rows: int) -> Work[bool]:
    """Whether an insert of `rows` messages writes their search documents itself."""
    dialect = yield WhichDialect()
    return rows < DEFERRED_FROM or not defers(dialect)


PENDING = Statement(
    text(
        "SELECT id, content FROM chat_messages WHERE search_text IS NULL ORDER BY id LIMIT :batch"
    ).columns(messages.c.id, messages.c.content)
)


# One statement per batch: FTS5 writes its index once per statement.
SET_DOCUMENTS = Statement(
    text(
        "UPDATE chat_messages SET search_text = d.document FROM"
        " (SELECT json_extract(value, '$[0]') AS id, json_extract(value, '$[1]') AS document"
        " FROM json_each(:documents)) AS d"
        " WHERE chat_messages.id = d.id AND chat_messages.search_text IS NULL"
    )
)


def index_some() -> Work[int]:
    """Writes the documents of the oldest BATCH pending messages; returns how many were
    pending (0: none left, or a database whose inserts never leave any)."""
    if not defers((yield WhichDialect())):
        return 0
    rows = yield Fetch(PENDING, {"batch": BATCH})
    if rows:
        documents = [(row[0], search_document(row[1])) for row in rows]
        yield Execute(SET_DOCUMENTS, {"documents": json.dumps(documents)})
    return len(rows)
