"""Alembic's reading commands (`current`, `history -i`, `check`) change nothing; alembic
names the database a failure is about; hostile paths and URLs."""

from __future__ import annotations

import asyncio
import os
import shutil
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from persistence.sql.engines import async_driver_url
from persistence.sql.schema import (
    _PG_MIGRATION_LOCK,
    LEGACY_VERSION_TABLE,
    script_directory,
)
from tests import servers
from tests.installs import clean_environment

ROOT = Path(__file__).resolve().parents[2]
HEAD = script_directory().get_current_head()
READING = [["current"], ["history", "-i"], ["check"]]


def _alembic(
    url: str, *args: str, prefix: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*prefix, sys.executable, "-m", "alembic", "-x", f"url={url}", *args],
        cwd=ROOT,
        env=clean_environment(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _ran(url: str, *args: str) -> str:
    done = _alembic(url, *args)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


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


async def _tables(url: str) -> list[tuple[object, ...]]:
    listing = (
        "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name"
        if url.startswith("sqlite")
        else "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY tablename"
    )
    (rows,) = await _execute(url, listing)
    return rows


@pytest.mark.sqlite
def test_reading_commands_leave_a_0_byte_file_as_it_is(tmp_path: Path) -> None:
    """Found by attack: `alembic current` made a 0-byte file a WAL database of 4,096
    bytes (alembic opened it as `upgrade` does)."""
    path = tmp_path / "empty.db"
    path.write_bytes(b"")

    for command in READING:
        _alembic(f"sqlite:///{path}", *command)

    assert path.read_bytes() == b""
    assert os.listdir(tmp_path) == ["empty.db"]


async def test_reading_commands_create_no_version_table(fresh_url: str) -> None:
    """Found by attack: `alembic check` and `history -i` created the version table of a
    database that had none, and committed it."""
    await _execute(fresh_url, "CREATE TABLE orders (id INTEGER PRIMARY KEY)")

    for command in READING:
        _alembic(fresh_url, *command)

    assert await _tables(fresh_url) == [("orders",)]


async def test_alembic_current_reports_a_legacy_version_table_and_moves_nothing(
    fresh_url: str,
) -> None:
    """Found by attack: `current` printed nothing for a store whose revision is still in
    `alembic_version`, where persistence kept it before its own version table."""
    _ran(fresh_url, "-x", f"version_table={LEGACY_VERSION_TABLE}", "upgrade", "0006")
    before = await _tables(fresh_url)

    shown = _ran(fresh_url, "current")

    assert shown.splitlines()[-1] == "0006"
    assert f"the revision is in {LEGACY_VERSION_TABLE}" in shown
    assert await _tables(fresh_url) == before
    (versions,) = await _execute(fresh_url, f"SELECT version_num FROM {LEGACY_VERSION_TABLE}")
    assert versions == [("0006",)]


@pytest.mark.sqlite
def test_alembic_current_does_not_wait_for_a_sqlite_writer(tmp_path: Path) -> None:
    """Found by attack: `current` took the write lock (BEGIN IMMEDIATE), so it waited for
    a writer, then failed with "database is locked"."""
    path = tmp_path / "store.db"
    _ran(f"sqlite:///{path}", "upgrade", "head")
    writer = sqlite3.connect(path, isolation_level=None)
    try:
        writer.execute("BEGIN IMMEDIATE")
        writer.execute("DELETE FROM chat_sessions")
        assert _ran(f"sqlite:///{path}", "current").strip() == f"{HEAD} (head)"
    finally:
        writer.close()


async def test_alembic_current_does_not_wait_for_a_postgresql_migration(
    postgresql_url: str,
) -> None:
    """`current` took the lock a migration holds, so it waited for any migration."""
    _ran(postgresql_url, "upgrade", "head")
    engine = create_async_engine(async_driver_url(postgresql_url))
    try:
        async with engine.connect() as connection:
            await connection.execute(text(f"SELECT pg_advisory_lock({_PG_MIGRATION_LOCK})"))
            done = await asyncio.to_thread(_alembic, postgresql_url, "current")
            await connection.execute(text(f"SELECT pg_advisory_unlock({_PG_MIGRATION_LOCK})"))
    finally:
        await engine.dispose()
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"{HEAD} (head)"


def _without_file_permission_override() -> tuple[str, ...]:
    """What runs a command that file permissions bind: as root, without the capability
    that lets root write any file."""
    if os.geteuid() != 0:
        return ()
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: a read-only file is writable")
    return (setpriv, "--bounding-set", "-dac_override,-dac_read_search")


@pytest.mark.sqlite
def test_reading_commands_read_a_read_only_file_and_upgrade_refuses_it_by_name(
    tmp_path: Path,
) -> None:
    path = tmp_path / "store.db"
    _ran(f"sqlite:///{path}", "upgrade", "0005")
    path.chmod(0o444)
    before = path.read_bytes()
    prefix = _without_file_permission_override()

    done = _alembic(f"sqlite:///{path}", "current", prefix=prefix)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == "0005"
    assert "read-only" in _failure(_alembic(f"sqlite:///{path}", "upgrade", "head", prefix=prefix))
    assert str(path) in _failure(_alembic(f"sqlite:///{path}", "upgrade", "head", prefix=prefix))

    assert path.read_bytes() == before


@pytest.mark.sqlite
def test_alembic_follows_a_symlink_to_a_store_and_keeps_the_link(tmp_path: Path) -> None:
    target = tmp_path / "real.db"
    link = tmp_path / "link.db"
    _ran(f"sqlite:///{target}", "upgrade", "0004")
    link.symlink_to(target)

    _ran(f"sqlite:///{link}", "upgrade", "head")
    assert _ran(f"sqlite:///{link}", "current").strip() == f"{HEAD} (head)"

    assert link.is_symlink() and link.resolve() == target
    # A reader of a WAL file leaves its -wal and -shm beside it (README), not the link.
    assert {"link.db", "real.db"} <= set(os.listdir(tmp_path))
    assert not [name for name in os.listdir(tmp_path) if name.startswith("link.db-")]


@pytest.mark.sqlite
def test_reading_commands_refuse_a_fifo_and_a_missing_file_without_creating_one(
    tmp_path: Path,
) -> None:
    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "to-pipe.db").symlink_to(tmp_path / "pipe")
    for name, reason in (("pipe", "is a FIFO"), ("to-pipe.db", "is a FIFO"), ("no.db", "no")):
        for command in READING:
            assert reason in _failure(_alembic(f"sqlite:///{tmp_path / name}", *command))
    assert sorted(os.listdir(tmp_path)) == ["pipe", "to-pipe.db"]


_PASSWORD = "p@ss/?#w"
_ENCODED = "p%40ss%2F%3F%23w"


@pytest.fixture
def role_with_a_hostile_password(postgresql_admin_url: str) -> Iterator[tuple[str, str]]:
    """A role whose password holds `@/?#`, owning a throwaway database: (role, database)."""
    admin = postgresql_admin_url
    role = f"persistence_test_{uuid.uuid4().hex[:12]}"
    asyncio.run(servers._admin(admin, f"CREATE ROLE {role} LOGIN PASSWORD '{_PASSWORD}'"))
    try:
        with servers.throwaway_postgresql_database(admin) as url:
            database = url.rsplit("/", 1)[1]
            asyncio.run(servers._admin(admin, f"ALTER DATABASE {database} OWNER TO {role}"))
            asyncio.run(
                servers._admin(
                    servers.with_database(admin, database), f"ALTER SCHEMA public OWNER TO {role}"
                )
            )
            yield role, database
    finally:
        asyncio.run(servers._admin(admin, f"DROP ROLE IF EXISTS {role}"))


@pytest.mark.postgresql
def test_a_percent_encoded_password_with_at_slash_query_and_hash_migrates(
    postgresql_admin_url: str, role_with_a_hostile_password: tuple[str, str]
) -> None:
    role, database = role_with_a_hostile_password
    server = postgresql_admin_url.split("@", 1)[1].rsplit("/", 1)[0]
    encoded = f"postgresql://{role}:{_ENCODED}@{server}/{database}"

    _ran(encoded, "upgrade", "head")
    assert _ran(encoded, "current").strip() == f"{HEAD} (head)"

    # Raw, the URL is ambiguous: refused with how to encode it, the password not shown.
    raw = _failure(_alembic(f"postgresql://{role}:{_PASSWORD}@{server}/{database}", "current"))
    assert "percent-encode" in raw
    assert "ss/?#w" not in raw and "ss%2F" not in raw
    # A failure names the database (server and name), never the password.
    missing = _failure(_alembic(f"postgresql://{role}:{_ENCODED}@{server}/no_such_db", "current"))
    assert f"{server}/no_such_db" in missing
    assert "ss%2F" not in missing and "ss/?#w" not in missing


@pytest.mark.sqlite
def test_alembic_upgrade_creates_the_directories_of_a_new_file_as_the_library_does(
    tmp_path: Path,
) -> None:
    """Found by attack: `alembic upgrade head` failed ("unable to open database file")
    on a path whose directories `persistence upgrade` creates."""
    path = tmp_path / "new" / "deeper" / "store.db"

    _ran(f"sqlite:///{path}", "upgrade", "head")

    assert _ran(f"sqlite:///{path}", "current").strip() == f"{HEAD} (head)"
    # A reading command creates nothing.
    assert "no database at" in _failure(
        _alembic(f"sqlite:///{tmp_path / 'other' / 'x.db'}", "current")
    )
    assert sorted(os.listdir(tmp_path)) == ["new"]
