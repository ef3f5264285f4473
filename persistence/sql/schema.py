"""Runs the packaged alembic revisions on a live connection, and checks what it finds.

Persistence keeps its schema revision in its own version table
(`persistence_alembic_version`), so that it can share a database or schema with an
application that uses alembic itself. Stores made before that kept it in alembic's
default `alembic_version`: holding one of our revision ids there, they are ours, and
are moved to our table by the next upgrade.
"""

from __future__ import annotations

import contextlib
import functools
import sqlite3
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Inspector, create_engine, inspect, text
from sqlalchemy.pool import NullPool

from persistence.errors import MigrationError, SchemaVersionError
from persistence.sql.encoding import check_server_encoding
from persistence.sql.revision_marks import MARKS, Mark, missing_at, present_after, schema_revision
from persistence.sql.revisions import HEAD, REVISIONS, version_heads
from persistence.sql.tables import SEARCH_OBJECTS, Base

if TYPE_CHECKING:
    from alembic.script import ScriptDirectory

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
VERSION_TABLE = "persistence_alembic_version"
LEGACY_VERSION_TABLE = "alembic_version"
# Any constant works: it only has to be the same for every process of this library.
_PG_MIGRATION_LOCK = 7_274_551_337
_SHOWN_TABLES = 5
# alembic's `context` and `op` are proxies global to the process, set by each run of
# revisions: runs in other threads (each with its own event loop) are taken one at a
# time. Found by attack: eight threads initialising eight new SQLite files at once
# failed with alembic's KeyError 'script', and once ran one store's revision on
# another's connection ("table chat_sessions already exists"). Reentrant: a run that
# refuses a file builds a scratch store to head inside it (_sqlite_names_of_ours).
_REVISION_RUNS = threading.RLock()
# The tables of the first revision with their columns, kept by every later one.
_FIRST_TABLES = tuple(mark for mark in MARKS if mark.revision == "0001" and mark.kind == "table")


@functools.cache
def script_directory() -> ScriptDirectory:
    """Returns the revisions that ship inside the package (alembic is imported here, and
    where revisions run: a store at head is opened without it, persistence.sql.revisions)."""
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return ScriptDirectory.from_config(config)


@dataclass(frozen=True)
class SchemaState:
    """What a database holds, as far as persistence's schema is concerned."""

    heads: tuple[str, ...]
    """Our revision(s) the database is at; empty for an empty database."""
    legacy: bool = False
    """The revision sits in `alembic_version`, not yet in our own version table."""


def is_version_table(inspector: Inspector, version_table: str) -> bool:
    """Whether `version_table` is a table with alembic's `version_num` column: not a
    view, nor another application's table of that name."""
    return version_table in inspector.get_table_names() and any(
        column["name"] == "version_num" for column in inspector.get_columns(version_table)
    )


def refuse_without_version_table(
    connection: Connection, version_table: str, where: str, *, doing: str, create_with: str
) -> None:
    """Refuses a database without `version_table` to a command that needs a store of
    ours (`stamp`, `downgrade`). Found by attack: both wrote one into an empty database,
    or said they had."""
    if version_table not in inspect(connection).get_table_names():
        raise MigrationError(
            f"{where} holds no persistence schema (no {version_table}): nothing to {doing}"
            f" (nothing was written); create it with {create_with}"
        )


def listed(names: list[str] | tuple[str, ...], *, ordered: bool = False) -> str:
    shown = ", ".join((names if ordered else sorted(names))[:_SHOWN_TABLES])
    return shown + (f" and {len(names) - _SHOWN_TABLES} more" if len(names) > _SHOWN_TABLES else "")


def are(names: list[str] | tuple[str, ...]) -> str:
    """The verb after `listed(names)`."""
    return "is" if len(names) == 1 else "are"


class ForeignTablesError(MigrationError):
    """The database holds another application's tables, none of a name of ours: the
    library refuses it, and `alembic upgrade head` may create persistence's tables
    beside them (alembic/env.py lets this one error through, no other)."""


class ClaimedFileError(MigrationError):
    """A SQLite file without tables that another application has claimed in its header
    (`application_id`, `user_version`): refused by every command, `alembic stamp`
    and `downgrade` too."""


# The names our revisions give tables and indexes, which another application's objects
# must not hold for persistence's tables to be made beside them.
_OUR_NAMES = (
    frozenset(Base.metadata.tables)
    | {
        index.name
        for table in Base.metadata.tables.values()
        for index in table.indexes
        if index.name
    }
    | SEARCH_OBJECTS
)

# What else the revisions name in a PostgreSQL store's schema, where names are shared
# by tables, indexes and sequences, and functions are matched by name alone (a test
# checks it against a store at head). Not the version table's own (`..._pkc`): an empty
# one of ours beside another application's tables (after `downgrade base`) is no clash.
_POSTGRESQL_NAMES_OF_OURS = frozenset(
    {"chat_messages_id_seq", "chat_terms_pending_pending_seq", "chat_terms_recheck_recheck_seq"}
    | {"uq_chat_messages_message_id", "ix_chat_messages_content_tsv"}  # 0001 to 0002
    | {f"pk_{table}" for table in Base.metadata.tables}
    | {"pk_chat_message_terms", "pk_chat_terms_pending", "pk_chat_terms_recheck"}
    | {
        "chat_session_counts_add",
        "chat_session_counts_clear",
        "chat_session_counts_deleted",
        "chat_session_counts_inserted",
        "chat_session_counts_slot",
        "chat_session_counts_trigger",
        "chat_session_deletions_record",
        "chat_session_deletions_truncate",
        "persistence_append",
        "persistence_search_terms",
        "persistence_terms_changed",
        "persistence_terms_deleted",
        "persistence_terms_inserted",
        "persistence_terms_matching",
        "persistence_terms_truncated",
        "persistence_write_pending_terms",
    }
)

# The names of the relations, functions and types in the store's schema.
_POSTGRESQL_SCHEMA_NAMES = text(
    """
WITH store AS (SELECT oid FROM pg_namespace WHERE nspname = current_schema())
SELECT relname FROM pg_class WHERE relnamespace = (SELECT oid FROM store)
UNION SELECT proname FROM pg_proc WHERE pronamespace = (SELECT oid FROM store)
UNION SELECT typname FROM pg_type WHERE typnamespace = (SELECT oid FROM store)
"""
)


def _names_taken(connection: Connection, tables: set[str]) -> list[str]:
    """The names of ours that another application's `tables`, or its other objects
    in the database (SQLite: indexes and triggers; PostgreSQL: indexes, sequences,
    functions and types of the store's schema), already hold."""
    taken = tables & _OUR_NAMES
    if connection.dialect.name == "sqlite":
        held = {row[0] for row in connection.exec_driver_sql("SELECT name FROM sqlite_master")}
        taken |= held & _sqlite_names_of_ours()
    else:
        held = {row[0] for row in connection.execute(_POSTGRESQL_SCHEMA_NAMES)}
        taken |= held & (_OUR_NAMES | _POSTGRESQL_NAMES_OF_OURS)
    return sorted(taken)


def _foreign(connection: Connection, where: str, held: str, names: set[str]) -> MigrationError:
    """The refusal of a database that holds another application's tables (`held` says
    what else it holds): the advice to create ours beside them with alembic only where
    none of its tables (`names`), nor on SQLite its indexes and triggers, has a name of
    ours. Found by attack: beside another application's `chat_sessions` that advice
    ended in alembic's raw "table chat_sessions already exists", after its connection
    had rolled back the file's hot journal; beside its index `ix_chat_messages_pending`
    alembic dropped that UNIQUE index (revision 0005 drops and makes it again); beside
    its PostgreSQL index or function of our names, alembic failed on a raw "already
    exists"."""
    taken = _names_taken(connection, names)
    head = (
        f"{where} holds tables of another application ({listed(list(names))}) and {held}"
        if names
        else f"{where} holds tables of another application: {held}"
    )
    if taken:
        return MigrationError(
            f"{head}; persistence neither reads nor changes it: use a database of its own"
            f" (persistence's own tables, indexes, triggers or functions are named"
            f" {listed(taken)} too,"
            " so they cannot be created beside them)"
        )
    return ForeignTablesError(
        f"{head}; persistence neither reads nor changes it: use a database of its own, or"
        f" create persistence's tables beside them with {_alembic('upgrade head')}"
    )


def examine(
    connection: Connection,
    *,
    version_table: str = VERSION_TABLE,
    where: str = "the database",
) -> SchemaState:
    """Says whether the database is empty or ours, and at which revision; writes nothing.

    Raises:
        SchemaVersionError: our version table holds a revision this code does not know
            (the store was written by a newer version).
        MigrationError: the database holds tables of another application, or
            another application's `alembic_version`.
    """
    search_path = _refuse_without_schema(connection, where)
    inspector = inspect(connection)
    names = set(inspector.get_table_names()) | set(inspector.get_view_names())
    if search_path is not None:  # PostgreSQL
        # Found by attack: a database holding only a materialized view, or a foreign
        # table (file_fdw, postgres_fdw), looked empty.
        names |= set(inspector.get_materialized_view_names())
        names |= set(inspector.get_foreign_table_names())  # type: ignore[attr-defined]
        # And a sequence of its own (found by attack: one looked like an empty database).
        sequences, of_extensions = _sequences_and_extension_members(connection)
        names = (names | sequences) - of_extensions
    known = set(REVISIONS)
    if version_table in names:
        if not is_version_table(inspector, version_table):
            # Found by attack: another application's table of that name gave alembic's
            # raw "no such column", its view of it "written by a newer version".
            raise MigrationError(
                f"{where} holds a table or view named {version_table} that is not"
                " persistence's version table (no version_num column, or a view);"
                " persistence neither reads nor changes it: use a database of its own"
            )
        heads = version_heads(connection, version_table)
        unknown = [head for head in heads if head not in known]
        if unknown:
            raise SchemaVersionError(
                f"{where}: the schema is at revision {', '.join(unknown)}, which this"
                f" version of persistence does not know (known head: {HEAD}); it was"
                " written by a newer version: upgrade persistence"
            )
        if heads != (HEAD,):
            # Its upgrade makes tables, where the search_path puts them.
            refuse_a_system_schema_first(connection, where, search_path)
        if not heads:
            _refuse_base(connection, names - {version_table}, version_table, where)
            return SchemaState(())
        _check_marks(connection, heads, version_table, where)
        return SchemaState(heads)
    # No store of ours where the search_path looks: tables would be made.
    refuse_a_system_schema_first(connection, where, search_path)
    if version_table != LEGACY_VERSION_TABLE and LEGACY_VERSION_TABLE in names:
        heads = version_heads(connection, LEGACY_VERSION_TABLE)
        # Our revision ids are short (0001...): another application's may be the same,
        # so its tables must be ours too, with our columns. Found by attack: another chat
        # application with tables of our names and its alembic_version at 0007 was
        # taken for a store of ours and migrated.
        if heads and all(head in known for head in heads) and _ours(connection):
            _check_marks(connection, heads, LEGACY_VERSION_TABLE, where)
            return SchemaState(heads, legacy=True)
        _refuse_unstamped(connection, f"its {LEGACY_VERSION_TABLE} is {_at(heads)}", where)
        raise _foreign(
            connection,
            where,
            f"its {LEGACY_VERSION_TABLE} is at revision {', '.join(heads) or '(none)'}, which"
            " is not a persistence store's (not a revision of ours, or without our tables)",
            names - {LEGACY_VERSION_TABLE},
        )
    if names:
        _refuse_unstamped(connection, f"it has no {version_table}", where)
        raise _foreign(connection, where, f"no persistence schema ({version_table})", names)
    if connection.dialect.name == "postgresql":
        if taken := _names_taken(connection, set()):
            # Found by attack: a function of our name alone, taken for an empty database.
            raise MigrationError(
                f"{where} holds no tables but functions or types of another application"
                f" named as persistence's own ({listed(taken)}); persistence neither reads"
                " nor changes it: use a database of its own"
            )
        _refuse_other_schemas(connection, version_table, where)
    return SchemaState(())


@dataclass(frozen=True, slots=True)
class SearchPath:
    """Where a PostgreSQL connection's unqualified names go."""

    # The first schema of the search_path that exists (and the role may use), if any.
    schema: str | None
    setting: str
    # That schema is the server's own (pg_catalog, information_schema, pg_temp_N).
    of_the_server: bool


_SEARCH_PATH = text(
    "SELECT current_schema(), current_setting('search_path'),"
    r" coalesce(current_schema() LIKE 'pg\_%' OR current_schema() = 'information_schema',"
    " false)"
)


def _search_path(connection: Connection) -> SearchPath | None:
    """The connection's search path on PostgreSQL; None on SQLite, which has none."""
    if connection.dialect.name != "postgresql":
        return None
    return SearchPath(*connection.execute(_SEARCH_PATH).one())


def refuse_a_system_schema_first(
    connection: Connection, where: str, search_path: SearchPath | None = None
) -> None:
    """Refuses to write a schema (make a store, upgrade or downgrade one, stamp one)
    where the search_path puts a schema of the server's own first: what a revision or a
    stamp makes (tables, functions, the version table) would go there. examine() calls
    it where a store would be made or upgraded, alembic's downgrade and stamp and
    `persistence stamp` always. A store at head the search_path finds after such a
    schema (a known hardening: `pg_catalog, public`) is opened as any other (found by
    attack: refusing every open so was a regression).

    Found by attack: with `search_path=pg_temp` revision 0001 made its tables in the
    connection's temporary schema, then failed on a function it could not find; an
    upgrade through `pg_temp, public` recorded 0015 while its table went with the
    connection, through `information_schema, public` split the store between two
    schemas; a downgrade and a stamp wrote functions and the version table there.

    `search_path`: as examine() read it, else read here. Nothing to refuse on SQLite.
    """
    found = search_path or _search_path(connection)
    if found is not None and found.of_the_server:
        raise MigrationError(
            f"{where}: its search_path ({found.setting}) puts {found.schema} first, a schema of"
            " the server's own (or the connection's temporary one, gone when it closes),"
            " where what a migration or a stamp makes would go: name the store's schema"
            " first in the URL's options=-csearch_path=..."
        )


def _refuse_without_schema(connection: Connection, where: str) -> SearchPath | None:
    """The connection's search path (None on SQLite); refuses a PostgreSQL connection
    whose search_path names no schema that exists: the store's tables would have nowhere
    to go, and none to be read from.

    Found by attack: `options=-csearch_path=nosuch` (a typo, or a schema not made yet)
    failed in the middle of the first revision with the server's "no schema has been
    selected to create in".
    """
    search_path = _search_path(connection)
    if search_path is not None and search_path.schema is None:
        raise MigrationError(
            f"{where}: its search_path ({search_path.setting}) names no schema that exists in"
            " this database (or that this role may use), so the store's tables have"
            " nowhere to be: create the schema (CREATE SCHEMA name) or name an existing"
            " one in the URL's options=-csearch_path=..."
        )
    return search_path


# Relations of other schemas than the store's: tables, views, materialized views,
# foreign tables and sequences of their own (not a table's), none of an extension;
# with their number, and whether another schema holds a store of ours (our version
# table). Temporary schemas (another session's temp tables) are not looked at. A store
# made before the version table had its own name counts once opened (which moves its
# revision over): found by attack, `alembic_version` beside a `chat_sessions` table
# let another chat application's schema pass for a store of ours.
_ELSEWHERE = text(
    r"""
WITH schemas AS (
    SELECT oid, nspname FROM pg_namespace
    WHERE nspname IS DISTINCT FROM current_schema()
      AND nspname <> 'information_schema' AND nspname NOT LIKE 'pg\_%'
)
SELECT s.nspname || '.' || c.relname, count(*) OVER (),
       EXISTS (SELECT FROM pg_class v JOIN schemas vs ON vs.oid = v.relnamespace
               WHERE v.relkind = 'r' AND v.relname = :version_table)
FROM pg_class c JOIN schemas s ON s.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f', 'S')
  AND NOT EXISTS (SELECT FROM pg_depend d
                  WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid
                    AND (d.deptype = 'e' OR (c.relkind = 'S' AND d.deptype IN ('a', 'i'))))
ORDER BY 1
LIMIT 5
"""
)


def _refuse_other_schemas(connection: Connection, version_table: str, where: str) -> None:
    """Refuses a database whose schema for the store is empty but whose other schemas
    hold another application's tables, unless one of them holds a store of ours (two
    stores in two schemas of one database are two stores).

    Found by attack: a database holding its tables in a schema of its own (`billing`)
    was taken for an empty one, and persistence's tables were created in its `public`.

    Raises:
        MigrationError: naming some of those tables and what to do.
    """
    rows = connection.execute(_ELSEWHERE, {"version_table": version_table}).all()
    if not rows or rows[0][2]:
        return
    shown = ", ".join(row[0] for row in rows)
    more = rows[0][1] - len(rows)
    raise ForeignTablesError(
        f"{where} holds tables of another application in other schemas"
        f" ({shown}{f' and {more} more' if more else ''}) and no persistence schema"
        f" ({version_table}); persistence neither reads nor changes it: use a database of"
        " its own, or create persistence's tables beside them (in the schema the URL's"
        f" search_path names first) with {_alembic('upgrade head')}"
    )


def _sequences_and_extension_members(connection: Connection) -> tuple[set[str], set[str]]:
    """In one query, of the store's schema: the sequences no table owns (nor an
    extension), and the relations that belong to an extension (found by attack:
    pg_stat_statements' views in `public` made a fresh database another
    application's)."""
    rows = connection.execute(
        text(
            "SELECT c.relname, d.deptype = 'e' FROM pg_class c"
            " JOIN pg_namespace n ON n.oid = c.relnamespace"
            " LEFT JOIN pg_depend d ON d.classid = 'pg_class'::regclass AND d.objid = c.oid"
            " AND d.deptype IN ('a', 'i', 'e')"
            " WHERE n.nspname = current_schema() AND (c.relkind = 'S' OR d.deptype = 'e')"
        )
    ).all()
    # No dependency row (NULL): a sequence of its own; TRUE: an extension's relation.
    own = {name for name, of_extension in rows if of_extension is None}
    return own, {name for name, of_extension in rows if of_extension}


def _alembic(*commands: str) -> str:
    """The alembic commands to run, from persistence's source tree, on the database."""
    return " and ".join(f"`alembic -x url=URL {command}`" for command in commands) + (
        ", URL naming this database"
    )


def _at(heads: tuple[str, ...]) -> str:
    return f"at revision {', '.join(heads)}" if heads else "empty"


def _adopt(revision: str) -> str:
    # Found by review: only alembic's commands were named, and alembic's command line
    # needs persistence's source tree, which an installed package does not have.
    return (
        "record the revision its tables are at, then upgrade:"
        f" `persistence stamp {revision} --url URL` and `persistence upgrade --url URL`"
        f" (or {_alembic(f'stamp {revision}', 'upgrade head')})"
    )


def _refuse_unstamped(connection: Connection, version: str, where: str) -> None:
    """Refuses, naming what to run, tables of ours without a version row of ours.

    Raises:
        MigrationError: if persistence's tables are there (found by their marks).
    """
    detected = schema_revision(connection)
    if detected is not None:
        raise MigrationError(
            f"{where} holds persistence's tables, at revision {detected} by their"
            f" columns, but {version}; persistence neither reads nor changes it: if it is a"
            f" persistence store, {_adopt(detected)}"
        )


def _refuse_base(connection: Connection, others: set[str], version_table: str, where: str) -> None:
    """Refuses a database whose version table of ours is empty (stamped at base, or
    downgraded to it) unless nothing else is there: `alembic downgrade base` leaves
    exactly that, an empty schema, which initialize() brings to head (API.md).

    Found by attack: initialize() took such a table beside another application's tables
    for an empty store of ours and created its tables there.

    Raises:
        MigrationError: persistence's tables (`alembic stamp base`) or another
            application's are there, naming what to run.
    """
    _refuse_unstamped(
        connection, f"its {version_table} is empty (stamped or downgraded to base)", where
    )
    if others:
        raise _foreign(
            connection, where, f"an empty {version_table} (stamped or downgraded to base)", others
        )


def _check_marks(
    connection: Connection, heads: tuple[str, ...], version_table: str, where: str
) -> None:
    """Refuses a version table whose revision the tables are not at (behind or ahead).

    Found by attack: `alembic stamp head` on an empty database, on another
    application's, or on a store of an older revision, and initialize() took it
    as a store at head (every call then failed on a missing table).

    Raises:
        MigrationError: naming what is missing and what to run.
    """
    missing = missing_at(connection, max(heads))
    if not missing:
        ahead = present_after(connection, max(heads))
        if not ahead:
            return
        # Found by attack: a store at head stamped 0002 was migrated from there, and
        # failed on "duplicate column name: search_text", naming no database.
        tables_at = schema_revision(connection) or max(heads)
        raise MigrationError(
            f"{where}: {version_table} says the schema is at revision {', '.join(heads)},"
            f" but {listed(ahead, ordered=True)} of later revisions {are(ahead)} there (its tables"
            f" are at revision {tables_at}); persistence neither reads nor changes it. If it"
            f" was stamped by mistake, {_adopt(tables_at)}"
        )
    detected = schema_revision(connection)
    at = (
        f"(its tables are at revision {detected}), {_adopt(detected)}"
        if detected is not None
        else f"(no persistence table is complete), run {_alembic('stamp base', 'upgrade head')}"
    )
    raise MigrationError(
        f"{where}: {version_table} says the schema is at revision {', '.join(heads)}, but"
        f" {listed(missing, ordered=True)} of that revision {are(missing)} not there"
        " (stamped without migrating, or changed by hand); persistence neither reads nor"
        " changes it. If it"
        f" was stamped by mistake {at}"
    )


def _ours(connection: Connection) -> bool:
    """Whether every table of ours is there with at least the columns 0001 gave it."""
    return schema_revision(connection) is not None


def check_readable(
    connection: Connection, *, version_table: str = VERSION_TABLE, where: str = "the database"
) -> None:
    """Checks that the database is a persistence store at head, without writing.

    Raises:
        SchemaVersionError: the store was written by a newer version.
        MigrationError: the database is empty, older than this code, or another
            application's.
    """
    state = examine(connection, version_table=version_table, where=where)
    if not state.heads:
        if connection.dialect.name == "sqlite":
            # Found by attack: `stats` said to run `persistence upgrade`, which then
            # refused the file as claimed.
            refuse_if_claimed(connection, where)
        raise MigrationError(
            f"{where} has no persistence schema: create it with `persistence upgrade`"
            " (or any command that writes)"
        )
    if state.heads != (HEAD,):
        raise MigrationError(
            f"{where} is at schema revision {', '.join(state.heads)} and this version of"
            f" persistence reads revision {HEAD}: run `persistence upgrade` first"
        )


def adopt_legacy_version(connection: Connection, version_table: str = VERSION_TABLE) -> None:
    """Moves our revision from `alembic_version` into our own version table.

    Only called when `alembic_version` holds nothing but our revision ids.
    """
    from alembic.runtime.migration import MigrationContext

    heads = version_heads(connection, LEGACY_VERSION_TABLE)
    context = MigrationContext.configure(connection, opts={"version_table": version_table})
    script = script_directory()
    for head in heads:
        context.stamp(script, head)
    connection.execute(text(f"DROP TABLE {LEGACY_VERSION_TABLE}"))


def upgrade_to_head(
    connection: Connection, *, version_table: str = VERSION_TABLE, where: str = "the database"
) -> None:
    """Brings the schema of an empty or older store to head in the connection's transaction.

    Raises:
        SchemaVersionError: if the database is at a revision of ours this code does
            not know.
        MigrationError: if the database holds another application's tables or
            version table (nothing is written then).
    """
    if prepare_upgrade(connection, version_table=version_table, where=where):
        run_revisions(connection, version_table)


def prepare_upgrade(
    connection: Connection, *, version_table: str = VERSION_TABLE, where: str = "the database"
) -> bool:
    """Locks and examines the database (adopting a legacy version table); says whether
    revisions must run to bring it to head.

    Raises:
        as `upgrade_to_head`.
    """
    take_migration_lock(connection)
    state = examine(connection, version_table=version_table, where=where)
    if state.legacy:
        adopt_legacy_version(connection, version_table)
    return state.heads != (HEAD,)


def run_revisions(connection: Connection, version_table: str = VERSION_TABLE) -> None:
    """Runs every revision from the database's to head in the connection's transaction."""
    from alembic.config import Config
    from alembic.runtime.environment import EnvironmentContext

    script = script_directory()
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))

    def upgrade(revision: Any, context: Any) -> Any:
        return script._upgrade_revs("head", revision)

    with _REVISION_RUNS, EnvironmentContext(config, script, fn=upgrade) as env:
        env.configure(
            connection=connection,
            target_metadata=Base.metadata,
            render_as_batch=connection.dialect.name == "sqlite",
            version_table=version_table,
        )
        env.run_migrations()


def take_migration_lock(connection: Connection) -> None:
    """PostgreSQL: waits for any other process migrating the database (the lock holds
    until the transaction ends); two processes initialising one fresh database must not
    both create tables. SQLite's write lock does the same from BEGIN IMMEDIATE on."""
    if connection.dialect.name == "postgresql":
        connection.execute(text(f"SELECT pg_advisory_xact_lock({_PG_MIGRATION_LOCK})"))


def dangling_references(connection: Connection) -> int:
    """SQLite: how many rows refer to no row of their table (a message of no session).

    A store can hold some before any revision runs: the sqlite3 shell, where foreign
    keys are off by default, deletes a session and leaves its messages.
    """
    if connection.dialect.name != "sqlite":
        return 0
    return int(
        connection.exec_driver_sql("SELECT count(*) FROM pragma_foreign_key_check").scalar_one()
    )


def check_references(connection: Connection, where: str, before: int) -> None:
    """SQLite, after revisions ran with foreign keys off: no row refers to nothing that
    did not before (`before`, from `dangling_references`).

    Raises:
        MigrationError: naming the first such rows, or how many there are.
    """
    if connection.dialect.name != "sqlite":
        return
    if not before:
        broken = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchmany(3)
        if broken:
            raise MigrationError(
                f"{where}: after the schema upgrade rows refer to no row of their table"
                f" ({', '.join(f'{row[0]} row {row[1]}' for row in broken)}); nothing"
                " was changed"
            )
        return
    after = dangling_references(connection)
    if after > before:
        raise MigrationError(
            f"{where}: after the schema upgrade {after} rows refer to no row of their table,"
            f" {before} before it; nothing was changed"
        )


def migrate(
    connection: Connection, *, version_table: str = VERSION_TABLE, where: str = "the database"
) -> None:
    """`upgrade_to_head` in a transaction of its own on `connection`, not yet begun.

    On SQLite the revisions run with foreign keys off, as SQLite asks of any change that
    rebuilds a table: a batch rebuild ends with a DROP TABLE, which with foreign keys
    on first deletes every row and so fires ON DELETE CASCADE. Found by attack: a store
    of revision 0001 with messages could not be upgraded (the cascade met the FTS
    triggers: "database table is locked"), and without those triggers lost every
    message. The pragma holds only outside a transaction; the revisions' result is
    checked with `foreign_key_check` before the commit. Found by attack: that check ran
    on every open, so a store at head holding messages of a session deleted in the
    sqlite3 shell (foreign keys off there) could no longer be opened or upgraded; it
    now runs only when revisions ran, and counts only rows they left dangling.

    Raises:
        MigrationError: as `upgrade_to_head`, or if the revisions left a message of no
            session (nothing is written then).
    """
    if connection.dialect.name != "sqlite":
        with connection.begin():
            check_server_encoding(connection, where)
            upgrade_to_head(connection, version_table=version_table, where=where)
        return
    # On the driver's connection: SQLAlchemy's would begin a transaction first.
    _set_foreign_keys(connection.connection, "OFF")
    try:
        with connection.begin():
            if prepare_upgrade(connection, version_table=version_table, where=where):
                before = dangling_references(connection)
                run_revisions(connection, version_table)
                check_references(connection, where, before)
    finally:
        if not connection.invalidated:
            _set_foreign_keys(connection.connection, "ON")


def _set_foreign_keys(driver_connection: Any, value: str) -> None:
    cursor = driver_connection.cursor()
    try:
        cursor.execute(f"PRAGMA foreign_keys={value}")
    finally:
        cursor.close()


def refuse_foreign_sqlite_file(
    target: str, *, version_table: str = VERSION_TABLE, where: str = "the database"
) -> None:
    """Refuses, reading only, a SQLite file (`target`, a `file:` URI) that holds another
    application's tables; blocking.

    Our connections set the file's journal mode when they open, a change that stays in
    the file: a file of another application is refused before that. An empty file, or
    one whose version table of ours holds a revision beside our first tables, passes at
    once (`upgrade_to_head` examines it then).

    Raises:
        MigrationError: the file holds tables of another application.
    """
    connection = sqlite3.connect(target, uri=True)
    try:
        names = {
            row[0]
            for row in connection.execute(
                "SELECT name FROM sqlite_master WHERE type IN ('table', 'view')"
                " AND name NOT LIKE 'sqlite!_%' ESCAPE '!'"
            )
        }
        # Found by attack: an empty version table passed, and the file was made WAL
        # before examine() refused it.
        versioned = version_table in names and connection.execute(
            f'SELECT EXISTS (SELECT 1 FROM "{version_table}")'  # noqa: S608
        ).fetchone() == (1,)
        # Found by attack: a version table of ours beside another application's tables
        # alone passed, then beside tables of our first tables' names with other
        # columns, and the file was made WAL before examine() refused it.
        ours = versioned and all(_has_columns(connection, mark) for mark in _FIRST_TABLES)
        if not names:
            _refuse_claimed(connection, where)
    finally:
        connection.close()
    if not names or ours:
        return
    examine_sqlite_file(target, version_table=version_table, where=where)


def _has_columns(connection: sqlite3.Connection, mark: Mark) -> bool:
    """Whether the table `mark` names is there with at least the columns it gives it."""
    found = {
        row[1] for row in connection.execute("SELECT * FROM pragma_table_info(?)", (mark.name,))
    }
    return mark.columns <= found


def examine_sqlite_file(
    target: str, *, version_table: str = VERSION_TABLE, where: str = "the database"
) -> SchemaState:
    """`examine` on a SQLite file opened read-only (`target`, a `file:` URI); blocking.
    A file without tables that another application has claimed is refused too
    (_refuse_claimed)."""
    with sqlite_file_read(target) as connection:
        state = examine(connection, version_table=version_table, where=where)
        refuse_if_claimed(connection, where)
        return state


@contextlib.contextmanager
def sqlite_file_read(target: str) -> Iterator[Connection]:
    """A connection to a SQLite file opened read-only (`target`, a `file:` URI)."""
    engine = create_engine(
        "sqlite://", creator=lambda: sqlite3.connect(target, uri=True), poolclass=NullPool
    )
    try:
        with engine.connect() as connection:
            yield connection
    finally:
        engine.dispose()


def refuse_if_claimed(connection: Connection, where: str) -> None:
    """_refuse_claimed, for a SQLite file without tables (an empty version table is a
    store of ours downgraded to base)."""
    if not _first_row(connection, _ANY_TABLE):
        _refuse_claimed(connection, where)


_ANY_TABLE = (
    "SELECT 1 FROM sqlite_master WHERE type IN ('table', 'view')"
    " AND name NOT LIKE 'sqlite!_%' ESCAPE '!' LIMIT 1"
)


def _first_row(connection: Connection | sqlite3.Connection, sql: str) -> Any:
    if isinstance(connection, sqlite3.Connection):
        return connection.execute(sql).fetchone()
    return connection.exec_driver_sql(sql).fetchone()


@functools.cache
def _sqlite_names_of_ours() -> frozenset[str]:
    """Every name the revisions give a SQLite store (tables, indexes, triggers), seen
    while they build a scratch store to head and read off it: once per process, where a
    database is refused. Found by attack: the names of tables a revision makes and drops
    or renames (`chat_messages_0005`, alembic's `_alembic_tmp_chat_sessions`) were not
    among those of a store at head, and the run failed on "already exists"."""
    from alembic import context as alembic_context

    created: set[str] = set()

    def note(action: int, name: str | None, *_: str | None) -> int:
        if action in _SQLITE_CREATIONS and name:
            created.add(name)
        return sqlite3.SQLITE_OK

    def connect() -> sqlite3.Connection:
        connection = sqlite3.connect(path)
        connection.set_authorizer(note)
        return connection

    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "head.db"
        engine = create_engine("sqlite://", creator=connect, poolclass=NullPool)
        # Inside alembic's own run (its env.py refusing a file), the scratch run's
        # environment replaces alembic's module proxy, and removes it when it ends.
        outer = getattr(alembic_context, "_proxy", None)
        try:
            with engine.connect() as connection, connection.begin():
                run_revisions(connection)
        finally:
            engine.dispose()
            if outer is not None:
                outer._install_proxy()
        with contextlib.closing(sqlite3.connect(path)) as scratch_store:
            created.update(
                row[0] for row in scratch_store.execute("SELECT name FROM sqlite_master")
            )
    # Not the version table: an empty one of ours beside another application's tables
    # (after `downgrade base`) is no clash.
    return frozenset(
        name for name in created if not name.startswith("sqlite_") and name != VERSION_TABLE
    )


# The authorizer's actions that create a named object (the name is their first argument).
_SQLITE_CREATIONS = {
    sqlite3.SQLITE_CREATE_INDEX,
    sqlite3.SQLITE_CREATE_TABLE,
    sqlite3.SQLITE_CREATE_TRIGGER,
    sqlite3.SQLITE_CREATE_VIEW,
    sqlite3.SQLITE_CREATE_VTABLE,
}


def _refuse_claimed(connection: Connection | sqlite3.Connection, where: str) -> None:
    """Refuses a SQLite file without tables of ours that another application has
    claimed, as SQLite's file format lets it: a non-zero `application_id` or
    `user_version` in its header (persistence sets neither). Found by attack: such a
    file, its application's tables not made yet, was taken for an empty database and
    given persistence's schema.

    Raises:
        MigrationError: naming the values.
    """
    claims = [
        f"{name} {value}"
        for name in ("application_id", "user_version")
        if (value := _first_row(connection, f"PRAGMA {name}")[0])
    ]
    if claims:
        raise ClaimedFileError(
            f"{where} holds no tables but is claimed by another application (its"
            f" {' and '.join(claims)}); persistence neither reads nor changes it: use a"
            " database of its own"
        )
