"""What each schema revision leaves in a database: tells a store's revision by its tables.

A version table can be wrong (`alembic stamp`), empty (stamped or downgraded to base)
or missing (a store copied without it): the marks say which revision the tables are
really at. Each revision has at least one mark on the dialects it changes; a revision
that changes nothing on a dialect (0006 to 0009, 0011, 0013 and 0014 on SQLite) has none
there, and its schema there is its predecessor's, as is a revision that changes only
data (0012).
Found by attack: the marks stopped at 0004, so a store at 0004 stamped 0009 was taken
for one at head.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from sqlalchemy import Connection, inspect, text

BOTH = frozenset({"sqlite", "postgresql"})
POSTGRESQL = frozenset({"postgresql"})
_TERMS_FUNCTION = "persistence_search_terms(text)"
_APPEND_FUNCTION = (
    "persistence_append(text, text, timestamptz, bigint,"
    " text[], text[], text[], timestamptz[], text[], text[])"
)


@dataclass(frozen=True)
class Mark:
    """One thing a revision adds that every later revision keeps."""

    revision: str
    kind: Literal["table", "column", "index", "function", "source"]
    name: str
    """The table; `table.column`; `table.index`; a function's signature; or, for
    `source`, text of `persistence_search_terms`' body."""
    columns: frozenset[str] = frozenset()
    """A table's columns as the revision made them."""
    dialects: frozenset[str] = BOTH
    function: str = _TERMS_FUNCTION
    """For `source`, the function whose body holds `name`."""

    def shown(self) -> str:
        if self.kind == "source":
            return f"{self.function} as revision {self.revision} defines it"
        return self.name


MARKS = (
    Mark(
        "0001",
        "table",
        "chat_sessions",
        frozenset({"session_id", "model", "created_at", "updated_at", "message_count"})
        | {"metadata", "status"},
    ),
    Mark(
        "0001",
        "table",
        "chat_messages",
        frozenset({"id", "message_id", "session_id", "position", "role", "content"})
        | {"created_at", "metadata"},
    ),
    Mark(
        "0001",
        "table",
        "uploaded_files",
        frozenset({"file_id", "gemini_file_name", "gemini_file_uri", "display_name", "size"})
        | {"mime_type", "uploaded_at", "expires_at", "metadata"},
    ),
    Mark("0002", "column", "chat_sessions.next_position"),
    Mark("0003", "column", "chat_messages.search_text"),
    Mark("0004", "table", "chat_session_counts"),
    Mark("0005", "index", "chat_messages.ix_chat_messages_pending"),
    # 0006's fast path, kept by 0008.
    Mark("0006", "source", "octet_length(document) <= 1000000", dialects=POSTGRESQL),
    Mark("0007", "function", _APPEND_FUNCTION, dialects=POSTGRESQL),
    Mark("0008", "source", "varchar(200)[]", dialects=POSTGRESQL),
    Mark("0009", "table", "chat_message_terms", dialects=POSTGRESQL),
    Mark("0010", "table", "chat_session_deletions"),
    Mark("0010", "table", "chat_session_merges"),
    Mark(
        "0011",
        "source",
        "chat_session_counts_slot()",
        dialects=POSTGRESQL,
        function="chat_session_counts_add(text, text, bigint)",
    ),
    Mark(
        "0013",
        "source",
        "chat_terms_pending",
        dialects=POSTGRESQL,
        function="persistence_write_pending_terms(integer)",
    ),
    Mark(
        "0013", "source", "FOR SHARE", dialects=POSTGRESQL, function="persistence_terms_deleted()"
    ),
    Mark(
        "0013",
        "table",
        "chat_terms_recheck",
        frozenset({"recheck", "first_id", "last_id", "settled_at"}),
        dialects=POSTGRESQL,
    ),
    Mark(
        "0014",
        "source",
        "EXCEPT ALL",
        dialects=POSTGRESQL,
        function="persistence_write_pending_terms(integer)",
    ),
    Mark("0015", "table", "persistence_store", frozenset({"name", "value"})),
)
# Revisions that change data only (their tables are their predecessor's): a store is
# never told to be at one, so that an upgrade from what it is told runs them (found by
# attack: told 0012, a store stamped so skipped 0012's rewrite). Running one again
# changes nothing.
DATA_REVISIONS = ("0012",)
REVISIONS = tuple(dict.fromkeys(mark.revision for mark in MARKS))


@dataclass
class _Look:
    """Reads the database once per thing asked (one inspector, one function query)."""

    connection: Connection
    inspector: Any = None
    tables: set[str] = field(default_factory=set)
    functions: tuple[str | None, bool] | None = None
    sources: dict[str, str | None] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.inspector = inspect(self.connection)
        self.tables = set(self.inspector.get_table_names())

    def columns(self, table: str) -> set[str]:
        if table not in self.tables:
            return set()
        return {column["name"] for column in self.inspector.get_columns(table)}

    def _functions(self) -> tuple[str | None, bool]:
        if self.functions is None:
            row = self.connection.execute(
                text(
                    "SELECT (SELECT prosrc FROM pg_proc WHERE oid = to_regprocedure(:terms)),"
                    " to_regprocedure(:append) IS NOT NULL"
                ),
                {"terms": _TERMS_FUNCTION, "append": _APPEND_FUNCTION},
            ).one()
            self.functions = (row[0], bool(row[1]))
        return self.functions

    def lacks(self, mark: Mark) -> list[str]:
        """What of `mark` the database lacks, as an error names it."""
        table, _, part = mark.name.partition(".")
        if mark.kind == "table":
            if table not in self.tables:
                return [table]
            return [f"{table}.{column}" for column in sorted(mark.columns - self.columns(table))]
        if mark.kind == "column":
            return [] if part in self.columns(table) else [mark.name]
        if mark.kind == "index":
            found = table in self.tables and any(
                index["name"] == part for index in self.inspector.get_indexes(table)
            )
            return [] if found else [mark.name]
        if mark.kind == "function":
            return [] if self._functions()[1] else [mark.shown()]
        source = self._functions()[0] if mark.function == _TERMS_FUNCTION else self._source(mark)
        return [] if source is not None and mark.name in source else [mark.shown()]

    def _source(self, mark: Mark) -> str | None:
        """The body of `mark.function`, None if there is no such function."""
        if mark.function not in self.sources:
            self.sources[mark.function] = self.connection.execute(
                text("SELECT prosrc FROM pg_proc WHERE oid = to_regprocedure(:function)"),
                {"function": mark.function},
            ).scalar()
        return self.sources[mark.function]


def _marks(dialect: str, revision: str) -> list[Mark]:
    return [mark for mark in MARKS if mark.revision == revision and dialect in mark.dialects]


def missing_at(connection: Connection, revision: str) -> list[str]:
    """What revision `revision` (and every earlier one) leaves that the database lacks,
    oldest first; a missing table once, not each of its columns and indexes.

    A revision this module does not know (a newer one) is checked as far as it knows.
    """
    look = _Look(connection)
    dialect = connection.dialect.name
    missing: list[str] = []
    for known in REVISIONS:
        if known > revision:
            break
        for mark in _marks(dialect, known):
            table = mark.name.partition(".")[0]
            if mark.kind in {"column", "index"} and table in missing:
                continue
            missing += look.lacks(mark)
    return missing


def present_after(connection: Connection, revision: str) -> list[str]:
    """What revisions later than `revision` leave that the database has, oldest first:
    a store at `revision` has none of it."""
    look = _Look(connection)
    dialect = connection.dialect.name
    return [
        mark.shown()
        for later in REVISIONS
        if later > revision
        for mark in _marks(dialect, later)
        if not look.lacks(mark)
    ]


def schema_revision(connection: Connection) -> str | None:
    """The revision the tables are at, by their marks; None when not even 0001's tables
    are there with their columns.

    Where later revisions change nothing on the dialect, the newest of them: its schema
    is the same, so `alembic stamp` of it is right. Never past a data revision, though:
    a store stamped past one would skip it (0013 changes nothing on SQLite, where a
    store at 0011 is told 0011, not 0013, so that its upgrade runs 0012).
    """
    look = _Look(connection)
    dialect = connection.dialect.name
    found: str | None = None
    for revision in REVISIONS:
        marks = _marks(dialect, revision)
        if any(look.lacks(mark) for mark in marks):
            break
        if not marks and found and any(found < data < revision for data in DATA_REVISIONS):
            continue  # a later revision's marks may still tell it (0015 on SQLite)
        found = revision
    return found
