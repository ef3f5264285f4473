"""Search documents and terms written later: SQLite's inserts, PostgreSQL's bulk inserts.

Writing a message's search document (persistence.search) and indexing it (FTS5 on
SQLite; the tsvector and its GIN index on PostgreSQL) costs more than storing the
message: with it, bulk inserts ran at a fifth of the raw driver's speed, and an
append's own FTS5 segment cost about a third of the append. So on SQLite an insert
stores its messages with `search_text` NULL, *pending* (revision 0005), and their
documents are written later, many per statement.

Nothing is missed meanwhile: a search tests the pending messages one by one
(persistence.sql.search). A search that tested SAVES_INDEX_AT or more, on a store
that may write, then writes the documents (`index_some`, in batches, each its own
short transaction), so the searches after it use the index; fewer cost less to test
than a write transaction. A storage's saves keep what they leave bounded: once they
have left SAVES_INDEX_AT documents pending, its next save also writes the oldest
pending ones, in its own transaction (`then_index`). A document is written only
where it is still missing, so two processes indexing at once do the same work twice
at worst, never overwrite an edit.

PostgreSQL writes every document with its row, but keeps the index terms in a table of
their own (revision 0009): an INSERT of more than a few rows records its range of row
ids as pending, and a search on the primary first writes their terms (`index_some`,
many ranges per statement). Until then a search tests the
pending rows against their documents (persistence.sql.search). Neither engine's saves
write what a bulk insert left: that is the work the insert did not do.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TypeVar, cast

from sqlalchemy import Table, text

from persistence.search import search_document
from persistence.sql.runner import Execute, Fetch, WhichDialect, Work
from persistence.sql.statements import Statement
from persistence.sql.tables import MessageRow

messages = cast(Table, MessageRow.__table__)
T = TypeVar("T")

# Pending messages indexed per transaction by a search.
BATCH = 1000
# A storage's saves write pending documents once they have left this many, and a
# search that tested this many writes them (fewer cost less to test each time)...
SAVES_INDEX_AT = 16
# ... at most this many in the save's transaction: a save after a bulk insert stays short.
SAVE_BATCH = 2 * SAVES_INDEX_AT


def defers(dialect: str) -> bool:
    """Whether inserts on `dialect` leave their documents pending.

    Only SQLite's: writing a pending document is an UPDATE, and on PostgreSQL an UPDATE
    writes a new version of the whole row, into every index. Measured on 100,000
    messages, PostgreSQL's bulk inserts ran 2.9x faster pending, but the first search
    then took 38 s to write the documents, twice the time the inserts had saved;
    SQLite's ran 1.26-1.5x faster, and the first search took back that and 5-15% more.
    An append's document written later costs far less than its own FTS5 segment.
    """
    return dialect == "sqlite"


def documents_now() -> Work[bool]:
    """Whether an insert writes its messages' search documents itself."""
    return not defers((yield WhichDialect()))


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


# PostgreSQL: the oldest pending ranges, taken (SKIP LOCKED: two searches at once take
# different ones), and the terms of the rows they hold that still have a document,
# written in a snapshot taken after the ranges are locked, so that a removal of those
# rows waits for this commit and then deletes the terms (revision 0013).
WRITE_PENDING_TERMS = Statement(
    text("SELECT taken, written FROM persistence_write_pending_terms(:ranges)")
)
# Pending ranges a statement takes: a bulk insert records one per part of at most 256
# rows (persistence.sql.bulk), so about 4,000 rows.
TERMS_RANGES = 16


@dataclass(frozen=True, slots=True)
class Indexed:
    """What a batch of indexing wrote."""

    written: int
    # The batch was full: more may be pending.
    more: bool


# How long a catch-up on PostgreSQL waits for a row another transaction holds: found
# by attack, a search's waited on the terms an open unit of work's edit had written for
# as long as that unit stayed open. SQLite's never waits (run_unless_locked).
SEARCH_LOCK_WAIT = Statement(text("SELECT set_config('lock_timeout', '100ms', true)"))
# How long `index_for_search()` on PostgreSQL waits before it tries again, after such
# a lock wait ran out.
LOCKED_RETRY = 0.05


def index_some() -> Work[Indexed]:
    """Writes the documents (SQLite) or terms (PostgreSQL) of a batch of the oldest
    pending messages. PostgreSQL gives up on a row another transaction holds after
    SEARCH_LOCK_WAIT (a lock timeout: errors.lock_not_available)."""
    if (yield WhichDialect()) == "postgresql":
        yield Fetch(SEARCH_LOCK_WAIT, {})
        ranges, written = (yield Fetch(WRITE_PENDING_TERMS, {"ranges": TERMS_RANGES}))[0]
        return Indexed(int(written), more=ranges == TERMS_RANGES)
    written = yield from _write_documents(BATCH)
    return Indexed(written, more=written == BATCH)


def _write_documents(batch: int) -> Work[int]:
    """Writes the documents of the oldest `batch` pending messages; returns how many were
    pending (0: none left, or a database whose inserts never leave any)."""
    if not defers((yield WhichDialect())):
        return 0
    rows = yield Fetch(PENDING, {"batch": batch})
    if rows:
        documents = [(row[0], search_document(readable_content(row[1]))) for row in rows]
        yield Execute(SET_DOCUMENTS, {"documents": json.dumps(documents)})
    return len(rows)


def readable_content(content: str | bytes) -> str:
    """A message's content as text: a BLOB (TEXT affinity leaves nothing else) is read
    as UTF-8.

    Found by attack: content a hand edit set to a BLOB (sqlite3's readfile() makes one)
    made the pending documents' batch raise a bare TypeError, and with it every later
    save and search of the store; a search's test of pending messages did too. Loading
    such a message still fails, naming it (mapping._unreadable_message).
    """
    if isinstance(content, bytes):
        return content.decode("utf-8", "replace")
    return content


def then_index(work: Work[T]) -> Work[T]:
    """`work`, then the documents of the oldest SAVE_BATCH pending messages, in the same
    transaction (a save that its storage's earlier saves made due to index)."""
    result = yield from work
    yield from _write_documents(SAVE_BATCH)
    return result
