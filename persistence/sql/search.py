# ruff: noqa: S608  # every statement here is built from constants; values are bound
"""Search on SQL: newest rows first while the words are common, then the index.

Both engines index the tokens of each message's search document (persistence.search)
as they are, with no parser of their own: FTS5 with its `ascii` tokenizer on SQLite, a
tsvector (revision 0003's terms, in a table of their own since 0009) with a GIN index on
PostgreSQL. And on both, the
rule itself is a test of the stored document, exact for any word `w`:

- `w` begins a word of the message: `' ' || document` holds `' ' || w`;
- `w` (a script without spaces) occurs in the message: `document` holds `w`.

A search reads the newest rows first and tests each (`_SCAN`), a small probe first:
a common word's newest matches are all there, and the reading stops at the limit. When
the probe says the words are rare, the index finds the older matches (`_INDEX`): FTS5
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

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache, partial
from typing import Any

from sqlalchemy import ARRAY, BigInteger, Boolean, Text, bindparam, column, text
from sqlalchemy.sql import ClauseElement

from persistence.models import ChatMessage
from persistence.search import (
    GRAM_MARK,
    MAX_INDEXED_WORDS,
    QueryWord,
    SearchQuery,
)
from persistence.sql.indexing import defers, readable_content
from persistence.sql.mapping import messages_from_rows
from persistence.sql.runner import Fetch, WhichDialect, Work
from persistence.sql.statements import Statement
from persistence.sql.tables import MessageRow

# Rows the first probe reads newest first: a word in at least 40% of the messages
# fills a page of 50 from it.
PROBE_ROWS = 128
# Rows read newest first in all, when the probe's matches say that is enough for the page.
MAX_SCAN_ROWS = 2048
# PostgreSQL cuts index terms to this many characters (revision 0003's
# persistence_search_terms), and indexes a document whose terms pass 1 MB as OVERFLOW.
POSTGRESQL_TERM_CHARS = 200
OVERFLOW_TERM = GRAM_MARK * 2
# Above every row id and position.
_TOP = 2**62

# mapping.MESSAGE_COLUMNS, as text: the metadata as its JSON text, which the builder reads.
_RESULT_COLUMNS = (
    *(
        MessageRow.__table__.c[name]
        for name in ("message_id", "session_id", "role", "content", "created_at")
    ),
    column("metadata_text", Text()),
)
_COLUMNS = (
    ", ".join(f"m.{column.name}" for column in _RESULT_COLUMNS[:-1])
    + ", CAST(m.metadata AS TEXT) AS metadata_text"
)


@dataclass(frozen=True, slots=True)
class Shape:
    """Which filters a statement carries; within a session, order is by position."""

    session: bool
    role: bool

    @property
    def key(self) -> str:
        return "m.position" if self.session else "m.id"


def _filters(shape: Shape) -> list[str]:
    where = ["m.session_id = :session_id"] if shape.session else []
    return [*where, "m.role = :role"] if shape.role else where


@dataclass(frozen=True, slots=True)
class Arity:
    """How a statement takes the words it tests, of each kind (those that must begin a
    word, those that may occur anywhere): that many bound one by one, or AS_ARRAY."""

    starts: int
    contains: int


# The words of a kind go as one array (json_each / unnest) when there are more than
# INLINE_WORDS of them, else bound one by one: the array is read again for every row
# a statement tests (on SQLite a JSON parse), and took 50 of the 113 us a probe of 128
# rows for one rare word cost; bound one by one the words cost about nothing.
INLINE_WORDS = 4
AS_ARRAY = -1


def word_parameters(
    dialect: str, starts: list[str], contains: list[str], prefix: str = ""
) -> tuple[Arity, dict[str, Any]]:
    """The statement parameters of the words `starts` and `contains` (named with
    `prefix`), and the arity of the statement that takes them."""
    params: dict[str, Any] = {}
    counts = []
    for kind, words in (("starts", starts), ("contains", contains)):
        name = f"{prefix}{kind}"
        if len(words) > INLINE_WORDS:
            counts.append(AS_ARRAY)
            params |= _arrays(dialect, **{name: words})
        else:
            counts.append(len(words))
            params.update({f"{name}_{n}": word for n, word in enumerate(words)})
    return Arity(*counts), params


def _tests(dialect: str, arity: Arity, prefix: str = "") -> list[str]:
    """The rule as SQL: every word of starts begins a word, every one of contains occurs,
    the words bound as `arity` says (word_parameters).

    With `prefix` "recheck_", the words the index terms do not decide alone.
    """
    if dialect == "postgresql":
        words, value, one, find = (
            "unnest(CAST(:{} AS text[])) AS w",
            "w",
            "CAST(:{} AS text)",
            "strpos",
        )
    else:
        words, value, one, find = "json_each(:{}) AS w", "w.value", ":{}", "instr"
    tests = []
    for kind, count, test in (
        ("starts", arity.starts, f"{find}(' ' || m.search_text, ' ' || {{}})"),
        ("contains", arity.contains, f"{find}(m.search_text, {{}})"),
    ):
        name = f"{prefix}{kind}"
        if count == AS_ARRAY:
            tests.append(
                f"NOT EXISTS (SELECT 1 FROM {words.format(name)} WHERE {test.format(value)} = 0)"
            )
        else:
            tests += [f"{test.format(one.format(f'{name}_{n}'))} > 0" for n in range(count)]
    return tests


def _edge(shape: Shape) -> str:
    """The id (position) of the `:skip + 1`-th newest row at or below :below (NULL: none).

    Within a session, looked for only from _LOWEST_EDGE up: a session grown since the
    statistics looks a few rows long to PostgreSQL's planner, which then read and
    sorted all of it instead of walking the index from :below down.
    """
    key = shape.key.replace("m.", "n.")
    session = ""
    if shape.session:
        session = f" AND n.session_id = :session_id AND {key} >= {_LOWEST_EDGE}"
    return (
        f"(SELECT {key} FROM chat_messages AS n WHERE {key} <= :below{session}"
        f" ORDER BY {key} DESC LIMIT 1 OFFSET :skip)"
    )


# The first window (:below above every position) is the session's newest :skip + 1
# rows, bounded as a partial load's newest are (repositories._NEWEST_LOWEST_POSITION).
# Later windows are not bounded: a bound there must count the rows above :below, and
# with it the planner left the index for a costlier read even where its statistics
# were right (searches 11-27% slower).
_LOWEST_EDGE = (
    f"CASE WHEN :below >= {_TOP} THEN (SELECT s.message_count FROM chat_sessions AS s"
    " WHERE s.session_id = :session_id) - :skip - 1 ELSE -1 END"
)


def _scan(shape: Shape, dialect: str, words: Arity) -> str:
    """The matches among the `:skip + 1` newest rows at or below :below, newest first.

    Each row also carries the edge of that window (-1 when it reached the first row).
    The edge is a constant subquery, computed once, so the rows are read through the
    key's index newest first and the LIMIT stops the reading.
    """
    edge = f"coalesce({_edge(shape)}, -1)"
    where = [f"{shape.key} <= :below", f"{shape.key} >= {edge}", *_filters(shape)]
    # A pending message (no document yet) is tested by _pending_matches instead.
    where += ["m.search_text IS NOT NULL", *_tests(dialect, words)]
    return (
        f"SELECT {_COLUMNS}, {shape.key} AS sort_key, {edge} AS edge FROM chat_messages AS m"
        f" WHERE {' AND '.join(where)} ORDER BY {shape.key} DESC LIMIT :limit"
    )


def _index(
    shape: Shape,
    dialect: str,
    words: Arity,
    recheck: Arity,
    pending: bool = False,
    asking: bool = False,
) -> str:
    """The matches below :edge, found through the index, newest first; the words
    `recheck` (of them) are tested on each, and on PostgreSQL all the query's `words` on
    a document indexed as OVERFLOW.

    Without :edge, below the edge of the window a scan with the same :below and :skip
    read (a scan that matched nothing does not say where it stopped). PostgreSQL: with
    `pending`, also the rows whose terms are still pending; with `asking`, a last column
    says whether any are.
    """
    below = f"< coalesce(CAST(:edge AS BIGINT), {_edge(shape)})"
    if dialect == "postgresql":
        return _index_postgresql(shape, below, words, recheck, pending, asking)
    if shape.session:
        where = [
            "m.id IN (SELECT rowid FROM chat_messages_fts WHERE chat_messages_fts MATCH :match)",
            f"m.position {below}",
            *_filters(shape),
            *_tests(dialect, recheck, "recheck_"),
        ]
        source, order = "chat_messages AS m", "m.position DESC"
    else:
        # Ordered by the FTS5 table's own rowid: FTS5 then walks its index newest
        # first and the LIMIT stops it (ordering by m.id would sort every match).
        where = [
            "chat_messages_fts MATCH :match",
            f"chat_messages_fts.rowid {below}",
            *_filters(shape),
            *_tests(dialect, recheck, "recheck_"),
        ]
        source = "chat_messages_fts JOIN chat_messages AS m ON m.id = chat_messages_fts.rowid"
        order = "chat_messages_fts.rowid DESC"
    return (
        f"SELECT {_COLUMNS}, {shape.key} AS sort_key FROM {source}"
        f" WHERE {' AND '.join(where)} ORDER BY {order} LIMIT :limit"
    )


# Whether a bulk insert left terms pending (revision 0009).
_TERMS_PENDING = "EXISTS (SELECT 1 FROM chat_terms_pending)"


def _index_postgresql(
    shape: Shape, below: str, words: Arity, recheck: Arity, pending: bool, asking: bool
) -> str:
    """PostgreSQL's index: the terms table's GIN index, read by a function that never
    scans the table (revision 0009); with `pending`, also the rows whose terms are
    still pending, tested against their documents."""
    # A document indexed as OVERFLOW holds only that term: it is tested word by word.
    everything = " AND ".join(_tests("postgresql", words))
    # Bounded by an expression, so the planner probes the rows the GIN index found
    # instead of walking the primary key: the probe found these words rare among the
    # newest.
    indexed = [
        f"({shape.key} + 0) {below}",
        *_filters(shape),
        f"(NOT t.overflowed OR ({everything}))",
        *_tests("postgresql", recheck, "recheck_"),
    ]
    asked = f", {_TERMS_PENDING} AS terms_pending" if asking else ""
    sql = (
        f"SELECT {_COLUMNS}, {shape.key} AS sort_key{asked}"
        " FROM persistence_terms_matching(CAST(:match AS tsquery), CAST(:overflow AS tsquery))"
        f" AS t JOIN chat_messages AS m ON m.id = t.id WHERE {' AND '.join(indexed)}"
    )
    if pending:
        untermed = [
            # An array, computed once: the rows are then read by their key.
            "m.id = ANY (ARRAY(SELECT generate_series(p.first_id, p.last_id)"
            " FROM chat_terms_pending AS p))",
            "NOT EXISTS (SELECT 1 FROM chat_message_terms AS t WHERE t.id = m.id)",
            f"{shape.key} {below}",
            *_filters(shape),
            "m.search_text IS NOT NULL",
            everything,
        ]
        sql += (
            f" UNION ALL SELECT {_COLUMNS}, {shape.key} AS sort_key FROM chat_messages AS m"
            f" WHERE {' AND '.join(untermed)}"
        )
    return f"{sql} ORDER BY sort_key DESC LIMIT :limit"


def _pending(shape: Shape, dialect: str) -> str:
    """Pending messages (persistence.sql.indexing) below :below, newest first."""
    where = ["m.search_text IS NULL", f"{shape.key} < :below", *_filters(shape)]
    return (
        f"SELECT {_COLUMNS}, {shape.key} AS sort_key FROM chat_messages AS m"
        f" WHERE {' AND '.join(where)} ORDER BY {shape.key} DESC LIMIT :limit"
    )


def _statement(
    build: Any, shape: Shape, rows: bool = True, edge: bool = False, asking: bool = False
) -> Statement:
    def element(dialect: str) -> ClauseElement:
        sql = build(shape, dialect)
        arrays = ARRAY(Text) if dialect == "postgresql" else Text()
        binds = [
            bindparam(name, type_=arrays if name.endswith(("starts", "contains")) else None)
            for name in sorted(set(_PARAMETER.findall(sql)))
        ]
        statement = text(sql).bindparams(*binds)
        if not rows:
            return statement
        extra = [column("sort_key", BigInteger())]
        extra += [column("edge", BigInteger())] if edge else []
        extra += [column("terms_pending", Boolean())] if asking else []
        return statement.columns(*_RESULT_COLUMNS, *extra)

    return Statement(element)


_PARAMETER = re.compile(r"(?<!:):([a-z_][a-z_0-9]*)")
_SHAPES = [Shape(session, role) for session in (False, True) for role in (False, True)]
# Statements by shape and arity, made when first asked for: a few dozen in practice
# (each kind of word bound one by one up to INLINE_WORDS), bounded all the same.
_STATEMENTS = 512


@lru_cache(maxsize=_STATEMENTS)
def _scan_statement(shape: Shape, words: Arity) -> Statement:
    return _statement(partial(_scan, words=words), shape, edge=True)


@lru_cache(maxsize=_STATEMENTS)
def _index_statement(
    shape: Shape, words: Arity, recheck: Arity, pending: bool = False, asking: bool = False
) -> Statement:
    """_index's statement. PostgreSQL: `pending` where a search may not write the pending
    terms (replicas, stores opened for reading), or where one that may found some: the
    rows are tested too; `asking` where a search may write them: each row also says
    whether any are pending (no round trip of its own unless no row came back)."""
    build = partial(_index, words=words, recheck=recheck, pending=pending, asking=asking)
    return _statement(build, shape, asking=asking)


_PENDING = {shape: _statement(_pending, shape) for shape in _SHAPES}


def _counts(shape: Shape, dialect: str) -> str:
    """How many of the `:skip + 1` newest rows each word of :starts and :contains matches."""
    where = [f"{shape.key} >= coalesce({_edge(shape)}, -1)"]
    if shape.session:
        where.append("m.session_id = :session_id")
    if dialect == "postgresql":
        words = "unnest(CAST(:{} AS text[])) WITH ORDINALITY AS w(value, n)"
        find, number = "strpos", "w.n - 1"
    else:
        words, find, number = "json_each(:{}) AS w", "instr", "w.key"
    tests = {
        "starts": f"{find}(' ' || m.search_text, ' ' || w.value) > 0",
        "contains": f"{find}(m.search_text, w.value) > 0",
    }
    return " UNION ALL ".join(
        f"SELECT '{kind}', {number}, (SELECT count(*) FROM chat_messages AS m"
        f" WHERE {' AND '.join([*where, test])}) FROM {words.format(kind)}"
        for kind, test in tests.items()
    )


_COUNTS = {shape: _statement(_counts, shape, rows=False) for shape in _SHAPES}
_ANY_PENDING_TERMS = Statement(text(f"SELECT {_TERMS_PENDING}"))


def _index_terms(word: QueryWord, dialect: str) -> str:
    """The word as FTS5 MATCH or tsquery terms (all of them must hold)."""
    if word.prefix_term() is not None:
        term = str(word.prefix_term())
        if dialect == "postgresql":
            return f"'{term[:POSTGRESQL_TERM_CHARS]}':*"
        return f'"{term}"*'
    terms = word.gram_terms()
    if dialect == "postgresql":
        return " & ".join(f"'{term}'" for term in terms)
    return " AND ".join(f'"{term}"' for term in terms)


def _index_parameters(
    dialect: str, words: list[QueryWord], chosen: QueryWord
) -> tuple[Arity, dict[str, Any]]:
    """The index finds `chosen`; the recheck decides every other word, and `chosen` too
    where its terms alone do not. Returns the recheck's arity and the parameters."""
    starts = [word.text for word in words if not word.anywhere and word != chosen]
    contains = [word.text for word in words if word.anywhere and word != chosen]
    if chosen.anywhere and chosen.prefix_term() is None:
        contains.append(chosen.text)
    if dialect == "postgresql" and not chosen.anywhere and len(chosen.text) > POSTGRESQL_TERM_CHARS:
        starts.append(chosen.text)
    recheck, params = word_parameters(dialect, starts, contains, "recheck_")
    if dialect == "postgresql":
        params |= {
            "match": f"({_index_terms(chosen, dialect)}) | '{OVERFLOW_TERM}'",
            "overflow": f"'{OVERFLOW_TERM}'",
        }
    else:
        params["match"] = _index_terms(chosen, dialect)
    return recheck, params


def _arrays(dialect: str, **words: list[str]) -> dict[str, Any]:
    """Lists of words as array parameters: PostgreSQL's text[], SQLite's JSON text."""
    if dialect == "postgresql":
        return dict(words)
    return {name: json.dumps(value) for name, value in words.items()}


@dataclass(frozen=True, slots=True)
class Found:
    """A search's page, and how much testing of pending messages it did, in messages
    (a long one counts for more: TESTED_CHARS)."""

    messages: list[ChatMessage]
    pending: int


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
) -> Work[Found | None]:
    """The newest `limit` messages matching `query`, newest first (stored order).

    None when `may_index` and more than a batch of pending messages would have to be
    tested one by one (SQLite), or the index is needed while terms are pending
    (PostgreSQL): the caller indexes them (persistence.sql.indexing) and asks again.
    """
    dialect = yield WhichDialect()
    shape = Shape(session=session_id is not None, role=role is not None)
    indexed = yield from _indexed_matches(dialect, shape, query, limit, session_id, role, may_index)
    if indexed is None:
        return None
    if not defers(dialect):
        return Found(messages_from_rows(indexed), 0)
    pending = yield from _pending_matches(shape, query, limit, session_id, role, indexed, may_index)
    if pending is None:
        return None
    matched, tested = pending
    if matched:
        indexed = sorted([*indexed, *matched], key=_sort_key, reverse=True)[:limit]
    return Found(messages_from_rows(indexed), tested)


def _sort_key(row: Sequence[Any]) -> int:
    return int(row[_SORT_KEY])


_SORT_KEY = len(_RESULT_COLUMNS)
# Pending messages read per statement.
PENDING_BATCH = 500


def _pending_matches(
    shape: Shape,
    query: SearchQuery,
    limit: int,
    session_id: str | None,
    role: str | None,
    indexed: list[Sequence[Any]],
    may_index: bool,
) -> Work[tuple[list[Sequence[Any]], int] | None]:
    """The pending messages that match and may enter the page, newest first, and how
    many were tested (None: a full batch, and `may_index`)."""
    # Only messages newer than the page's oldest indexed match can enter a full page.
    floor = _sort_key(indexed[limit - 1]) if len(indexed) >= limit else -1
    params: dict[str, Any] = {"session_id": session_id, "role": role, "limit": PENDING_BATCH}
    below, tested = _TOP, 0
    matched: list[Sequence[Any]] = []
    while len(matched) < limit:
        rows = yield Fetch(_PENDING[shape], {**params, "below": below})
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
    shape: Shape,
    query: SearchQuery,
    limit: int,
    session_id: str | None,
    role: str | None,
    may_index: bool,
) -> Work[list[Sequence[Any]] | None]:
    """The newest `limit` indexed messages matching `query`, as rows, newest first.

    None when the index is needed, `may_index`, and PostgreSQL holds pending terms: the
    caller writes them (persistence.sql.indexing) and asks again.
    """
    common: dict[str, Any] = {"session_id": session_id, "role": role}
    arity, tested = word_parameters(
        dialect,
        [word.text for word in query.words if not word.anywhere],
        [word.text for word in query.words if word.anywhere],
    )
    common |= tested
    scan = _scan_statement(shape, arity)
    found: list[Sequence[Any]] = []
    below, scanned, budget = _TOP, 0, PROBE_ROWS
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
        params = {"session_id": session_id, "below": _TOP, "skip": scanned - 1}
        params |= _arrays(
            dialect,
            starts=[word.text for word in starts],
            contains=[word.text for word in contains],
        )
        counts = {
            (kind, int(n)): int(count) for kind, n, count in (yield Fetch(_COUNTS[shape], params))
        }
        hits = {word: counts[("starts", n)] for n, word in enumerate(starts)}
        hits |= {word: counts[("contains", n)] for n, word in enumerate(contains)}
        chosen = min(candidates, key=lambda word: (hits[word], -len(word.text)))
    recheck, index_params = _index_parameters(dialect, list(query.words), chosen)
    params = {**common, "below": below, "skip": budget - 1, "edge": edge}
    params |= {"limit": limit - len(found), **index_params}
    if dialect != "postgresql":
        found += yield Fetch(_index_statement(shape, arity, recheck), params)
    elif not may_index:
        # A search that may not write pending terms tests their rows' documents.
        found += yield Fetch(_index_statement(shape, arity, recheck, pending=True), params)
    else:
        # One that may writes them first (the caller does, then asks again).
        rows = yield Fetch(_index_statement(shape, arity, recheck, asking=True), params)
        if rows[0][-1] if rows else (yield Fetch(_ANY_PENDING_TERMS, {}))[0][0]:
            return None
        found += rows
    return found
