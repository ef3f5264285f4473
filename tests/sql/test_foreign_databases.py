"""A database that is not a persistence store is refused, never altered; reads never write."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from persistence import (
    ChatSession,
    MigrationError,
    PersistenceError,
    PostgreSQLSessionStorage,
    SchemaVersionError,
    SQLiteSessionStorage,
)
from persistence.sql.engines import async_driver_url
from persistence.sql.schema import LEGACY_VERSION_TABLE, VERSION_TABLE, script_directory
from tests import servers
from tests.directories import unwritable

ROOT = Path(__file__).resolve().parents[2]
HEAD = script_directory().get_current_head()


def _storage(url: str) -> SQLiteSessionStorage | PostgreSQLSessionStorage:
    if url.startswith("sqlite"):
        return SQLiteSessionStorage(url.removeprefix("sqlite:///"))
    return PostgreSQLSessionStorage(url, min_pool_size=1, max_pool_size=2)


async def _execute(url: str, *statements: str) -> list[list[tuple[object, ...]]]:
    engine = create_async_engine(async_driver_url(url))
    results = []
    try:
        async with engine.begin() as connection:
            for statement in statements:
                result = await connection.execute(text(statement))
                results.append([tuple(row) for row in result] if result.returns_rows else [])
    finally:
        await engine.dispose()
    return results


async def _tables(url: str) -> dict[str, list[tuple[object, ...]]]:
    """Every table and its rows: what an application would see of the database."""
    listing = (
        "SELECT name FROM sqlite_master WHERE type IN ('table', 'view', 'index', 'trigger')"
        if url.startswith("sqlite")
        else "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
    )
    (names,) = await _execute(url, listing)
    contents = {}
    for (name,) in sorted(names):  # type: ignore[type-var]
        if url.startswith("sqlite") and str(name).startswith("sqlite_autoindex"):
            contents[str(name)] = []
            continue
        try:
            (rows,) = await _execute(url, f'SELECT * FROM "{name}"')
        except Exception:
            rows = []  # an index or trigger
        contents[str(name)] = sorted(rows, key=repr)
    return contents


def alembic(url: str, *args: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "alembic", "-x", f"url={url}", *args],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )


async def _other_application(url: str, *, its_alembic: str | None) -> None:
    statements = ["CREATE TABLE orders (id INTEGER PRIMARY KEY, item TEXT)"]
    statements.append("INSERT INTO orders VALUES (1, 'tea')")
    if its_alembic:
        statements.append("CREATE TABLE alembic_version (version_num VARCHAR(32) PRIMARY KEY)")
        statements.append(f"INSERT INTO alembic_version VALUES ('{its_alembic}')")
    await _execute(url, *statements)


def _file_bytes(url: str) -> bytes | None:
    """A SQLite file's bytes (its journal mode is in its header), None on PostgreSQL."""
    return Path(url.removeprefix("sqlite:///")).read_bytes() if url.startswith("sqlite") else None


# Another application's alembic_version may hold an id of ours: 0002 is a common one.
@pytest.mark.parametrize(
    "its_alembic", [None, "abc123def", "0002"], ids=["tables", "alembic_version", "our_ids"]
)
async def test_another_applications_database_is_refused_and_left_as_it_was(
    fresh_url: str, its_alembic: str | None
) -> None:
    await _other_application(fresh_url, its_alembic=its_alembic)
    before = await _tables(fresh_url)
    file_before = _file_bytes(fresh_url)

    for opening in ("initialize", "open_for_reading"):
        storage = _storage(fresh_url)
        with pytest.raises(MigrationError, match="another application") as caught:
            await getattr(storage, opening)()
        await storage.close()
        assert not isinstance(caught.value, SchemaVersionError)
        assert "newer version" not in str(caught.value)
        if its_alembic:
            assert its_alembic in str(caught.value)

    assert await _tables(fresh_url) == before
    assert _file_bytes(fresh_url) == file_before  # not even its journal mode


async def test_persistence_shares_a_database_with_an_alembic_application(fresh_url: str) -> None:
    await _other_application(fresh_url, its_alembic="abc123def")
    alembic(fresh_url, "upgrade", "head")

    async with _storage(fresh_url) as storage:
        session = ChatSession.create("m")
        session.add_message("user", "hi")
        await storage.save_session(session)
    reader = _storage(fresh_url)
    await reader.open_for_reading()
    try:
        assert (await reader.count()).messages == 1
    finally:
        await reader.close()

    alembic_rows, version_rows, orders = await _execute(
        fresh_url,
        f"SELECT version_num FROM {LEGACY_VERSION_TABLE}",
        f"SELECT version_num FROM {VERSION_TABLE}",
        "SELECT * FROM orders",
    )
    assert alembic_rows == [("abc123def",)]
    assert version_rows == [(HEAD,)]
    assert orders == [(1, "tea")]


_WRITING_COMMANDS = [("upgrade", "head"), ("downgrade", "base"), ("stamp", "head")]


def _alembic_failure(url: str, command: tuple[str, ...] = ("upgrade", "head")) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "alembic", "-x", f"url={url}", *command],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
    return done.stdout.strip().splitlines()[-1]


async def test_another_applications_table_of_our_name_is_refused_by_alembic_too(
    fresh_url: str,
) -> None:
    """Found by attack: the refusal of another application's `chat_sessions` said to
    create persistence's tables beside it with alembic, which then failed on "table
    chat_sessions already exists" (a raw driver error)."""
    await _execute(
        fresh_url,
        "CREATE TABLE chat_sessions (id INTEGER PRIMARY KEY, title TEXT)",
        "INSERT INTO chat_sessions VALUES (1, 'theirs')",
    )
    before = await _tables(fresh_url)
    file_before = _file_bytes(fresh_url)
    storage = _storage(fresh_url)
    with pytest.raises(MigrationError, match="another application") as caught:
        await storage.initialize()
    await storage.close()
    said = str(caught.value)
    assert "alembic -x" not in said
    assert "tables, indexes, triggers or functions are named chat_sessions too" in said
    assert _alembic_failure(fresh_url) == f"FAILED: {said}"
    assert await _tables(fresh_url) == before
    assert _file_bytes(fresh_url) == file_before


@pytest.mark.parametrize("command", _WRITING_COMMANDS[1:], ids=" ".join)
async def test_alembic_downgrade_and_stamp_refuse_another_applications_database(
    fresh_url: str, command: tuple[str, str]
) -> None:
    """Found by attack: `alembic downgrade base` wrote persistence's version table into
    another application's database, after which `alembic stamp head` passed and
    initialize() took the database for a store of ours."""
    await _other_application(fresh_url, its_alembic=None)
    before = await _tables(fresh_url)
    file_before = _file_bytes(fresh_url)
    said = _alembic_failure(fresh_url, command)
    assert said.startswith("FAILED: ") and "holds tables of another application" in said, said
    assert await _tables(fresh_url) == before
    assert _file_bytes(fresh_url) == file_before


@pytest.mark.sqlite
@pytest.mark.parametrize("command", _WRITING_COMMANDS, ids=" ".join)
def test_alembic_leaves_another_applications_hot_journal_alone(
    tmp_path: Path, command: tuple[str, str]
) -> None:
    """Found by attack: `alembic upgrade head` opened another application's file (its
    own `chat_sessions`, a writer stopped mid-transaction) to write, so SQLite rolled
    its -journal back (the file rewritten, the journal gone) before the run failed;
    later `downgrade` and `stamp` did the same. Now it is examined reading only first,
    as initialize() examines it."""
    import shutil
    import sqlite3

    live = tmp_path / "live.db"
    writer = sqlite3.connect(live, isolation_level=None)
    writer.execute("CREATE TABLE chat_sessions (id INTEGER PRIMARY KEY, body TEXT)")
    writer.execute("BEGIN")
    writer.execute("INSERT INTO chat_sessions (body) VALUES (randomblob(200000))")
    writer.execute("PRAGMA cache_size = 1")  # spill: the journal holds the pages now
    writer.execute("INSERT INTO chat_sessions (body) VALUES (randomblob(200000))")
    # A copy of the file and its journal mid-transaction: a writer stopped there.
    other = tmp_path / "other.db"
    shutil.copy(live, other)
    shutil.copy(f"{live}-journal", f"{other}-journal")
    writer.execute("ROLLBACK")
    writer.close()
    before = other.read_bytes(), Path(f"{other}-journal").read_bytes()
    said = _alembic_failure(f"sqlite:///{other}", command)
    assert said.startswith(f"FAILED: open {other} failed: the file's -journal holds"), said
    assert (other.read_bytes(), Path(f"{other}-journal").read_bytes()) == before


@pytest.mark.sqlite
@pytest.mark.parametrize("claim", ["application_id = 1234", "user_version = 7"])
async def test_a_sqlite_file_another_application_claimed_is_refused(
    tmp_path: Path, claim: str
) -> None:
    """Found by attack: a file without tables whose header another application had
    claimed (SQLite's `application_id`, `user_version`) was taken for an empty database
    and given persistence's schema, by initialize() and alembic alike."""
    import sqlite3

    path = tmp_path / "claimed.db"
    with sqlite3.connect(path) as connection:
        connection.execute(f"PRAGMA {claim}")
    before = path.read_bytes()
    storage = SQLiteSessionStorage(path)
    with pytest.raises(MigrationError, match="claimed by another application") as caught:
        await storage.initialize()
    await storage.close()
    assert claim.replace(" = ", " ") in str(caught.value)
    for command in _WRITING_COMMANDS:
        # Found by attack: `stamp` and `downgrade` wrote our version table into it.
        said = _alembic_failure(f"sqlite:///{path}", command)
        assert "claimed by another application" in said, (command, said)
    for revision in ("head", "base"):
        # Found by attack: `persistence stamp head` named missing tables, not the claim.
        with pytest.raises(MigrationError, match="claimed by another application"):
            await SQLiteSessionStorage(path).stamp_schema(revision)
    assert path.read_bytes() == before


@pytest.mark.sqlite
@pytest.mark.parametrize(
    "theirs",
    [
        "CREATE UNIQUE INDEX ix_chat_messages_pending ON orders (item)",
        "CREATE INDEX ix_chat_sessions_updated ON orders (item)",
        "CREATE TRIGGER chat_session_counts_insert AFTER INSERT ON orders BEGIN SELECT 1; END",
        # Found by attack: tables a revision makes and drops or renames.
        "CREATE TABLE chat_messages_0005 (id INTEGER)",
        "CREATE TABLE _alembic_tmp_chat_sessions (id INTEGER)",
    ],
    ids=["unique_index", "index", "trigger", "rebuilt_table", "batch_table"],
)
async def test_another_applications_index_or_trigger_of_our_name_is_refused(
    tmp_path: Path, theirs: str
) -> None:
    """Found by attack: beside another application's UNIQUE index named
    `ix_chat_messages_pending`, the refusal advised `alembic upgrade head`, which
    dropped that index (revision 0005 drops and makes it again) and exited 0; an index
    or trigger of another of our names ended the run in a raw "already exists"."""
    import sqlite3

    path = tmp_path / "theirs.db"
    with contextlib.closing(sqlite3.connect(path)) as connection:
        connection.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY, item TEXT)")
        connection.execute(theirs)
        connection.commit()
    before = path.read_bytes()
    storage = SQLiteSessionStorage(path)
    with pytest.raises(MigrationError, match="triggers or functions are named") as caught:
        await storage.initialize()
    await storage.close()
    assert "alembic -x" not in str(caught.value)
    assert _alembic_failure(f"sqlite:///{path}") == f"FAILED: {caught.value}"
    assert path.read_bytes() == before


@pytest.mark.sqlite
async def test_a_claimed_empty_file_is_named_so_by_reads_and_a_store_at_base_is_not(
    tmp_path: Path,
) -> None:
    """Found by attack: `stats` on a claimed empty file said to run `persistence
    upgrade`, which refused it; and a store of ours downgraded to base (its version table
    alone) whose user_version a tool had set was refused as holding no tables."""
    import sqlite3

    claimed = tmp_path / "claimed.db"
    with contextlib.closing(sqlite3.connect(claimed)) as connection:
        connection.execute("PRAGMA user_version = 7")
    reader = SQLiteSessionStorage(claimed)
    with pytest.raises(MigrationError, match="claimed by another application"):
        await reader.open_for_reading()
    await reader.close()

    base = tmp_path / "base.db"
    await asyncio.to_thread(alembic, f"sqlite:///{base}", "upgrade", "head")
    await asyncio.to_thread(alembic, f"sqlite:///{base}", "downgrade", "base")
    with contextlib.closing(sqlite3.connect(base)) as connection:
        connection.execute("PRAGMA user_version = 3")
    async with SQLiteSessionStorage(base) as storage:
        assert (await storage.count()).total_sessions == 0


async def test_reading_an_empty_database_creates_nothing(fresh_url: str) -> None:
    if fresh_url.startswith("sqlite"):
        await _execute(fresh_url, "PRAGMA user_version = 0")  # an empty file that exists
    before = await _tables(fresh_url)
    storage = _storage(fresh_url)

    with pytest.raises(MigrationError, match=r"has no persistence schema.*persistence upgrade"):
        await storage.open_for_reading()
    await storage.close()

    assert await _tables(fresh_url) == before == {}


async def test_reading_an_older_store_asks_for_an_upgrade_and_changes_nothing(
    fresh_url: str,
) -> None:
    alembic(fresh_url, "upgrade", "0002")
    before = await _tables(fresh_url)
    storage = _storage(fresh_url)

    with pytest.raises(MigrationError, match=r"revision 0002.*persistence upgrade"):
        await storage.open_for_reading()
    await storage.close()

    assert await _tables(fresh_url) == before


async def test_reading_a_newer_store_raises_schema_version_error(fresh_url: str) -> None:
    async with _storage(fresh_url):
        pass
    await _execute(fresh_url, f"UPDATE {VERSION_TABLE} SET version_num = '0099'")
    storage = _storage(fresh_url)

    with pytest.raises(SchemaVersionError, match=r"0099.*newer version"):
        await storage.open_for_reading()
    await storage.close()


async def test_a_storage_opened_for_reading_refuses_writes(fresh_url: str) -> None:
    async with _storage(fresh_url):
        pass
    storage = _storage(fresh_url)
    await storage.open_for_reading()
    try:
        with pytest.raises(PersistenceError, match="opened for reading"):
            await storage.save_session(ChatSession.create("m"))
        with pytest.raises(PersistenceError, match="opened for reading"):
            storage.unit_of_work()
        with pytest.raises(PersistenceError, match="opened for reading"):
            await storage.initialize()
    finally:
        await storage.close()
    async with _storage(fresh_url) as storage:
        assert (await storage.count()).total_sessions == 0


@pytest.mark.parametrize("revision", ["0002", HEAD])
async def test_a_store_versioned_in_alembic_version_is_ours_and_moved_over(
    fresh_url: str, revision: str
) -> None:
    # Stores made before persistence had its own version table kept it in alembic's.
    alembic(fresh_url, "-x", f"version_table={LEGACY_VERSION_TABLE}", "upgrade", revision)

    async with _storage(fresh_url) as storage:
        session = ChatSession.create("m")
        session.add_message("user", "hello")
        await storage.save_session(session)
        assert [m.content for m in await storage.search_messages("hello")] == ["hello"]

    (versions,) = await _execute(fresh_url, f"SELECT version_num FROM {VERSION_TABLE}")
    assert versions == [(HEAD,)]
    assert LEGACY_VERSION_TABLE not in await _tables(fresh_url)


@pytest.mark.parametrize("revision", ["0002", "0007", HEAD])
async def test_another_apps_tables_of_our_names_with_our_revision_ids_are_refused(
    fresh_url: str, revision: str
) -> None:
    """Found by attack: another chat application's chat_sessions, chat_messages and
    uploaded_files (its own columns), with its alembic_version at a short id of ours,
    were taken for a store of ours and migrated (its alembic_version dropped)."""
    await _execute(
        fresh_url,
        "CREATE TABLE chat_sessions (id INTEGER PRIMARY KEY, title TEXT)",
        "CREATE TABLE chat_messages (id INTEGER PRIMARY KEY, chat_id INTEGER, body TEXT)",
        "CREATE TABLE uploaded_files (id INTEGER PRIMARY KEY, path TEXT)",
        "INSERT INTO chat_sessions VALUES (1, 'their chat')",
        f"CREATE TABLE {LEGACY_VERSION_TABLE} (version_num VARCHAR(32) PRIMARY KEY)",
        f"INSERT INTO {LEGACY_VERSION_TABLE} VALUES ('{revision}')",
    )
    before = await _tables(fresh_url)
    journal = _sqlite_header(fresh_url)

    with pytest.raises(MigrationError, match="another application"):
        await _storage(fresh_url).initialize()

    assert await _tables(fresh_url) == before
    assert _sqlite_header(fresh_url) == journal


@pytest.fixture
def empty_postgresql_url(postgresql_admin_url: str) -> Iterator[str]:
    with servers.throwaway_postgresql_database(postgresql_admin_url) as url:
        yield url


async def test_a_postgresql_database_holding_only_a_materialized_view_is_refused(
    empty_postgresql_url: str,
) -> None:
    url = empty_postgresql_url
    await _execute(url, "CREATE MATERIALIZED VIEW their_report AS SELECT 1 AS answer")

    with pytest.raises(MigrationError, match="their_report"):
        await _storage(url).initialize()

    (tables,) = await _execute(url, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    assert tables == []


async def test_a_postgresql_database_holding_only_a_foreign_table_is_refused(
    empty_postgresql_url: str,
) -> None:
    """Found by attack: another application's foreign table (file_fdw, postgres_fdw) was
    not among the tables looked at, and the store's tables were created beside it."""
    url = empty_postgresql_url
    await _execute(
        url,
        "CREATE FOREIGN DATA WRAPPER their_wrapper",
        "CREATE SERVER their_server FOREIGN DATA WRAPPER their_wrapper",
        "CREATE FOREIGN TABLE their_orders (id integer) SERVER their_server",
    )

    with pytest.raises(MigrationError, match="their_orders"):
        await _storage(url).initialize()

    (tables,) = await _execute(url, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    assert tables == []


async def test_a_postgresql_database_holding_its_tables_in_another_schema_is_refused(
    empty_postgresql_url: str,
) -> None:
    """Found by attack: a database holding its tables in a schema of its own (and a
    sequence of its own in `public`) looked empty, and the store's tables were created
    in its `public`. A store of ours in another schema still allows a second one, and
    `alembic upgrade head` still creates the tables beside them when asked."""
    url = empty_postgresql_url
    await _execute(url, "CREATE SEQUENCE public.their_counter")
    with pytest.raises(MigrationError, match="their_counter"):
        await _storage(url).initialize()
    await _execute(
        url,
        "DROP SEQUENCE public.their_counter",
        "CREATE SCHEMA billing",
        "CREATE TABLE billing.invoices (id serial PRIMARY KEY)",
    )
    with pytest.raises(MigrationError, match=r"in other schemas \(billing\.invoices\)"):
        await _storage(url).initialize()
    (tables,) = await _execute(url, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    assert tables == []

    # Another schema holding a store of ours: a second store, in its own schema.
    await _execute(url, "CREATE SCHEMA first_store", "CREATE SCHEMA second_store")
    separator = "&" if "?" in url else "?"
    first = f"{url}{separator}options=-c%20search_path%3Dfirst_store"
    second = f"{url}{separator}options=-c%20search_path%3Dsecond_store"
    await asyncio.to_thread(alembic, first, "upgrade", "head")
    async with PostgreSQLSessionStorage(second) as storage:
        assert (await storage.count()).total_sessions == 0
    (tables,) = await _execute(
        url, "SELECT count(*) FROM pg_tables WHERE schemaname = 'second_store'"
    )
    assert tables[0][0] > 0


async def test_a_search_path_naming_no_schema_that_exists_is_refused_by_name(
    empty_postgresql_url: str,
) -> None:
    """Found by attack: a search_path naming a schema not made yet (or mistyped) failed
    in the middle of the first revision, with the server's "no schema has been selected
    to create in". Every command now names the search_path; once the schema exists the
    same URL makes the store there."""
    url = empty_postgresql_url
    separator = "&" if "?" in url else "?"
    unmade = f"{url}{separator}options=-c%20search_path%3Dnot_made_yet"
    expected = r"search_path \(not_made_yet\) names no schema that exists"

    with pytest.raises(MigrationError, match=expected):
        await _storage(unmade).initialize()
    said = await asyncio.to_thread(_alembic_failure, unmade)
    assert "not_made_yet) names no schema that exists" in said, said
    with pytest.raises(MigrationError, match=expected):
        await _storage(unmade).stamp_schema("head")
    (relations,) = await _execute(url, "SELECT count(*) FROM pg_class WHERE relname LIKE 'chat%'")
    assert relations == [(0,)]

    await _execute(url, "CREATE SCHEMA not_made_yet")
    async with _storage(unmade) as storage:
        await storage.save_session(ChatSession.create(model="m"))
    (tables,) = await _execute(
        url, "SELECT count(*) FROM pg_tables WHERE schemaname = 'not_made_yet'"
    )
    assert tables[0][0] > 0


@pytest.mark.parametrize("first", ["pg_temp", "pg_catalog", "information_schema"])
async def test_a_search_path_putting_a_system_schema_first_is_refused_by_name(
    empty_postgresql_url: str, first: str
) -> None:
    """Found by attack: with `search_path=pg_temp` revision 0001 made the tables in the
    connection's temporary schema, then failed on a function it could not find."""
    url = empty_postgresql_url
    separator = "&" if "?" in url else "?"
    system = f"{url}{separator}options=-c%20search_path%3D{first}"

    with pytest.raises(MigrationError, match=rf"search_path \({first}\) puts .* first"):
        await _storage(system).initialize()
    (relations,) = await _execute(url, "SELECT count(*) FROM pg_class WHERE relname LIKE 'chat%'")
    assert relations == [(0,)]


@pytest.mark.parametrize("first", ["pg_temp", "pg_catalog", "information_schema"])
async def test_a_store_the_search_path_finds_after_a_system_schema_opens(
    empty_postgresql_url: str, first: str
) -> None:
    """Found by attack: refusing a search_path that puts a system schema first refused
    existing stores too (`pg_catalog, public` is a known hardening); only a store that
    would be made there is refused."""
    url = empty_postgresql_url
    async with _storage(url) as storage:
        await storage.save_session(ChatSession.create(model="m", session_id="kept"))
    separator = "&" if "?" in url else "?"
    hardened = f"{url}{separator}options=-c%20search_path%3D{first}%2Cpublic"

    async with _storage(hardened) as storage:
        assert [session.session_id for session in await storage.list_sessions()] == ["kept"]
    reader = _storage(hardened)
    await reader.open_for_reading()
    try:
        assert await reader.load_session("kept") is not None
    finally:
        await reader.close()


@pytest.mark.parametrize("first", ["pg_temp", "information_schema"])
async def test_no_downgrade_or_stamp_writes_through_a_system_schema_first(
    empty_postgresql_url: str, first: str
) -> None:
    """Found by attack: through `information_schema, public` a downgrade made its
    functions there (the store's triggers then called the old ones and failed), and
    `persistence stamp` and `alembic stamp` made the version table there (through
    `pg_temp, public`, in the temporary schema: nothing was recorded). Both refuse."""
    url = empty_postgresql_url
    async with _storage(url):
        pass
    separator = "&" if "?" in url else "?"
    hardened = f"{url}{separator}options=-c%20search_path%3D{first}%2Cpublic"
    expected = f"puts {first if first != 'pg_temp' else 'pg_temp_'}"

    for command in (("downgrade", "0012"), ("stamp", "0014")):
        said = await asyncio.to_thread(_alembic_failure, hardened, command)
        assert expected in said, (command, said)
    with pytest.raises(MigrationError, match=expected):
        await _storage(hardened).stamp_schema("0014")
    (version,) = await _execute(url, f"SELECT version_num FROM {VERSION_TABLE}")
    assert version == [(HEAD,)]
    (outside,) = await _execute(
        url,
        "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname <> 'public' AND c.relname LIKE 'persistence%'",
    )
    assert outside == [(0,)]


async def test_an_older_store_is_not_upgraded_into_a_system_schema(
    empty_postgresql_url: str,
) -> None:
    """An upgrade makes tables where the search_path puts them first: an older store
    reached through `pg_catalog, public` is refused, left at its revision."""
    url = empty_postgresql_url
    await asyncio.to_thread(alembic, url, "upgrade", "0014")
    separator = "&" if "?" in url else "?"
    hardened = f"{url}{separator}options=-c%20search_path%3Dpg_catalog%2Cpublic"

    with pytest.raises(MigrationError, match=r"puts pg_catalog first"):
        await _storage(hardened).initialize()
    said = await asyncio.to_thread(_alembic_failure, hardened)
    assert "puts pg_catalog first" in said, said
    (version,) = await _execute(url, f"SELECT version_num FROM {VERSION_TABLE}")
    assert version == [("0014",)]
    async with _storage(url) as storage:
        assert await storage.count() is not None


async def test_other_schemas_are_judged_by_what_they_hold(empty_postgresql_url: str) -> None:
    """Found by attack on the refusal above: an extension's views in the store's schema
    made a fresh database another application's; a store of ours in another schema that
    keeps its revision in `alembic_version` was taken for another application's; another
    session's temporary table of our version table's name passed for a store of ours;
    and the refusal miscounted what it did not show."""
    import asyncpg

    url = empty_postgresql_url
    plain = url.replace("postgresql+asyncpg://", "postgresql://", 1)
    separator = "&" if "?" in url else "?"
    (available,) = await _execute(
        url, "SELECT count(*) FROM pg_available_extensions WHERE name = 'pg_stat_statements'"
    )
    if available[0][0]:
        await _execute(url, "CREATE EXTENSION pg_stat_statements")
        async with _storage(url) as storage:  # its views in `public` are the extension's
            assert (await storage.count()).total_sessions == 0
        await _execute(url, "DROP SCHEMA public CASCADE", "CREATE SCHEMA public")

    await _execute(
        url, "CREATE SCHEMA app", *(f"CREATE TABLE app.t{i:02} (id int)" for i in range(20))
    )
    other = await asyncpg.connect(plain)
    try:
        await other.execute("CREATE TEMP TABLE persistence_alembic_version (x int)")
        with pytest.raises(MigrationError, match=r"\(app\.t00, .*app\.t04 and 15 more\)"):
            await _storage(url).initialize()
    finally:
        await other.close()

    # The legacy store's own tables are the other schema's relations there.
    await _execute(url, "DROP SCHEMA app CASCADE", "CREATE SCHEMA legacy", "CREATE SCHEMA second")
    async with _storage(f"{url}{separator}options=-c%20search_path%3Dlegacy"):
        pass
    await _execute(
        url,
        "ALTER TABLE legacy.persistence_alembic_version RENAME TO alembic_version",
        "ALTER TABLE legacy.alembic_version"
        " RENAME CONSTRAINT persistence_alembic_version_pkc TO alembic_version_pkc",
    )
    # A store from before the version table had its own name counts once opened, which
    # moves its revision over (found by attack: counting `alembic_version` beside a
    # `chat_sessions` table let another chat application's schema pass for ours).
    second_url = f"{url}{separator}options=-c%20search_path%3Dsecond"
    with pytest.raises(MigrationError, match=r"legacy\.alembic_version"):
        await _storage(second_url).initialize()
    async with _storage(f"{url}{separator}options=-c%20search_path%3Dlegacy"):
        pass
    async with _storage(second_url) as second:
        assert (await second.count()).total_sessions == 0
    await _execute(
        url,
        "CREATE SCHEMA chatapp",
        "CREATE TABLE chatapp.alembic_version (version_num varchar(32) PRIMARY KEY)",
        "INSERT INTO chatapp.alembic_version VALUES ('abc123def')",
        "CREATE TABLE chatapp.chat_sessions (id serial PRIMARY KEY, title text)",
    )
    await _execute(url, "DROP SCHEMA legacy CASCADE", "DROP SCHEMA second CASCADE")
    with pytest.raises(MigrationError, match=r"chatapp\.alembic_version"):
        await _storage(url).initialize()


def _sqlite_header(url: str) -> bytes:
    """The file's first 20 bytes (its journal mode among them); b"" on PostgreSQL."""
    if not url.startswith("sqlite"):
        return b""
    return Path(url.removeprefix("sqlite:///")).read_bytes()[:20]


async def test_alembic_upgrade_head_moves_a_legacy_version_table_too(fresh_url: str) -> None:
    alembic(fresh_url, "-x", f"version_table={LEGACY_VERSION_TABLE}", "upgrade", "0003")

    alembic(fresh_url, "upgrade", "head")

    (versions,) = await _execute(fresh_url, f"SELECT version_num FROM {VERSION_TABLE}")
    assert versions == [(HEAD,)]
    assert LEGACY_VERSION_TABLE not in await _tables(fresh_url)


_CATALOG = """
SELECT relname FROM pg_class WHERE relnamespace = 'public'::regnamespace AND relkind <> 'r'
UNION SELECT proname FROM pg_proc WHERE pronamespace = 'public'::regnamespace
UNION SELECT typname FROM pg_type WHERE typnamespace = 'public'::regnamespace
"""


@pytest.mark.parametrize(
    "theirs",
    [
        "CREATE INDEX ix_chat_sessions_updated ON orders (item)",
        # Found by attack: an index revision 0001 makes and 0003 drops.
        "CREATE INDEX ix_chat_messages_content_tsv ON orders (item)",
        "CREATE SEQUENCE chat_messages_id_seq",
        "CREATE FUNCTION persistence_append(integer) RETURNS integer LANGUAGE sql AS 'SELECT 1'",
        "CREATE TYPE chat_sessions AS ENUM ('open')",
    ],
    ids=["index", "dropped_index", "sequence", "function", "type"],
)
async def test_another_applications_postgresql_objects_of_our_names_are_refused(
    empty_postgresql_url: str, theirs: str
) -> None:
    """Found by attack: beside another application's index or function of one of our
    names, the refusal said to run `alembic upgrade head`, which failed on a raw
    "relation ... already exists"; a function of ours alone was taken for an empty
    database (and a later revision's CREATE OR REPLACE would have replaced it)."""
    url = empty_postgresql_url
    name = theirs.split()[2].split("(")[0]
    for tables in (["CREATE TABLE orders (id integer, item text)"], []):
        if "ON orders" in theirs and not tables:
            continue
        await _execute(url, "DROP SCHEMA public CASCADE", "CREATE SCHEMA public")
        await _execute(url, *tables, theirs)
        before = await _execute(url, _CATALOG), await _tables(url)
        storage = _storage(url)
        with pytest.raises(MigrationError, match="another application") as caught:
            await storage.initialize()
        await storage.close()
        said = str(caught.value)
        assert name in said and "alembic -x" not in said, said
        assert _alembic_failure(url) == f"FAILED: {said}"
        assert (await _execute(url, _CATALOG), await _tables(url)) == before


async def test_the_postgresql_names_of_ours_are_those_the_revisions_make(
    empty_postgresql_url: str,
) -> None:
    """The names a refusal looks for are every index, sequence and function the
    revisions make (and no other), so none of them is left out as revisions are added:
    read after each revision (found by attack: an index 0001 makes and 0003 drops was
    left out)."""
    from persistence.sql.schema import _OUR_NAMES, _POSTGRESQL_NAMES_OF_OURS

    names: set[str] = set()
    for script_revision in reversed(list(script_directory().walk_revisions())):
        alembic(empty_postgresql_url, "upgrade", script_revision.revision)
        (rows,) = await _execute(
            empty_postgresql_url,
            "SELECT relname FROM pg_class WHERE relnamespace = 'public'::regnamespace"
            " AND relkind <> 'r' UNION SELECT proname FROM pg_proc"
            " WHERE pronamespace = 'public'::regnamespace",
        )
        names |= {row[0] for row in rows}
    names -= {f"{VERSION_TABLE}_pkc"}
    assert names - _OUR_NAMES - _POSTGRESQL_NAMES_OF_OURS == set()
    assert _POSTGRESQL_NAMES_OF_OURS - names == set()
    (tables,) = await _execute(
        empty_postgresql_url, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
    )
    assert {row[0] for row in tables} <= _OUR_NAMES | {VERSION_TABLE}


@pytest.mark.sqlite
def test_a_hot_journal_in_an_unwritable_directory_is_refused_not_read_through(
    tmp_path: Path,
) -> None:
    """Found by attack: in a directory that cannot be written, a file is read as
    immutable, which ignores its -journal; a store with a hot one (a writer killed
    mid-transaction) was read with that transaction's changes: `alembic current` said
    its uncommitted revision, and `alembic stamp head` passed the check, then rolled the
    journal back into the file and failed."""
    import sqlite3

    store = tmp_path / "store"
    store.mkdir()
    path = store / "s.db"
    alembic(f"sqlite:///{path}", "upgrade", "head")
    with contextlib.closing(sqlite3.connect(path)) as connection:
        connection.execute("PRAGMA journal_mode = DELETE")
    writer = (
        "import os, sqlite3, sys\n"
        "c = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
        "c.execute('PRAGMA cache_size = 1')\n"
        "c.execute('BEGIN')\n"
        f"c.execute(\"UPDATE {VERSION_TABLE} SET version_num = '0003'\")\n"
        "for i in range(300):\n"
        "    c.execute('INSERT INTO persistence_store (name, value) VALUES (?, ?)',"
        " (f'k{i}', 'x' * 3000))\n"
        "os._exit(0)\n"
    )
    subprocess.run([sys.executable, "-c", writer, str(path)], check=True)
    journal = Path(f"{path}-journal")
    assert journal.stat().st_size > 0
    before = path.read_bytes(), journal.read_bytes()
    with unwritable(store):
        for command in [("current",), ("stamp", "head"), ("downgrade", "base")]:
            said = _alembic_failure(f"sqlite:///{path}", command)
            assert "0003" not in said, (command, said)
            assert "the file's -journal holds a transaction" in said, (command, said)
        reader = SQLiteSessionStorage(path)
        with pytest.raises(PersistenceError, match="-journal holds a transaction"):
            asyncio.run(reader.open_for_reading())
        asyncio.run(reader.close())
        assert (path.read_bytes(), journal.read_bytes()) == before


def _refused_on_a_path_mistyped_then_made_empty(url: str, command: tuple[str, str]) -> None:
    path = Path(url.removeprefix("sqlite:///"))
    missing = path.with_name("mistyped") / "store.db"
    said = _alembic_failure(f"sqlite:///{missing}", command)
    assert said.startswith("FAILED: ") and str(missing) in said, said
    assert not missing.parent.exists()
    path.touch()


@pytest.mark.parametrize("command", [*_WRITING_COMMANDS[1:], ("stamp", "base")], ids=" ".join)
async def test_alembic_downgrade_and_stamp_need_a_store_of_ours(
    fresh_url: str, command: tuple[str, str]
) -> None:
    """Found by attack: on a SQLite path mistyped, an empty file or an empty PostgreSQL
    database, `downgrade base` and `stamp` made a database holding our version table."""
    if fresh_url.startswith("sqlite"):
        _refused_on_a_path_mistyped_then_made_empty(fresh_url, command)
    said = _alembic_failure(fresh_url, command)
    assert "holds no persistence schema" in said and "nothing was written" in said, said
    assert await _tables(fresh_url) == {}
    assert _file_bytes(fresh_url) in (None, b"")


@pytest.mark.parametrize("revision", ["head", "base"])
async def test_alembic_stamp_refuses_our_empty_version_table_beside_another_application(
    fresh_url: str, revision: str
) -> None:
    """Found by attack: what `upgrade head` then `downgrade base` leave beside another
    application's tables (our version table, empty) was stamped head."""
    await _other_application(fresh_url, its_alembic=None)
    alembic(fresh_url, "upgrade", "head")
    alembic(fresh_url, "downgrade", "base")
    before = await _tables(fresh_url)
    said = _alembic_failure(fresh_url, ("stamp", revision))
    assert "holds tables of another application" in said, said
    assert await _tables(fresh_url) == before
    alembic(fresh_url, "upgrade", "head")  # as the refusal says


@pytest.mark.parametrize(
    "theirs",
    [
        f"CREATE TABLE {VERSION_TABLE} (foo INTEGER)",
        f"CREATE VIEW {VERSION_TABLE} AS SELECT 'zz' AS version_num",
    ],
    ids=["table", "view"],
)
async def test_another_applications_table_or_view_of_our_version_tables_name_is_refused(
    fresh_url: str, theirs: str
) -> None:
    """Found by attack: another application's table named as our version table (other
    columns) gave alembic's raw "no such column", a view of it "written by a newer
    version: upgrade persistence"."""
    await _execute(fresh_url, "CREATE TABLE orders (id INTEGER PRIMARY KEY)", theirs)
    before = await _tables(fresh_url), _file_bytes(fresh_url)
    storage = _storage(fresh_url)
    with pytest.raises(MigrationError, match="not persistence's version table") as caught:
        await storage.initialize()
    await storage.close()
    for command in [*_WRITING_COMMANDS, ("current",)]:
        said = _alembic_failure(fresh_url, command)
        assert said == f"FAILED: {caught.value}", (command, said)
    assert (await _tables(fresh_url), _file_bytes(fresh_url)) == before


@pytest.mark.parametrize("revision", ["base", "head"])
async def test_persistence_stamp_refuses_another_applications_or_an_empty_database(
    fresh_url: str, revision: str
) -> None:
    """Found by attack: `persistence stamp base` said "recorded as base" on another
    application's database and on an empty one (nothing was written), where `alembic
    stamp` refuses both."""
    if fresh_url.startswith("sqlite"):
        _file_of(fresh_url).write_bytes(b"")
    with pytest.raises(MigrationError, match="holds no persistence schema"):
        await _storage(fresh_url).stamp_schema(revision)
    await _other_application(fresh_url, its_alembic=None)
    before = await _tables(fresh_url), _file_bytes(fresh_url)
    with pytest.raises(MigrationError, match="holds tables of another application"):
        await _storage(fresh_url).stamp_schema(revision)
    assert (await _tables(fresh_url), _file_bytes(fresh_url)) == before


def _file_of(url: str) -> Path:
    return Path(url.removeprefix("sqlite:///"))
