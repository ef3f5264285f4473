"""A store's revision is told by its tables; a version row that is missing, empty or
wrong is refused, naming the revision to stamp, and nothing is changed."""

from __future__ import annotations

import asyncio
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine
from typer.testing import CliRunner

from persistence import (
    ChatSession,
    MigrationError,
    PostgreSQLSessionStorage,
    SQLiteSessionStorage,
)
from persistence.cli import app
from persistence.sql.engines import async_driver_url
from persistence.sql.revision_marks import (
    DATA_REVISIONS,
    MARKS,
    REVISIONS,
    missing_at,
    schema_revision,
)
from persistence.sql.schema import LEGACY_VERSION_TABLE, VERSION_TABLE, script_directory
from tests.installs import clean_environment

ROOT = Path(__file__).resolve().parents[2]
HEAD = script_directory().get_current_head()
# Oldest first.
ALL_REVISIONS = [revision.revision for revision in script_directory().walk_revisions()][::-1]


def _storage(url: str) -> SQLiteSessionStorage | PostgreSQLSessionStorage:
    if url.startswith("sqlite"):
        return SQLiteSessionStorage(url.removeprefix("sqlite:///"))
    return PostgreSQLSessionStorage(url, min_pool_size=1, max_pool_size=2)


def _alembic(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "alembic", "-x", f"url={url}", *args],
        cwd=ROOT,
        env=clean_environment(),
        capture_output=True,
        text=True,
        check=False,
    )


def _ran(url: str, *args: str) -> None:
    done = _alembic(url, *args)
    assert done.returncode == 0, done.stdout + done.stderr


def _failure(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode != 0
    assert "Traceback" not in done.stderr, done.stderr
    *_, last = done.stdout.strip().splitlines() or [""]
    assert last.startswith("FAILED: "), (done.stdout, done.stderr)
    return last.removeprefix("FAILED: ")


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


async def _read(url: str, reading: object) -> object:
    engine = create_async_engine(async_driver_url(url))
    try:
        async with engine.connect() as connection:
            return await connection.run_sync(reading)  # type: ignore[arg-type]
    finally:
        await engine.dispose()


async def _schema(url: str) -> list[tuple[object, ...]]:
    """Every schema object and version row: what a change to the database would change."""
    if url.startswith("sqlite"):
        listing = "SELECT type, name, sql FROM sqlite_master ORDER BY type, name"
    else:
        listing = (
            "SELECT 'table', table_name, column_name FROM information_schema.columns"
            " WHERE table_schema = 'public' UNION ALL"
            " SELECT 'function', proname, prosrc FROM pg_proc"
            " WHERE pronamespace = 'public'::regnamespace ORDER BY 1, 2, 3"
        )
    (rows,) = await _execute(url, listing)
    return rows


def _file_bytes(url: str) -> bytes | None:
    """A SQLite file's bytes (its journal mode is in its header), None on PostgreSQL."""
    return Path(url.removeprefix("sqlite:///")).read_bytes() if url.startswith("sqlite") else None


def _told(url: str, revision: str) -> str:
    """The revision the tables are told to be at: on SQLite 0006 to 0009 and 0011
    change nothing, so a store at 0005 has 0009's schema there, and one at 0010 has
    0011's; 0012 changes only data, and a store at it is told 0011, whose upgrade runs
    0012 again; so is one at 0013 or 0014 on SQLite, where they change nothing (never
    told past a data revision)."""
    if url.startswith("sqlite") and "0005" <= revision <= "0009":
        return "0009"
    if url.startswith("sqlite") and revision in ("0010", "0013", "0014"):
        return "0011"
    if revision in DATA_REVISIONS:
        return "0011"
    return revision


def test_every_revision_has_marks_on_the_dialects_it_changes() -> None:
    """A new revision without marks fails here: add its marks to revision_marks.py."""
    assert list(REVISIONS) == [r for r in ALL_REVISIONS if r not in DATA_REVISIONS]
    assert {mark.revision for mark in MARKS if "postgresql" in mark.dialects} == set(
        ALL_REVISIONS
    ) - set(DATA_REVISIONS)
    # 0006 to 0009, 0011, 0013 and 0014 change only PostgreSQL's functions and tables.
    assert {mark.revision for mark in MARKS if "sqlite" in mark.dialects} == set(
        ALL_REVISIONS[:5] + ALL_REVISIONS[9:10] + ALL_REVISIONS[14:15]
    )


@pytest.mark.parametrize("revision", ALL_REVISIONS)
async def test_the_tables_of_each_revision_tell_it(fresh_url: str, revision: str) -> None:
    """Found by attack: the marks stopped at 0004, so a store at 0005 to 0009 without
    a usable version row was told to be at 0004."""
    _ran(fresh_url, "upgrade", revision)
    await _execute(fresh_url, f"DROP TABLE {VERSION_TABLE}")

    assert await _read(fresh_url, schema_revision) == _told(fresh_url, revision)
    assert await _read(fresh_url, lambda c: missing_at(c, revision)) == []
    dialect = "sqlite" if fresh_url.startswith("sqlite") else "postgresql"
    changing = {mark.revision for mark in MARKS if dialect in mark.dialects}
    later = [r for r in REVISIONS if r > _told(fresh_url, revision) and r in changing]
    if later:
        assert await _read(fresh_url, lambda c: missing_at(c, later[0])) != []


async def test_an_empty_database_is_at_no_revision(fresh_url: str) -> None:
    await _execute(fresh_url, "CREATE TABLE orders (id INTEGER PRIMARY KEY)")

    assert await _read(fresh_url, schema_revision) is None
    missing = await _read(fresh_url, lambda c: missing_at(c, HEAD))
    assert isinstance(missing, list)
    assert missing[:3] == ["chat_sessions", "chat_messages", "uploaded_files"]


@pytest.mark.parametrize("revision", ["0004", "0005", "0006", "0007", "0008"])
async def test_a_store_stamped_past_its_revision_is_refused_naming_it(
    fresh_url: str, revision: str
) -> None:
    """Found by attack: a store at 0004 stamped at head opened as a store at head (its
    `search_text` still NOT NULL); on PostgreSQL so did one at 0005 to 0008, without the
    append function or the terms table every call then needs."""
    _ran(fresh_url, "upgrade", revision)
    _ran(fresh_url, "stamp", HEAD)
    before = await _schema(fresh_url)
    told = _told(fresh_url, revision)

    with pytest.raises(MigrationError, match="stamped without migrating") as refused:
        await _storage(fresh_url).initialize()
    # On SQLite 0005 to 0008 are 0009's schema: told as 0009.
    assert f"its tables are at revision {told}" in str(refused.value)
    assert f"stamp {told}" in str(refused.value)
    assert f"revision {HEAD}" in str(refused.value)
    refused_by_alembic = _failure(_alembic(fresh_url, "upgrade", "head"))
    assert f"stamp {told}" in refused_by_alembic
    assert await _schema(fresh_url) == before

    _ran(fresh_url, "stamp", told)
    _ran(fresh_url, "upgrade", "head")
    async with _storage(fresh_url) as storage:
        assert (await storage.count()).total_sessions == 0


async def _store_with_a_session(url: str, revision: str) -> None:
    _ran(url, "upgrade", revision)
    await _execute(
        url,
        "INSERT INTO chat_sessions (session_id, model, created_at, updated_at,"
        " message_count, metadata, status"
        + (", next_position, revision, incarnation" if revision >= "0002" else "")
        + ") VALUES ('kept', 'm', '2026-01-01', '2026-01-01', 0, '{}', 'active'"
        + (", 0, 1, ''" if revision >= "0002" else "")
        + ")",
    )


@pytest.mark.parametrize("revision", ["0003", "0007", HEAD])
async def test_a_store_without_its_version_table_is_refused_naming_the_revision_to_stamp(
    fresh_url: str, revision: str
) -> None:
    """Found by attack: a store whose version table was lost was refused as "tables of
    another application", without a word on how to adopt it."""
    await _store_with_a_session(fresh_url, revision)
    await _execute(fresh_url, f"DROP TABLE {VERSION_TABLE}")
    before = await _schema(fresh_url)
    told = _told(fresh_url, revision)

    for opening in ("initialize", "open_for_reading"):
        storage = _storage(fresh_url)
        with pytest.raises(MigrationError) as refused:
            await getattr(storage, opening)()
        await storage.close()
        message = str(refused.value)
        assert f"persistence's tables, at revision {told}" in message
        assert f"`alembic -x url=URL stamp {told}`" in message
        assert "upgrade head" in message
    assert "stamp" in _failure(_alembic(fresh_url, "upgrade", "head"))
    assert await _schema(fresh_url) == before

    # What the message says to run works.
    _ran(fresh_url, "stamp", told)
    _ran(fresh_url, "upgrade", "head")
    async with _storage(fresh_url) as storage:
        assert await storage.load_session("kept") is not None


@pytest.mark.parametrize("revision", ["0002", HEAD])
async def test_a_store_stamped_at_base_is_refused_naming_the_revision_to_stamp(
    fresh_url: str, revision: str
) -> None:
    await _store_with_a_session(fresh_url, revision)
    _ran(fresh_url, "stamp", "base")
    before = await _schema(fresh_url)

    with pytest.raises(
        MigrationError, match="empty \\(stamped or downgraded to base\\)"
    ) as refused:
        await _storage(fresh_url).initialize()
    assert f"stamp {_told(fresh_url, revision)}`" in str(refused.value)
    assert "stamp" in _failure(_alembic(fresh_url, "upgrade", "head"))
    assert await _schema(fresh_url) == before


async def test_an_empty_version_table_beside_another_applications_tables_is_refused(
    fresh_url: str,
) -> None:
    """Found by attack: initialize() took an empty version table of ours beside another
    application's tables for an empty store and created persistence's tables there."""
    await _execute(
        fresh_url,
        "CREATE TABLE orders (id INTEGER PRIMARY KEY, item TEXT)",
        "INSERT INTO orders VALUES (1, 'tea')",
        f"CREATE TABLE {VERSION_TABLE} (version_num VARCHAR(32) PRIMARY KEY)",
    )
    before = await _schema(fresh_url)
    file_before = _file_bytes(fresh_url)

    for opening in ("initialize", "open_for_reading"):
        storage = _storage(fresh_url)
        with pytest.raises(MigrationError, match="another application \\(orders\\)") as refused:
            await getattr(storage, opening)()
        await storage.close()
        assert f"empty {VERSION_TABLE}" in str(refused.value)

    assert await _schema(fresh_url) == before
    assert _file_bytes(fresh_url) == file_before  # not even its journal mode


async def test_a_revision_of_ours_beside_only_another_applications_tables_is_refused(
    fresh_url: str,
) -> None:
    """Found by attack: a version table of ours at head beside another application's
    tables (and none of ours) passed the first check, and the SQLite file was made WAL
    before initialize() refused it."""
    await _execute(
        fresh_url,
        "CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)",
        f"CREATE TABLE {VERSION_TABLE} (version_num VARCHAR(32) PRIMARY KEY)",
        f"INSERT INTO {VERSION_TABLE} VALUES ('{HEAD}')",
    )
    before = await _schema(fresh_url)
    file_before = _file_bytes(fresh_url)

    for opening in ("initialize", "open_for_reading"):
        storage = _storage(fresh_url)
        with pytest.raises(MigrationError, match=f"revision {HEAD}, but chat_sessions"):
            await getattr(storage, opening)()
        await storage.close()

    assert await _schema(fresh_url) == before
    assert _file_bytes(fresh_url) == file_before  # not even its journal mode


@pytest.mark.sqlite
async def test_tables_of_our_names_with_other_columns_are_refused_unchanged(
    tmp_path: Path,
) -> None:
    """Found by attack: a version row of ours beside tables named as ours, with other
    columns, passed the first check, and the file was made WAL before it was refused."""
    path = tmp_path / "other.db"
    connection = sqlite3.connect(path)
    for table in ("chat_sessions", "chat_messages", "uploaded_files"):
        connection.execute(f"CREATE TABLE {table} (a)")
    connection.execute(f"CREATE TABLE {VERSION_TABLE} (version_num VARCHAR(32) PRIMARY KEY)")
    connection.execute(f"INSERT INTO {VERSION_TABLE} VALUES ('{HEAD}')")
    connection.commit()
    connection.close()
    before = path.read_bytes()

    with pytest.raises(MigrationError, match=r"chat_sessions\.created_at"):
        await SQLiteSessionStorage(path).initialize()

    assert path.read_bytes() == before  # not even its journal mode


async def test_an_empty_alembic_version_beside_another_applications_tables_is_refused(
    fresh_url: str,
) -> None:
    await _execute(
        fresh_url,
        "CREATE TABLE orders (id INTEGER PRIMARY KEY, item TEXT)",
        f"CREATE TABLE {LEGACY_VERSION_TABLE} (version_num VARCHAR(32) PRIMARY KEY)",
    )
    before = await _schema(fresh_url)

    with pytest.raises(MigrationError, match="another application"):
        await _storage(fresh_url).initialize()

    assert await _schema(fresh_url) == before


async def test_an_empty_alembic_version_beside_a_store_names_the_revision_to_stamp(
    fresh_url: str,
) -> None:
    await _store_with_a_session(fresh_url, "0004")
    await _execute(
        fresh_url,
        f"DROP TABLE {VERSION_TABLE}",
        f"CREATE TABLE {LEGACY_VERSION_TABLE} (version_num VARCHAR(32) PRIMARY KEY)",
    )
    before = await _schema(fresh_url)

    with pytest.raises(MigrationError, match=f"its {LEGACY_VERSION_TABLE} is empty") as refused:
        await _storage(fresh_url).initialize()
    assert "stamp 0004`" in str(refused.value)
    assert await _schema(fresh_url) == before


async def test_a_database_downgraded_to_base_is_brought_to_head_by_initialize(
    fresh_url: str,
) -> None:
    """`alembic downgrade base` leaves an empty schema (an empty version table alone),
    and initialize() brings an empty database to head (API.md)."""
    _ran(fresh_url, "upgrade", "head")
    _ran(fresh_url, "downgrade", "base")

    async with _storage(fresh_url) as storage:
        await storage.save_session(ChatSession.create("m", session_id="after-base"))
    async with _storage(fresh_url) as storage:
        assert await storage.load_session("after-base") is not None


@pytest.mark.sqlite
def test_the_cli_refuses_a_store_without_its_version_table_and_names_the_revision(
    tmp_path: Path,
) -> None:
    path = tmp_path / "store.db"
    _ran(f"sqlite:///{path}", "upgrade", "0004")
    _sqlite_shell(path, f"DROP TABLE {VERSION_TABLE}")
    before = path.read_bytes()

    for command in (["upgrade"], ["stats"], ["sessions", "list"]):
        result = CliRunner().invoke(app, [*command, "--url", f"sqlite:///{path}"])
        assert result.exit_code == 1, result.output
        assert result.stderr.startswith(f"error: {path} holds persistence's tables")
        assert "`alembic -x url=URL stamp 0004`" in result.stderr

    assert path.read_bytes() == before
    # A reader of a WAL file may leave the -wal and -shm any reader needs; nothing in them.
    wal = tmp_path / "store.db-wal"
    assert not wal.exists() or wal.stat().st_size == 0


async def test_a_legacy_version_table_past_its_tables_revision_is_refused_naming_it(
    fresh_url: str,
) -> None:
    """Found by attack: a store versioned in alembic_version was checked for 0001's
    tables only: at 0004 with alembic_version at head, it was moved over and opened as
    a store at head."""
    _ran(fresh_url, "-x", f"version_table={LEGACY_VERSION_TABLE}", "upgrade", "0004")
    await _execute(fresh_url, f"UPDATE {LEGACY_VERSION_TABLE} SET version_num = '{HEAD}'")
    before = await _schema(fresh_url)

    with pytest.raises(MigrationError, match=f"{LEGACY_VERSION_TABLE} says") as refused:
        await _storage(fresh_url).initialize()
    assert "its tables are at revision 0004" in str(refused.value)
    assert "stamp 0004`" in _failure(_alembic(fresh_url, "upgrade", "head"))

    assert await _schema(fresh_url) == before


@pytest.mark.parametrize("stamped", ["0002", "0004"])
async def test_a_store_stamped_before_its_revision_is_refused_naming_it(
    fresh_url: str, stamped: str
) -> None:
    """Found by attack: a store at head stamped 0002 was migrated from there and failed
    half way ("duplicate column name: search_text"), naming no database."""
    _ran(fresh_url, "upgrade", "head")
    _ran(fresh_url, "stamp", stamped)
    before = await _schema(fresh_url)

    with pytest.raises(MigrationError, match=r"of later revisions (is|are) there") as refused:
        await _storage(fresh_url).initialize()
    # Told the newest revision of its tables, never past a data revision (on SQLite
    # 0011): stamped so, its upgrade runs 0012 again.
    told = _told(fresh_url, HEAD)
    assert f"its tables are at revision {told}" in str(refused.value)
    assert f"`alembic -x url=URL stamp {told}`" in str(refused.value)
    assert f"stamp {told}`" in _failure(_alembic(fresh_url, "upgrade", "head"))
    assert await _schema(fresh_url) == before


@pytest.mark.sqlite
async def test_a_sqlite_store_stamped_at_a_revision_of_the_same_schema_opens(
    tmp_path: Path,
) -> None:
    """0006 to 0009 change nothing on SQLite: a store at 0009 stamped 0005 is at 0005."""
    url = f"sqlite:///{tmp_path / 'store.db'}"
    _ran(url, "upgrade", "0009")
    _ran(url, "stamp", "0005")

    async with _storage(url) as storage:
        assert (await storage.count()).total_sessions == 0


def _sqlite_shell(path: Path, statement: str) -> None:
    """Runs `statement` on the file as the sqlite3 shell would, and closes it."""
    with sqlite3.connect(path) as connection:
        connection.execute(statement)
    connection.close()


def _cli(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


async def _cli_apart(*args: str) -> tuple[int, str, str]:
    """_cli from a test's event loop: the command runs its own, in a thread."""
    return await asyncio.to_thread(_cli, *args)


@pytest.mark.parametrize("revision", ["0003", "0007", HEAD])
async def test_persistence_stamp_adopts_a_store_its_refusal_names(
    fresh_url: str, revision: str
) -> None:
    """Found by review: the refusals named only `alembic ... stamp`, whose command line
    needs the source tree; an operator with the installed package had no way to follow
    them. `persistence stamp` does what they say, with the package alone."""
    await _store_with_a_session(fresh_url, revision)
    await _execute(fresh_url, f"DROP TABLE {VERSION_TABLE}")
    told = _told(fresh_url, revision)
    with pytest.raises(MigrationError) as refused:
        await _storage(fresh_url).initialize()
    assert f"`persistence stamp {told} --url URL` and `persistence upgrade --url URL`" in str(
        refused.value
    )

    code, stdout, stderr = await _cli_apart("stamp", told, "--url", fresh_url)
    assert code == 0, stderr
    assert f"schema revision recorded as {told} (was none)" in stdout
    code, stdout, stderr = await _cli_apart("upgrade", "--url", fresh_url)
    assert code == 0, stderr
    assert f"schema is at head (revision {HEAD})" in stdout
    async with _storage(fresh_url) as storage:
        assert await storage.load_session("kept") is not None
        await storage.save_session(ChatSession.create("m", session_id="after-stamp"))


@pytest.mark.parametrize("wrong", ["0002", "0009"])
async def test_persistence_stamp_refuses_a_revision_the_tables_are_not_at(
    fresh_url: str, wrong: str
) -> None:
    """Unlike `alembic stamp`, which records any revision (and so made the stores the
    other tests here refuse), it checks the tables first and writes nothing."""
    await _store_with_a_session(fresh_url, "0004")
    await _execute(fresh_url, f"DELETE FROM {VERSION_TABLE}")
    if fresh_url.startswith("sqlite") and wrong == "0009":
        wrong = "0005"  # 0005 to 0009 are one schema on SQLite
    before = await _schema(fresh_url)

    code, _, stderr = await _cli_apart("stamp", wrong, "--url", fresh_url)
    assert code == 1
    assert f"its tables are not at revision {wrong}" in stderr
    assert "they are at revision 0004 by their columns (nothing was written)" in stderr
    expected = r"of that revision (is|are) not there" if wrong > "0004" else "of later revisions"
    assert re.search(expected, stderr), stderr
    code, _, stderr = await _cli_apart("stamp", "base", "--url", fresh_url)
    assert code == 1 and "stamp 0004 instead" in stderr
    assert await _schema(fresh_url) == before


@pytest.mark.sqlite
def test_persistence_stamp_never_records_a_data_revision_the_tables_cannot_show(
    tmp_path: Path,
) -> None:
    """Found by attack: `persistence stamp head` on a SQLite store at 0011 (0013 changes
    nothing there) recorded 0013, so 0012's rewrite of first-release timestamps never
    ran, and the next save of such a session failed with a raw TypeError. (Head, 0015,
    now has a table on SQLite: 0014 is the newest revision those tables look like.)"""
    url = f"sqlite:///{tmp_path / 'store.db'}"
    _ran(url, "upgrade", "0011")
    _sqlite_shell(tmp_path / "store.db", f"DROP TABLE {VERSION_TABLE}")

    for revision in ("0014", "0012"):
        code, _, stderr = _cli("stamp", revision, "--url", url)
        assert code == 1
        assert "revision 0012 changes only data" in stderr and "stamp 0011" in stderr
    code, stdout, stderr = _cli("stamp", "0011", "--url", url)
    assert code == 0, stderr
    _ran(url, "upgrade", "head")
    code, stdout, stderr = _cli("stamp", "head", "--url", url)  # the version table says it
    assert code == 0 and f"recorded as {HEAD} (was {HEAD})" in stdout, stderr


@pytest.mark.sqlite
def test_persistence_stamp_refuses_what_it_cannot_stamp(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    code, _, stderr = _cli("stamp", HEAD, "--url", f"sqlite:///{path}")
    assert code == 1 and f"no database at {path}" in stderr
    assert not path.exists()

    _ran(f"sqlite:///{path}", "upgrade", "head")
    before = path.read_bytes()
    code, _, stderr = _cli("stamp", "0010x", "--url", f"sqlite:///{path}")
    assert code == 1
    assert "'0010x' is not a revision of persistence: give head, base or one of 0001" in stderr
    assert path.read_bytes() == before

    code, stdout, stderr = _cli("stamp", "head", "--url", f"sqlite:///{path}")
    assert code == 0, stderr
    assert f"recorded as {HEAD} (was {HEAD})" in stdout

    other = tmp_path / "other.db"
    _sqlite_shell(other, "CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)")
    before = other.read_bytes()
    for revision in ("head", "base"):
        # Another application's database is refused as `alembic stamp` refuses it; `stamp
        # base` said "recorded as base (was none)" (found by attack).
        code, _, stderr = _cli("stamp", revision, "--url", f"sqlite:///{other}")
        assert code == 1 and "holds tables of another application (notes)" in stderr, stderr
    assert other.read_bytes() == before

    newer = tmp_path / "newer.db"
    _ran(f"sqlite:///{newer}", "upgrade", "head")
    _sqlite_shell(newer, f"UPDATE {VERSION_TABLE} SET version_num = '0099'")
    before = newer.read_bytes()
    for revision in ("head", "base"):
        code, _, stderr = _cli("stamp", revision, "--url", f"sqlite:///{newer}")
        assert code == 1
        assert "at schema revision 0099, which this version of persistence does not" in stderr
    assert newer.read_bytes() == before

    code, _, stderr = _cli("stamp", "head", "--url", "mongodb://127.0.0.1:1/db")
    assert code == 1 and "MongoDB has no schema revision to stamp" in stderr
