"""Alembic environment: runs the packaged revisions on the configured database.

The database is `-x url=...` when given, else the one the library's configuration
names (STORAGE_* variables, then the config file, then the default SQLite file),
read exactly as the library and the `persistence` CLI read it.
The revision is kept in persistence's own version table (`-x version_table=...` names
another), beside any other application's tables and `alembic_version`; a store whose
`alembic_version` holds one of our revisions is moved to it first.

The whole run is one transaction, on SQLite too (the library's engine, whose BEGIN
holds DDL, with foreign keys off as SQLite asks of table rebuilds): a run cut off or
failing half way leaves the database as it was. The commands that only read
(`current`, `history -i`, `check`) write nothing: a SQLite file is opened read-only
(`mode=ro`), a PostgreSQL transaction is READ ONLY, no lock is awaited, and the run is
rolled back. Offline mode (`--sql`) is refused:
the revisions read the database as they go. A refusal of the library is one line
(alembic's "FAILED: ..."), not a traceback.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from alembic.util import CommandError
from sqlalchemy import URL, Connection, inspect, pool
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from alembic import context
from persistence.errors import MigrationError, PersistenceError, StorageConnectionError
from persistence.sql.engines import (
    WRITE_OPTIONS,
    async_driver_url,
    check_sqlite_path,
    sqlite_engine,
    sqlite_reading_target,
    sqlite_url,
)
from persistence.sql.errors import sql_errors
from persistence.sql.revision_marks import schema_revision
from persistence.sql.revisions import version_heads
from persistence.sql.schema import (
    LEGACY_VERSION_TABLE,
    VERSION_TABLE,
    ForeignTablesError,
    SchemaState,
    adopt_legacy_version,
    check_references,
    dangling_references,
    examine,
    is_version_table,
    refuse_a_system_schema_first,
    refuse_if_claimed,
    refuse_without_version_table,
    sqlite_file_read,
    take_migration_lock,
)
from persistence.sql.tables import SEARCH_OBJECTS, Base

_VERSION_TABLE = context.get_x_argument(as_dictionary=True).get("version_table", VERSION_TABLE)
# What the alembic commands that only read the database (`current`, `history -i`,
# `history -r current:`, `show current`, `edit current`, `check`, `revision
# --autogenerate`) give the environment to run. Found by attack: `current` created a
# SQLite file that did not exist and moved an older store's version table.
_READING = {
    "display_version",
    "show_current",
    "edit_current",
    "_display_current_history",
    "retrieve_migrations",
}


def _command() -> str:
    """The running command's function (upgrade, downgrade, do_stamp, display_version,
    ...): alembic keeps it only in the options of the environment it runs."""
    options = getattr(getattr(context, "_proxy", None), "context_opts", {})
    return getattr(options.get("fn"), "__name__", "")


def _only_reads() -> bool:
    return _command() in _READING


# The writing commands that need a store of ours (its version table) to work on.
_ON_A_STORE = {"downgrade": "downgrade", "do_stamp": "stamp"}


# Seconds a run waits for another writer of a SQLite file.
_BUSY_TIMEOUT = 5.0


def _configured_url(*, opening: bool) -> tuple[URL, str]:
    """The database's URL, read as the library and the CLI read it, and the database as
    messages name it (the SQLite file, or the URL as given, password masked: found by
    attack, the driver's URL showed `options=` as `dsn=postgresql%3A...`); with
    `opening`, a SQLite path is checked as the library checks it before opening it."""
    from persistence.config import config_from_url, load_config, sql_url

    explicit = context.get_x_argument(as_dictionary=True).get("url")
    # -x url= reads as the CLI's --url (no percent-decoding, `~` expanded); an empty one
    # is refused, not taken for the configured store.
    config = config_from_url(explicit) if explicit is not None else load_config()
    if config.backend != "sqlite":
        return async_driver_url(sql_url(config)), config.display_url
    if opening:
        # Found by attack: `downgrade base` and `stamp base` made a database at a path
        # mistyped.
        exists = check_sqlite_path(
            config.database_path, must_exist=_only_reads() or _command() in _ON_A_STORE
        )
        if not exists:
            _create_parents(config.database_path)
    # The path as it is: a `sqlite:///` string of it would be cut at `?` and decoded.
    return sqlite_url(config.database_path), str(config.database_path)


def _create_parents(path: Path) -> None:
    """Creates the directories of a new SQLite file, as the library does. Found by
    attack: `alembic upgrade head` failed on a path `persistence upgrade` created
    ("unable to open database file")."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StorageConnectionError(
            f"cannot create {path}: {exc.strerror or type(exc).__name__} ({exc.filename})"
        ) from None


def _include_object(
    obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any
) -> bool:
    # Full-text search objects are dialect-specific DDL that the ORM does not declare.
    return not (name or "").startswith(tuple(SEARCH_OBJECTS))


def _adopt_legacy_version(connection: Connection, where: str) -> None:
    state = _examine(connection, where)
    if state is not None and state.legacy:
        adopt_legacy_version(connection, _VERSION_TABLE)


def _examine(connection: Connection, where: str) -> SchemaState | None:
    """examine(), with the refusals the running command may go past (None then)."""
    try:
        state = examine(connection, version_table=_VERSION_TABLE, where=where)
    except MigrationError as refusal:
        if _goes_past(connection, refusal):
            return None
        raise
    if connection.dialect.name == "sqlite":
        refuse_if_claimed(connection, where)
    verb = _ON_A_STORE.get(_command())
    if verb and not state.heads:
        refuse_without_version_table(
            connection, _VERSION_TABLE, where, doing=verb, create_with="`alembic upgrade head`"
        )
    return state


def _goes_past(connection: Connection, refusal: MigrationError) -> bool:
    """Whether the running command may go past examine()'s `refusal`.

    An upgrade, only another application's tables, none of a name of ours: ours are made
    beside them. Found by attack: beside another application's table of our name the
    upgrade failed on a raw "already exists" (after rolling back a SQLite file's hot
    journal), and tables of ours with an empty, missing or wrong version row were
    migrated from base or from the wrong revision.

    A stamp, tables of ours or a version row of ours that does not tell the truth: the
    refusals say to stamp them. Found by attack: a stamp wrote our version table into
    another application's database, which initialize() then took for ours; so did an
    empty one of ours beside another application's tables (what `downgrade base`
    leaves there).

    A downgrade, only our empty version table alone (after `downgrade base`). Found by
    attack: `downgrade base` wrote our version table into another application's
    database.
    """
    command = _command()
    if command == "upgrade":
        return isinstance(refusal, ForeignTablesError)
    ours = schema_revision(connection) is not None
    versioned = is_version_table(inspect(connection), _VERSION_TABLE)
    revised = versioned and bool(version_heads(connection, _VERSION_TABLE))
    if command == "do_stamp":
        return ours or revised
    return versioned and not ours and not revised


def _read_version_table(connection: Connection, where: str) -> str:
    """The version table a reading command reports: ours, or the `alembic_version` a
    store made before ours had its own name keeps its revision in (reported as such,
    never moved: that is the next upgrade's work)."""
    try:
        state = examine(connection, version_table=_VERSION_TABLE, where=where)
    except MigrationError:
        inspector = inspect(connection)
        held = _VERSION_TABLE in {*inspector.get_table_names(), *inspector.get_view_names()}
        if held and not is_version_table(inspector, _VERSION_TABLE):
            raise  # another application's table or view of its name
        return _VERSION_TABLE
    if not state.legacy:
        return _VERSION_TABLE
    context.config.print_stdout(
        f"{where}: the revision is in {LEGACY_VERSION_TABLE}, where persistence kept it"
        f" before {_VERSION_TABLE}; the next `alembic upgrade head` moves it"
    )
    return LEGACY_VERSION_TABLE


def _run(connection: Connection, where: str) -> None:
    reading = _only_reads()
    transaction = connection.begin()
    try:
        if reading:
            # Found by attack: `current` and `check` committed their transaction; a read
            # now runs read-only and is rolled back (a SQLite file is opened `mode=ro`).
            if connection.dialect.name == "postgresql":
                connection.exec_driver_sql("SET TRANSACTION READ ONLY")
            version_table = _read_version_table(connection, where)
        else:
            take_migration_lock(connection)
            if _command() != "upgrade":
                # An upgrade's examine() refuses it where the upgrade makes anything.
                refuse_a_system_schema_first(connection, where)
            _adopt_legacy_version(connection, where)
            version_table = _VERSION_TABLE
        before = 0 if reading else dangling_references(connection)
        context.configure(
            connection=connection,
            target_metadata=Base.metadata,
            render_as_batch=connection.dialect.name == "sqlite",
            include_object=_include_object,
            compare_type=True,
            version_table=version_table,
            # `alembic check` would create a missing version table (alembic's
            # `current` and `history` pass this themselves).
            dont_mutate=reading,
        )
        # Inside the transaction begun above: alembic begins none of its own.
        with context.begin_transaction():
            context.run_migrations()
        if reading:
            transaction.rollback()
            return
        check_references(connection, where, before)
    except BaseException:
        transaction.rollback()
        raise
    transaction.commit()


def _engine(url: URL) -> AsyncEngine:
    if url.get_backend_name() != "sqlite":
        return create_async_engine(url, poolclass=pool.NullPool)
    # Found by attack: through a plain engine each DDL statement committed on its own
    # (Python's sqlite3 begins no transaction before DDL), so a run killed half way
    # left a store neither alembic nor initialize() could upgrade, and a failed run
    # left tables beside another application's. Foreign keys are off, as initialize()
    # runs the revisions (schema.migrate). The journal mode of a file that holds
    # something is left as the file has it; a new file is made WAL, as the library makes
    # it. Found by attack: left in rollback mode, a storage opened while the run held the
    # file failed at once (SQLite answers a change of journal mode with "busy" without
    # waiting), where it waits for any writer of a WAL file.
    pragmas: dict[str, Any] = {"foreign_keys": "OFF", "busy_timeout": int(_BUSY_TIMEOUT * 1000)}
    path = Path(url.database or "")
    if _only_reads():
        # Found by attack: `current` made a 0-byte file a WAL database of 4,096 bytes.
        target = sqlite_reading_target(path)
        return sqlite_engine(url, pragmas, _BUSY_TIMEOUT, target=target, uri=True)
    if _command() == "upgrade" and (not path.exists() or path.stat().st_size == 0):
        pragmas = {"journal_mode": "WAL", **pragmas}
    else:
        _refuse_what_alembic_cannot_migrate(path)
    return sqlite_engine(url, pragmas, _BUSY_TIMEOUT).execution_options(**WRITE_OPTIONS)


def _refuse_what_alembic_cannot_migrate(path: Path) -> None:
    """Examines a SQLite file reading only, before a connection that may write opens it,
    and refuses it as the run would refuse it on that connection (_examine). Found by
    attack: beside another application's `chat_sessions` an upgrade failed on "table
    chat_sessions already exists" after its connection had rolled back the file's hot
    journal (434 KB made 8 KB, its -journal gone); `stamp` and `downgrade` opened
    another application's file to write first.
    """
    with sql_errors(f"open {path}"), sqlite_file_read(sqlite_reading_target(path)) as connection:
        _examine(connection, str(path))


async def _run_online() -> None:
    url, where = _configured_url(opening=True)
    engine = _engine(url)
    action = "read the schema revision" if _only_reads() else "migrate the schema"
    try:
        with sql_errors(f"{where}: {action}"):
            async with engine.connect() as connection:
                await connection.run_sync(_run, where)
    finally:
        await engine.dispose()


try:
    if context.is_offline_mode():
        raise CommandError(
            "offline mode (--sql) is not supported: the revisions read the database as"
            " they go (batch rebuilds on SQLite, backfills); run them on the database"
        )
    asyncio.run(_run_online())
except PersistenceError as exc:
    raise CommandError(str(exc)) from exc
