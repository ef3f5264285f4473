"""Alembic owns the schema: upgrade, downgrade, no drift, unknown revisions refused."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection, inspect, text
from sqlalchemy.ext.asyncio import create_async_engine

from persistence import (
    ChatSession,
    MigrationError,
    PostgreSQLSessionStorage,
    SchemaVersionError,
    SQLiteSessionStorage,
)
from persistence.sql.engines import async_driver_url
from persistence.sql.revisions import HEAD
from persistence.sql.schema import VERSION_TABLE
from persistence.sql.tables import SEARCH_OBJECTS, Base
from persistence.transfer import backup_storage, export_to_json
from tests.installs import clean_environment, fresh_install

ROOT = Path(__file__).resolve().parents[2]
TABLES = {"chat_sessions", "chat_messages", "uploaded_files"}
T = TypeVar("T")


def alembic(url: str, *args: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "alembic", "-x", f"url={url}", *args],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )


def user_tables(connection: Connection) -> set[str]:
    return {
        name
        for name in inspect(connection).get_table_names()
        if name != "persistence_alembic_version"
    }


def _include(
    obj: object, name: str | None, type_: str, reflected: bool, compare_to: object
) -> bool:
    return not (name or "").startswith(tuple(SEARCH_OBJECTS))


async def _on(url: str, inspect_with: Callable[[Connection], T]) -> T:
    engine = create_async_engine(async_driver_url(url))
    try:
        async with engine.connect() as connection:
            return await connection.run_sync(inspect_with)
    finally:
        await engine.dispose()


def _diff(connection: Connection) -> list[object]:
    context = MigrationContext.configure(
        connection,
        opts={"include_object": _include, "compare_type": True, "version_table": VERSION_TABLE},
    )
    return list(compare_metadata(context, Base.metadata))


async def test_upgrade_downgrade_upgrade_from_the_repo_root(fresh_url: str) -> None:
    alembic(fresh_url, "upgrade", "head")
    assert await _on(fresh_url, user_tables) >= TABLES

    alembic(fresh_url, "downgrade", "base")
    assert await _on(fresh_url, user_tables) == set()

    alembic(fresh_url, "upgrade", "head")
    assert await _on(fresh_url, user_tables) >= TABLES


async def test_the_migrated_schema_matches_the_models(fresh_url: str) -> None:
    alembic(fresh_url, "upgrade", "head")

    assert await _on(fresh_url, _diff) == []


async def test_initialize_brings_a_fresh_database_to_head_and_is_idempotent(
    fresh_url: str,
) -> None:
    for _ in range(2):
        storage = _storage(fresh_url)
        async with storage:
            assert await storage.list_sessions() == []

    assert await _on(fresh_url, _diff) == []


async def test_initialize_refuses_a_revision_it_does_not_know(fresh_url: str) -> None:
    async with _storage(fresh_url) as storage, storage.engine.begin() as connection:
        await connection.execute(
            text("UPDATE persistence_alembic_version SET version_num = 'f00dfeed'")
        )

    with pytest.raises(SchemaVersionError, match="f00dfeed"):
        await _storage(fresh_url).initialize()


async def test_initialize_after_alembic_upgrade_changes_nothing(fresh_url: str) -> None:
    alembic(fresh_url, "upgrade", "head")

    async with _storage(fresh_url) as storage:
        assert (await storage.count()).total_sessions == 0


@pytest.mark.parametrize("upgrade", ["initialize", "alembic"])
async def test_a_sqlite_store_of_the_first_revision_is_upgraded_with_its_messages(
    tmp_path: Path, upgrade: str
) -> None:
    """Found by attack: revision 0002 rebuilds chat_sessions (batch mode), and its DROP
    TABLE, with the library's foreign keys on, deleted every row first: the cascade met
    the FTS triggers ("database table is locked"), and without them every message was
    lost while the sessions still counted them."""
    path = tmp_path / "first.db"
    alembic(f"sqlite:///{path}", "upgrade", "0001")
    stamp = "2025-01-02 03:04:05.123456+00:00"
    with sqlite3.connect(path) as connection:
        for number in range(3):
            connection.execute(
                "INSERT INTO chat_sessions (session_id, model, created_at, updated_at,"
                " message_count, metadata, status) VALUES (?, 'm', ?, ?, 4, '{}', 'active')",
                (f"s{number}", stamp, stamp),
            )
            connection.executemany(
                "INSERT INTO chat_messages (message_id, session_id, position, role, content,"
                " created_at, metadata) VALUES (?, ?, ?, 'user', ?, ?, '{}')",
                [
                    (f"s{number}-{p}", f"s{number}", p, f"zebra{number} turn {p}", stamp)
                    for p in range(4)
                ],
            )
    connection.close()
    if upgrade == "alembic":
        alembic(f"sqlite:///{path}", "upgrade", "head")

    async with SQLiteSessionStorage(path) as storage:
        # The migration's connection goes back to the pool with foreign keys on again.
        async with storage.engine.connect() as pooled:
            assert (await pooled.exec_driver_sql("PRAGMA foreign_keys")).scalar() == 1
        loaded = await storage.load_session("s1")
        assert loaded is not None
        assert [m.content for m in loaded.messages] == [f"zebra1 turn {p}" for p in range(4)]
        assert (await storage.count()).messages == 12
        assert [m.message_id for m in await storage.search_messages("zebra2")] == [
            f"s2-{p}" for p in reversed(range(4))
        ]
    with sqlite3.connect(path) as connection:
        assert connection.execute("SELECT count(*) FROM chat_messages").fetchone() == (12,)
        assert connection.execute("PRAGMA foreign_key_check").fetchall() == []
    connection.close()
    async with SQLiteSessionStorage(path) as storage:
        assert await storage.delete_session("s0")
        assert (await storage.count()).messages == 8
    with sqlite3.connect(path) as connection:
        assert connection.execute("SELECT count(*) FROM chat_messages").fetchone() == (8,)
    connection.close()


@pytest.mark.parametrize("upgrade", ["initialize", "alembic"])
async def test_timestamps_the_first_release_wrote_on_sqlite_read_back_in_utc(
    tmp_path: Path, upgrade: str
) -> None:
    """Found by attack: the first releases wrote SQLite timestamps without their offset
    (SQLAlchemy's default text), and no revision rewrote them; after the upgrade they
    loaded without a zone, and the next save raised a raw TypeError."""
    path = tmp_path / "first.db"
    alembic(f"sqlite:///{path}", "upgrade", "0001")
    naive, later = "2026-11-24 17:28:54.074000", "2026-11-24 17:28:54.075000+00:00"
    with sqlite3.connect(path) as connection:
        connection.executemany(
            "INSERT INTO chat_sessions (session_id, model, created_at, updated_at,"
            " message_count, metadata, status) VALUES (?, 'm', ?, ?, 1, '{}', 'active')",
            [("old", naive, naive), ("new", later, later)],
        )
        connection.executemany(
            "INSERT INTO chat_messages (message_id, session_id, position, role, content,"
            " created_at, metadata) VALUES (?, ?, 0, 'user', 'hello', ?, '{}')",
            [("m-old", "old", naive), ("m-new", "new", later)],
        )
        connection.execute(
            "INSERT INTO uploaded_files (file_id, gemini_file_name, gemini_file_uri,"
            " display_name, size, mime_type, uploaded_at, expires_at, metadata)"
            " VALUES ('f', 'files/f', 'uri', 'f.txt', 1, 'text/plain', ?, ?, '{}')",
            (naive, naive),
        )
    connection.close()
    if upgrade == "alembic":
        alembic(f"sqlite:///{path}", "upgrade", "head")

    instant = datetime(2026, 11, 24, 17, 28, 54, 74000, tzinfo=UTC)
    async with SQLiteSessionStorage(path) as storage:
        old = await storage.load_session("old")
        assert old is not None
        assert (old.created_at, old.updated_at, old.messages[0].created_at) == (instant,) * 3
        assert all(value.utcoffset() == timedelta(0) for value in (old.created_at, old.updated_at))
        record = await storage.load_file_record("f")
        assert record is not None and (record.uploaded_at, record.expires_at) == (instant,) * 2
        old.add_message("assistant", "saved after the upgrade")
        assert await storage.save_session(old)
        assert [s.session_id for s in await storage.list_sessions()] == ["old", "new"]
    with sqlite3.connect(path) as connection:
        texts = connection.execute(
            "SELECT created_at FROM chat_sessions WHERE session_id = 'new'"
        ).fetchone()
    connection.close()
    assert texts == (later,)  # text of the present shape is left as it is


async def test_a_store_that_lost_its_version_table_is_told_a_revision_whose_upgrade_fixes_it(
    tmp_path: Path,
) -> None:
    """Found by attack: a store at 0011 without its version table was told to stamp
    0012 (a data revision, whose tables are 0011's); stamped so, its upgrade skipped
    0012's rewrite, and its first-release timestamps still loaded without a zone."""
    path = tmp_path / "lost.db"
    alembic(f"sqlite:///{path}", "upgrade", "0011")
    naive = "2026-11-24 17:28:54.074000"
    with sqlite3.connect(path) as connection:
        connection.execute(
            "INSERT INTO chat_sessions (session_id, model, created_at, updated_at,"
            " message_count, metadata, status, revision, incarnation, next_position)"
            " VALUES ('old', 'm', ?, ?, 0, '{}', 'active', 1, 'i', 0)",
            (naive, naive),
        )
        connection.execute(f"DROP TABLE {VERSION_TABLE}")
    connection.close()

    with pytest.raises(MigrationError, match="stamp 0011`") as refused:
        await SQLiteSessionStorage(path).initialize()
    assert "stamp 0012" not in str(refused.value)
    alembic(f"sqlite:///{path}", "stamp", "0011")
    async with SQLiteSessionStorage(path) as storage:
        old = await storage.load_session("old")
    assert old is not None and old.updated_at.tzinfo is UTC


async def test_a_rewound_session_taken_down_to_the_first_revision_and_up_appends_in_order(
    fresh_url: str,
) -> None:
    """Found by attack: revision 0002 set each session's next position to its message
    count, but a rewind leaves positions unused: after `downgrade 0001` and `upgrade
    head` an append took a position inside the history, and the next one collided."""
    async with _storage(fresh_url) as storage:
        session = ChatSession.create("m")
        for number in range(5):
            session.add_message("user", f"m{number}")
        await storage.save_session(session)
        session.rewind(session.messages[2].message_id)
        session.add_message("user", "after the rewind")
        await storage.save_session(session)
    alembic(fresh_url, "downgrade", "0001")
    alembic(fresh_url, "upgrade", "head")

    async with _storage(fresh_url) as storage:
        loaded = await storage.load_session(session.session_id)
        assert loaded is not None
        for content in ("A", "B"):
            loaded.add_message("user", content)
            await storage.save_session(loaded)
        reread = await storage.load_session(session.session_id)
    assert reread is not None
    assert [m.content for m in reread.messages] == ["m0", "m1", "m2", "after the rewind", "A", "B"]


def _delete_in_the_sqlite_shell(path: Path, session_id: str) -> None:
    # As the sqlite3 shell does: foreign keys off, so the session's messages stay.
    with sqlite3.connect(path) as connection:
        connection.execute("DELETE FROM chat_sessions WHERE session_id = ?", (session_id,))
    connection.close()


@pytest.mark.parametrize("upgrade", ["initialize", "alembic"])
async def test_a_store_at_head_with_messages_of_a_deleted_session_opens_and_backs_up(
    tmp_path: Path, upgrade: str
) -> None:
    """Found by attack: the check of what the revisions left ran on every open, so after
    a session was deleted in the sqlite3 shell the service could not start, and neither
    `persistence upgrade`, alembic nor a backup (which opens its copy) would run."""
    path = tmp_path / "store.db"
    async with SQLiteSessionStorage(path) as storage:
        for session_id in ("kept", "gone"):
            session = ChatSession.create("m", session_id=session_id)
            session.add_message("user", f"{session_id} one")
            session.add_message("assistant", f"{session_id} two")
            await storage.save_session(session)
    _delete_in_the_sqlite_shell(path, "gone")
    if upgrade == "alembic":
        alembic(f"sqlite:///{path}", "upgrade", "head")

    async with SQLiteSessionStorage(path) as storage:
        loaded = await storage.load_session("kept")
        assert loaded is not None
        assert [m.content for m in loaded.messages] == ["kept one", "kept two"]
        assert [s.session_id for s in await storage.list_sessions()] == ["kept"]
        backup = await backup_storage(storage, tmp_path / "backups")
        assert backup["sessions"] == 1
        exported = await export_to_json(storage, tmp_path / "all.json")
        assert (exported["sessions"], exported["messages"]) == (1, 2)


async def test_messages_of_no_session_before_the_upgrade_do_not_stop_it(tmp_path: Path) -> None:
    """Only rows the revisions leave dangling refuse the upgrade, not those found before."""
    path = tmp_path / "first.db"
    alembic(f"sqlite:///{path}", "upgrade", "0001")
    stamp = "2025-01-02 03:04:05.123456+00:00"
    with sqlite3.connect(path) as connection:
        for session_id in ("kept", "gone"):
            connection.execute(
                "INSERT INTO chat_sessions (session_id, model, created_at, updated_at,"
                " message_count, metadata, status) VALUES (?, 'm', ?, ?, 1, '{}', 'active')",
                (session_id, stamp, stamp),
            )
            connection.execute(
                "INSERT INTO chat_messages (message_id, session_id, position, role, content,"
                " created_at, metadata) VALUES (?, ?, 0, 'user', 'hello', ?, '{}')",
                (f"{session_id}-0", session_id, stamp),
            )
    connection.close()
    _delete_in_the_sqlite_shell(path, "gone")

    async with SQLiteSessionStorage(path) as storage:
        loaded = await storage.load_session("kept")
        assert loaded is not None
        assert [m.message_id for m in loaded.messages] == ["kept-0"]
    with sqlite3.connect(path) as connection:
        assert connection.execute("SELECT count(*) FROM pragma_foreign_key_check").fetchone() == (
            1,
        )
    connection.close()


def _storage(url: str) -> SQLiteSessionStorage | PostgreSQLSessionStorage:
    if url.startswith("sqlite"):
        return SQLiteSessionStorage(url.removeprefix("sqlite:///"))
    return PostgreSQLSessionStorage(url, min_pool_size=1, max_pool_size=2)


def test_revisions_ship_in_a_plain_install(tmp_path: Path) -> None:
    python = fresh_install(tmp_path) / "bin" / "python"
    script = (
        "import asyncio, persistence, sys\n"
        "assert 'site-packages' in persistence.__file__, persistence.__file__\n"
        "async def main():\n"
        "    async with persistence.SQLiteSessionStorage('new.db') as storage:\n"
        "        s = persistence.ChatSession.create('m'); s.add_message('user', 'hi')\n"
        "        await storage.save_session(s)\n"
        "        print((await storage.count()).messages)\n"
        "asyncio.run(main())\n"
    )
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    done = subprocess.run(
        [str(python), "-c", script],
        cwd=workdir,
        env=clean_environment(),
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "1"


def _alembic_upgrade(
    *x_options: str, environment: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    options = [word for option in x_options for word in ("-x", option)]
    return subprocess.run(
        [sys.executable, "-m", "alembic", *options, "upgrade", "head"],
        cwd=ROOT,
        env={**clean_environment(), **(environment or {})},
        capture_output=True,
        text=True,
        check=False,
    )


def _failure(done: subprocess.CompletedProcess[str]) -> str:
    """Alembic's one line for a refusal ("FAILED: ..." on stdout), without the prefix;
    a traceback fails the test."""
    assert done.returncode != 0
    assert "Traceback" not in done.stderr, done.stderr
    *_, last = done.stdout.strip().splitlines() or [""]
    assert last.startswith("FAILED: "), (done.stdout, done.stderr)
    return last.removeprefix("FAILED: ")


@pytest.mark.sqlite
@pytest.mark.parametrize("name", ["app?v=2.db", "x%41y.db", "my%20data.db"])
def test_alembic_migrates_the_sqlite_file_the_configuration_names(
    tmp_path: Path, name: str
) -> None:
    # "app": another application's file, which "app?v=2.db" read as a URL would name.
    other = tmp_path / "app"
    other.write_bytes(b"")
    done = _alembic_upgrade(environment={"STORAGE_DATABASE_PATH": str(tmp_path / name)})
    assert done.returncode == 0, done.stderr
    assert sorted(os.listdir(tmp_path)) == sorted([name, "app"])
    assert other.read_bytes() == b""


@pytest.mark.sqlite
def test_alembic_reads_a_sqlite_url_as_the_cli_does(tmp_path: Path) -> None:
    done = _alembic_upgrade(f"url=sqlite:///{tmp_path}/a%20b.db")
    assert done.returncode == 0, done.stderr
    done = _alembic_upgrade("url=sqlite:///~/home.db", environment={"HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    assert sorted(os.listdir(tmp_path)) == ["a%20b.db", "home.db"]
    # An empty URL (an unset variable) is refused, not taken for the configured store.
    done = _alembic_upgrade("url=", environment={"STORAGE_DATABASE_PATH": str(tmp_path / "c.db")})
    assert done.returncode != 0 and "URL: no scheme" in _failure(done)
    assert not (tmp_path / "c.db").exists()


@pytest.mark.sqlite
def test_alembic_refuses_what_the_library_refuses_to_open(tmp_path: Path) -> None:
    (tmp_path / "dangling.db").symlink_to(tmp_path / "elsewhere" / "target.db")
    os.mkfifo(tmp_path / "pipe")
    for name, reason in (("dangling.db", "which does not exist"), ("pipe", "is a FIFO")):
        done = _alembic_upgrade(environment={"STORAGE_DATABASE_PATH": str(tmp_path / name)})
        assert done.returncode != 0
        assert reason in _failure(done)
    assert sorted(os.listdir(tmp_path)) == ["dangling.db", "pipe"]


@pytest.mark.sqlite
def test_a_failed_alembic_run_leaves_a_sqlite_file_as_it_was(tmp_path: Path) -> None:
    """Found by attack: each DDL statement committed on its own, so a run that failed
    (or was killed) half way left tables behind: here beside another application's
    `uploaded_files`, whose columns are not ours."""
    path = tmp_path / "theirs.db"
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE uploaded_files (id INTEGER PRIMARY KEY, path TEXT)")
        connection.execute("INSERT INTO uploaded_files VALUES (1, '/srv/a.pdf')")
    connection.close()
    before = path.read_bytes()

    done = _alembic_upgrade(f"url=sqlite:///{path}")

    assert done.returncode != 0
    assert _failure(done)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["theirs.db"]


def test_alembic_offline_mode_is_refused_in_one_line(tmp_path: Path) -> None:
    url = f"url=sqlite:///{tmp_path / 'x.db'}"
    done = subprocess.run(
        [sys.executable, "-m", "alembic", "-x", url, "upgrade", "head", "--sql"],
        cwd=ROOT,
        env=clean_environment(),
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode != 0
    assert _failure(done) == (
        "offline mode (--sql) is not supported: the revisions read the database as"
        " they go (batch rebuilds on SQLite, backfills); run them on the database"
    )


def _alembic(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "alembic", "-x", f"url={url}", *args],
        cwd=ROOT,
        env=clean_environment(),
        capture_output=True,
        text=True,
        check=False,
    )


async def test_a_version_table_stamped_without_migrating_is_refused_and_can_be_stamped_back(
    fresh_url: str,
) -> None:
    """Found by attack: after `alembic stamp head` on an empty database or a store of an
    older revision, initialize() took it for a store at head: every call then failed on
    a missing table, and the revisions it lacked never ran. (An empty database is now
    refused by the stamp itself.)"""
    said = _failure(_alembic(fresh_url, "stamp", "head"))
    assert "holds no persistence schema" in said or "nothing stored yet" in said, said

    alembic(fresh_url, "upgrade", "0002")
    assert _alembic(fresh_url, "stamp", "head").returncode == 0
    with pytest.raises(MigrationError, match="chat_session_counts"):
        await _storage(fresh_url).initialize()
    assert _alembic(fresh_url, "stamp", "0002").returncode == 0
    async with _storage(fresh_url) as storage:
        assert (await storage.count()).total_sessions == 0
    assert await _on(fresh_url, _diff) == []


@pytest.mark.sqlite
def test_alembic_stamp_refuses_another_applications_database(tmp_path: Path) -> None:
    path = tmp_path / "theirs.db"
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY)")
    connection.close()
    done = _alembic(f"sqlite:///{path}", "stamp", "head")
    assert "another application (invoices)" in _failure(done)
    with sqlite3.connect(path) as connection:
        tables = connection.execute("SELECT name FROM sqlite_master").fetchall()
    connection.close()
    assert tables == [("invoices",)]


@pytest.mark.sqlite
def test_alembic_current_writes_nothing(tmp_path: Path) -> None:
    """Found by attack: `alembic current` created a SQLite file that did not exist, and
    moved an older store's revision from `alembic_version` to our version table."""
    missing = tmp_path / "missing.db"
    assert "no database at" in _failure(_alembic(f"sqlite:///{missing}", "current"))
    assert not missing.exists()

    older = tmp_path / "older.db"
    alembic(f"sqlite:///{older}", "upgrade", "head")
    with sqlite3.connect(older) as connection:
        connection.execute(f"ALTER TABLE {VERSION_TABLE} RENAME TO alembic_version")
    connection.close()
    done = _alembic(f"sqlite:///{older}", "current")
    assert done.returncode == 0, done.stderr
    with sqlite3.connect(older) as connection:
        names = {row[0] for row in connection.execute("SELECT name FROM sqlite_master")}
    connection.close()
    assert "alembic_version" in names and VERSION_TABLE not in names


@pytest.mark.sqlite
def test_a_sqlite_file_alembic_creates_is_in_wal_mode(tmp_path: Path) -> None:
    """Found by attack: left in rollback-journal mode, a storage opened while alembic
    held the new file failed at once (SQLite answers a change of journal mode with
    "busy" without waiting) instead of waiting for the writer."""
    path = tmp_path / "new.db"
    alembic(f"sqlite:///{path}", "upgrade", "head")
    with sqlite3.connect(path) as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    connection.close()


def _at_head_with_our_tables(path: Path) -> bool:
    with sqlite3.connect(path) as connection:
        versions = connection.execute(f"SELECT version_num FROM {VERSION_TABLE}").fetchall()
        names = {row[0] for row in connection.execute("SELECT name FROM sqlite_master")}
    connection.close()
    return versions == [(HEAD,)] and names >= TABLES


async def _initialized(paths: list[Path]) -> list[BaseException | None]:
    """What initialize() of a storage on each of `paths` at once in this loop raised."""
    stores = [SQLiteSessionStorage(path) for path in paths]
    try:
        return list(await asyncio.gather(*(s.initialize() for s in stores), return_exceptions=True))
    finally:
        for store in stores:
            await store.close()


@pytest.mark.sqlite
async def test_new_stores_initialised_at_once_in_one_loop_each_get_their_own_schema(
    tmp_path: Path,
) -> None:
    """Found by attack: alembic's proxies are global to the process; eight initialize()
    at once failed (KeyError 'config') or ran one store's revision on another's file."""
    paths = [tmp_path / f"s{n}.db" for n in range(8)]
    assert await _initialized(paths) == [None] * 8
    assert all(_at_head_with_our_tables(path) for path in paths)


@pytest.mark.sqlite
def test_new_stores_initialised_at_once_from_threads_each_get_their_own_schema(
    tmp_path: Path,
) -> None:
    """The same from eight threads, each with its own event loop."""
    outcomes: list[BaseException | None] = []
    start = threading.Barrier(4)

    def initialise(first: int) -> None:
        paths = [tmp_path / f"s{first}.db", tmp_path / f"s{first + 4}.db"]
        start.wait()
        outcomes.extend(asyncio.run(_initialized(paths)))

    threads = [threading.Thread(target=initialise, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert outcomes == [None] * 8
    assert all(_at_head_with_our_tables(tmp_path / f"s{n}.db") for n in range(8))
