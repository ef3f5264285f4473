# every statement here is built from constants; values are bound
"""Search on SQL: newest rows first while the words are common, then the index.

Both engines index the tokens of each message's search document (persistence.search)
as they are, with no parser of their own: FTS5 with its `ascii` tokenizer on SQLite, a
tsvector (revision 0003's terms, in a table of their own since 0009) with a GIN index on
PostgreSQL. And on both, the
rule itself is a test of the stored document, exact for any word `w`:

- `w` begins a word of the message: `' ' || document` holds `' ' || w`;
- `w` (a script without spaces) occurs in the message: `document` holds `w`.

A search reads the newest rows first and tests each (`scan_statement`), a small probe first:
a common word's newest matches are all there, and the reading stops at the limit. When
the probe says the words are rare, the index finds the older matches (`index_statement`): FTS5
walks its index in descending rowid order, and PostgreSQL reads the GIN index (its
planner never has to guess which of the two a word needs). Index terms come from
persistence.search, quoted for FTS5 and tsquery, so nothing a person types is syntax.

Messages left *pending* (no document yet; every insert on SQLite:
persistence.sql.indexing) are in neither: the search reads them newest first, tests
each in Python with the same rule (`SearchQuery.matches_content`), and merges them
into the page by their place in the stored order. PostgreSQL's rows always carry their
document; rows whose terms a bulk insert left pending are tested against it in the
index's own statement.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from persistence.models import ChatMessage
from persistence.search import MAX_INDEXED_WORDS, SearchQuery
from persistence.sql.indexing import defers, readable_content
from persistence.sql.mapping import messages_from_rows
from persistence.sql.runner import Fetch, WhichDialect, Work
from persistence.sql.search_statements import (
    ANY_PENDING_TERMS,
    COUNTS,
    PENDING,
    RESULT_COLUMNS,
    TOP,
    Shape,
    arrays,
    index_parameters,
    index_statement,
    scan_statement,
    word_parameters,
)

# Rows the first probe reads newest first: a word in at least 40% of the messages
# fills a page of 50 from it.
PROBE_ROWS = 128
# Rows read newest first in all, when the probe's matches say that is enough for the page.
MAX_SCAN_ROWS = 2048


@dataclass(frozen=True, slots=True)
class Found:
    """A search's page, how much testing of pending messages it did, in messages (a
    long one counts for more: TESTED_CHARS), the stored-order key of its last message
    (None: none found), below which the next page begins, and, when asked, the
    incarnation of the session searched (repositories.search_messages)."""

    messages: list[ChatMessage]
    pending: int
    last_key: int | None = None
    incarnation: str | None = None


@dataclass(frozen=True, slots=True)
class Scope:
    """The messages a search looks at: of one session or all, of one role or all, and
    whose stored-order key is at most `top` (a later page's: below the last shown)."""

    shape: Shape
    session_id: str | None
    role: str | None
    top: int

    @property
    def filters(self) -> dict[str, Any]:
        return {"session_id": self.session_id, "role": self.role}


# A pending message tested one by one counts as one more for every this many characters
# of it: found by attack, 15 pending messages of 1 MiB (one short of
# indexing.SAVES_INDEX_AT) made every search take 2 s, as none got indexed.
TESTED_CHARS = 4096


def find_messages(
    query: SearchQuery,
    limit: int,
    session_id: str | None,
    role: str | None,
    *,
    may_index: bool,
    top: int = TOP,
) -> Work[Found | None]:
    """The newest `limit` messages matching `query` whose stored-order key (row id; in
    one session, position) is at most `top`, newest first (stored order).

    None when `may_index` and more than a batch of pending messages would have to be
    tested one by one (SQLite), or the index is needed while terms are pending
    (PostgreSQL): the caller indexes them (persistence.sql.indexing) and asks again.
    """
    dialect = yield WhichDialect()
    shape = Shape(session=session_id is not None, role=role is not None)
    scope = Scope(shape, session_id, role, top)
    indexed = yield from _indexed_matches(dialect, scope, query, limit, may_index)
    if indexed is None:
        return None
    tested = 0
    if defers(dialect):
        pending = yield from _pending_matches(scope, query, limit, indexed, may_index)
        if pending is None:
            return None
        matched, tested = pending
        if matched:
            indexed = sorted([*indexed, *matched], key=_sort_key, reverse=True)[:limit]
    last_key = _sort_key(indexed[-1]) if indexed else None
    return Found(messages_from_rows(indexed), tested, last_key)


def _sort_key(row: Sequence[Any]) -> int:
    return int(row[_SORT_KEY])


_SORT_KEY = len(RESULT_COLUMNS)
# Pending messages read per statement.
PENDING_BATCH = 500


def _pending_matches(
    scope: Scope,
    query: SearchQuery,
    limit: int,
    indexed: list[Sequence[Any]],
    may_index: bool,
) -> Work[tuple[list[Sequence[Any]], int] | None]:
    """The pending messages that match and may enter the page, newest first, and how
    many were tested (None: a full batch, and `may_index`)."""
    # Only messages newer than the page's oldest indexed match can enter a full page.
    floor = _sort_key(indexed[limit - 1]) if len(indexed) >= limit else -1
    params: dict[str, Any] = {**scope.filters, "limit": PENDING_BATCH}
    # PENDING reads the keys below :below; the scope holds those at most its top.
    below, tested = scope.top + 1, 0
    matched: list[Sequence[Any]] = []
    while len(matched) < limit:
        rows = yield Fetch(PENDING[scope.shape], {**params, "below": below})
        if may_index and len(rows) == PENDING_BATCH:
            return None
        for row in rows:
            if _sort_key(row) <= floor:
                return matched, tested
            tested += 1 + len(row[3]) // TESTED_CHARS
            if query.matches_content(readable_content(row[3])):
                matched.append(row)
        if len(rows) < PENDING_BATCH:
            break
        below = _sort_key(rows[-1])
    return matched, tested


def _indexed_matches(
    dialect: str,
    scope: Scope,
    query: SearchQuery,
    limit: int,
    may_index: bool,
) -> Work[list[Sequence[Any]] | None]:
    """The newest `limit` indexed messages matching `query`, as rows, newest first.

    None when the index is needed, `may_index`, and PostgreSQL holds pending terms: the
    caller writes them (persistence.sql.indexing) and asks again.
    """
    shape, common = scope.shape, scope.filters
    arity, tested = word_parameters(
        dialect,
        [word.text for word in query.words if not word.anywhere],
        [word.text for word in query.words if word.anywhere],
    )
    common |= tested
    scan = scan_statement(shape, arity)
    found: list[Sequence[Any]] = []
    below, scanned, budget = scope.top, 0, PROBE_ROWS
    edge: int | None = None
    while True:
        params = {**common, "below": below, "skip": budget - 1, "limit": limit - len(found)}
        rows = yield Fetch(scan, params)
        found += rows
        edge = rows[0][-1] if rows else None
        if len(found) >= limit or edge == -1:
            return found
        scanned += budget
        # Read on newest first only while the matches so far say the page fills within
        # MAX_SCAN_ROWS rows; otherwise the words are rare and the index finds them.
        wanted = math.ceil(2 * (limit - len(found)) * scanned / len(found)) if found else 0
        if edge is None or wanted > MAX_SCAN_ROWS - scanned:
            break
        below, budget = edge - 1, wanted

    # The index looks for the word rarest among the rows read (then the longest): one
    # word's terms keep the index's work small, and the recheck decides the rest.
    # Candidates are the longest words (query.words comes longest first).
    candidates = query.words[:MAX_INDEXED_WORDS]
    chosen = candidates[0]
    if len(candidates) > 1:
        starts = [word for word in candidates if not word.anywhere]
        contains = [word for word in candidates if word.anywhere]
        params = {"session_id": scope.session_id, "below": scope.top, "skip": scanned - 1}
        params |= arrays(
            dialect,
            starts=[word.text for word in starts],
            contains=[word.text for word in contains],
        )
        counts = {
            (kind, int(n)): int(count) for kind, n, count in (yield Fetch(COUNTS[shape], params))
        }
        hits = {word: counts[("starts", n)] for n, word in enumerate(starts)}
        hits |= {word: counts[("contains", n)] for n, word in enumerate(contains)}
        chosen = min(candidates, key=lambda word: (hits[word], -len(word.text)))
    recheck, index_params = index_parameters(dialect, list(query.words), chosen)
    # A last scan that matched nothing did not say where its window ended: the index
    # then looks below the window's top. Found by attack: left to find the window's end
    # again, PostgreSQL (a snapshot per statement) put it lower when rows in it had been
    # deleted meanwhile, and a match between the two ends was found by neither.
    params = {**common, "below": below, "skip": budget - 1, "edge": below if edge is None else edge}
    params |= {"limit": limit - len(found), **index_params}
    if dialect != "postgresql":
        found += yield Fetch(index_statement(shape, arity, recheck), params)
    elif not may_index:
        # A search that may not write pending terms tests their rows' documents.
        found += yield Fetch(index_statement(shape, arity, recheck, pending=True), params)
    else:
        # One that may writes them first (the caller does, then asks again).
        rows = yield Fetch(index_statement(shape, arity, recheck, asking=True), params)
        if rows[0][-1] if rows else (yield Fetch(ANY_PENDING_TERMS, {}))[0][0]:
            return None
        if not rows:
            # No terms pending now, though there may have been when the index was read
            # (a statement, a snapshot): found by attack, another process wrote those
            # between the two, and a pending match was found by neither. Read again:
            # every row pending then has its terms now.
            rows = yield Fetch(index_statement(shape, arity, recheck, pending=True), params)
        found += rows
    return found
