# ruff: noqa: S608  # every statement here is built from constants; values are bound
"""The statements of a SQL search (search.py), as text per dialect, and their parameters.

- the scan (`scan_statement`): the newest rows, each tested against the words;
- the index (`index_statement`): FTS5's MATCH on SQLite, the GIN index of the terms on
  PostgreSQL, with every word rechecked against the stored document;
- the pending rows (`PENDING`, SQLite), and the counts that pick the index's word.

Up to INLINE_WORDS words of each kind are bound one by one (`:starts_0`, ...), more as
one array; the statements are built per shape and arity on first use.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache, partial
from typing import Any

from sqlalchemy import ARRAY, BigInteger, Boolean, Text, bindparam, column, text
from sqlalchemy.sql import ClauseElement

from persistence.search import GRAM_MARK, QueryWord
from persistence.sql.statements import Statement
from persistence.sql.tables import MessageRow

# PostgreSQL cuts index terms to this many characters (revision 0003's
# persistence_search_terms), and indexes a document whose terms pass 1 MB as OVERFLOW.
POSTGRESQL_TERM_CHARS = 200
# FTS5 cuts every token, stored or queried, to 32,768 bytes: a longer word that must
# begin a message's word is rechecked, as one past PostgreSQL's cut is (found by attack:
# it matched every word with the same first 32,768 bytes). Bytes, with a margin.
SQLITE_TERM_BYTES = 32_000
OVERFLOW_TERM = GRAM_MARK * 2
# Above every row id and position.
TOP = 2**62

# mapping.MESSAGE_COLUMNS, as text: the metadata as its JSON text, which the builder reads.
RESULT_COLUMNS = (
    *(
        MessageRow.__table__.c[name]
        for name in ("message_id", "session_id", "role", "content", "created_at")
    ),
    column("metadata_text", Text()),
)
_COLUMNS = (
    ", ".join(f"m.{column.name}" for column in RESULT_COLUMNS[:-1])
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
            params |= arrays(dialect, **{name: words})
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
    f"CASE WHEN :below >= {TOP} THEN (SELECT s.message_count FROM chat_sessions AS s"
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

    find_messages passes the edge the last scan returned, or, when it matched nothing
    (and so did not say where it stopped), its window's top; without :edge, below the
    edge of the window a scan with the same :below and :skip read. PostgreSQL: with
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
        return statement.columns(*RESULT_COLUMNS, *extra)

    return Statement(element)


_PARAMETER = re.compile(r"(?<!:):([a-z_][a-z_0-9]*)")
_SHAPES = [Shape(session, role) for session in (False, True) for role in (False, True)]
# Statements by shape and arity, made when first asked for: a few dozen in practice
# (each kind of word bound one by one up to INLINE_WORDS), bounded all the same.
_STATEMENTS = 512


@lru_cache(maxsize=_STATEMENTS)
def scan_statement(shape: Shape, words: Arity) -> Statement:
    return _statement(partial(_scan, words=words), shape, edge=True)


@lru_cache(maxsize=_STATEMENTS)
def index_statement(
    shape: Shape, words: Arity, recheck: Arity, pending: bool = False, asking: bool = False
) -> Statement:
    """_index's statement. PostgreSQL: `pending` where a search may not write the pending
    terms (replicas, stores opened for reading), or where one that may found some: the
    rows are tested too; `asking` where a search may write them: each row also says
    whether any are pending (no round trip of its own unless no row came back)."""
    build = partial(_index, words=words, recheck=recheck, pending=pending, asking=asking)
    return _statement(build, shape, asking=asking)


PENDING = {shape: _statement(_pending, shape) for shape in _SHAPES}


def _counts(shape: Shape, dialect: str) -> str:
    """How many of the `:skip + 1` newest rows at or below :below each word of :starts
    and :contains matches."""
    where = [f"{shape.key} <= :below", f"{shape.key} >= coalesce({_edge(shape)}, -1)"]
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


COUNTS = {shape: _statement(_counts, shape, rows=False) for shape in _SHAPES}
ANY_PENDING_TERMS = Statement(text(f"SELECT {_TERMS_PENDING}"))


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


def _cut_by_the_index(dialect: str, word: str) -> bool:
    if dialect == "postgresql":
        return len(word) > POSTGRESQL_TERM_CHARS
    # At most 4 bytes a character: a word this short fits whatever its script.
    return len(word) * 4 > SQLITE_TERM_BYTES and len(word.encode()) > SQLITE_TERM_BYTES


def index_parameters(
    dialect: str, words: list[QueryWord], chosen: QueryWord
) -> tuple[Arity, dict[str, Any]]:
    """The index finds `chosen`; the recheck decides every other word, and `chosen` too
    where its terms alone do not. Returns the recheck's arity and the parameters."""
    starts = [word.text for word in words if not word.anywhere and word != chosen]
    contains = [word.text for word in words if word.anywhere and word != chosen]
    if chosen.anywhere and chosen.prefix_term() is None:
        contains.append(chosen.text)
    if not chosen.anywhere and _cut_by_the_index(dialect, chosen.text):
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


def arrays(dialect: str, **words: list[str]) -> dict[str, Any]:
    """Lists of words as array parameters: PostgreSQL's text[], SQLite's JSON text."""
    if dialect == "postgresql":
        return dict(words)
    return {name: json.dumps(value) for name, value in words.items()}
