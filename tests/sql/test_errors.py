"""Driver failures reach the caller as the library's errors, quickly and without secrets."""

from __future__ import annotations

import sqlite3
import time
import uuid
from functools import partial
from pathlib import Path

import pytest

from persistence import (
    ChatSession,
    InvalidDataError,
    PersistenceError,
    PostgreSQLSessionStorage,
    SQLiteSessionStorage,
    StorageConnectionError,
)
from persistence.sql import repositories
from persistence.sql.errors import translate


async def test_an_unreachable_postgresql_server_fails_fast_without_the_password() -> None:
    storage = PostgreSQLSessionStorage(
        "postgresql://app:canary-secret@127.0.0.1:1/app", connect_timeout=3
    )
    started = time.monotonic()

    with pytest.raises(StorageConnectionError) as raised:
        await storage.initialize()

    assert time.monotonic() - started < 5
    assert "canary-secret" not in str(raised.value)
    assert "canary-secret" not in repr(storage)
    assert raised.value.__cause__ is not None
    await storage.close()


def test_postgresql_url_forms_are_accepted_and_others_refused() -> None:
    for url in (
        "postgresql://u@h/db",
        "postgresql+asyncpg://u@h/db",
        "postgres://u@h/db",
    ):
        assert PostgreSQLSessionStorage(url).url.drivername == "postgresql+asyncpg"
    with pytest.raises(InvalidDataError, match="not PostgreSQL"):
        PostgreSQLSessionStorage("mysql://u:secret@h/db")
    with pytest.raises(InvalidDataError, match="pool sizes"):
        PostgreSQLSessionStorage("postgresql://u@h/db", min_pool_size=5, max_pool_size=2)


async def test_a_file_that_is_not_a_database_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "not-a-db.db"
    path.write_bytes(b"this is not a SQLite database, just some text" * 100)

    with pytest.raises(PersistenceError, match="not a SQLite database"):
        await SQLiteSessionStorage(path).initialize()


async def test_a_database_in_an_unreadable_place_is_a_connection_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file where a directory should be")

    with pytest.raises((StorageConnectionError, OSError)):
        await SQLiteSessionStorage(blocker / "sessions.db").initialize()


async def test_using_a_storage_before_initialize_is_a_clear_error(tmp_path: Path) -> None:
    storage = SQLiteSessionStorage(tmp_path / "s.db")

    with pytest.raises(PersistenceError, match="initialize"):
        await storage.save_session(ChatSession.create("m"))


async def test_the_context_manager_initializes_and_closes(tmp_path: Path) -> None:
    async with SQLiteSessionStorage(tmp_path / "s.db") as storage:
        await storage.save_session(ChatSession.create("m"))

    with pytest.raises(PersistenceError, match="closed"):
        await storage.list_sessions()


@pytest.mark.postgresql
async def test_a_connection_that_cannot_be_opened_mid_life_is_a_library_error(
    postgresql_admin_url: str,
) -> None:
    # Reads and writes check connections out of the pool themselves (sql/checkout.py):
    # the driver's refusal of a new connection must still reach the caller translated.
    from tests import servers

    name = f"persistence_test_{uuid.uuid4().hex[:12]}"
    await servers._admin(postgresql_admin_url, f'CREATE DATABASE "{name}"')
    url = servers.with_database(servers.plain_postgresql_url(postgresql_admin_url), name)
    storage = PostgreSQLSessionStorage(url, min_pool_size=1, max_pool_size=2)
    try:
        await storage.initialize()
        await storage.engine.dispose()  # no idle connection left to lend
        await servers._admin(postgresql_admin_url, f'DROP DATABASE "{name}" WITH (FORCE)')
        with pytest.raises(PersistenceError) as raised:
            await storage.load_session("anything")
        assert "does not exist" in str(raised.value)
    finally:
        await storage.close()
        await servers._admin(postgresql_admin_url, f'DROP DATABASE IF EXISTS "{name}"')


async def test_an_argument_asyncpg_cannot_encode_leaves_no_broken_connection(
    one_connection: PostgreSQLSessionStorage,
) -> None:
    """Found by attack: asyncpg (0.32) refuses such an argument after sending the
    statement's parse without a Sync, so the server keeps an implicit transaction open;
    the pooled connection then failed every snapshot read ("SET TRANSACTION ISOLATION
    LEVEL must be called before any query"). The library's checks keep such values
    out; this is the net under them: the connection is dropped."""
    storage = one_connection
    await storage.save_session(ChatSession.create("m", session_id="s1"))

    with pytest.raises(PersistenceError, match="invalid input for query argument"):
        await storage._run_stale(
            partial(repositories.read_file_record_batch, "", 2**70), "iterate file records"
        )

    assert [[s.session_id for s in batch] async for batch in storage.iter_sessions(10)] == [["s1"]]
    assert (await storage.count()).total_sessions == 1


@pytest.mark.parametrize(
    ("name", "code", "said"),
    [
        ("SQLITE_IOERR_SHMSIZE", 4874, "(SQLITE_IOERR_SHMSIZE): is the disk full"),
        ("SQLITE_IOERR_WRITE", 778, "(SQLITE_IOERR_WRITE): is the disk full"),
        # FTS5's failed writes, found by attack at a file size limit of 32 KB.
        ("SQLITE_IOERR", 10, "(SQLITE_IOERR): is the disk full"),
        ("SQLITE_IOERR_READ", 266, "a disk I/O error occurred (SQLITE_IOERR_READ)"),
    ],
)
def test_a_sqlite_io_error_names_sqlites_call_and_a_full_disk_where_it_may_be_one(
    name: str, code: int, said: str
) -> None:
    """Found by attack: a store reopened on a full disk (its -shm could not grow) said
    only "a disk I/O error occurred"."""
    error = sqlite3.OperationalError("disk I/O error")
    error.sqlite_errorcode, error.sqlite_errorname = code, name  # as sqlite3 sets them
    assert said in str(translate(error, "open s.db"))
    assert (code & 0xFF) == sqlite3.SQLITE_IOERR


@pytest.mark.parametrize(
    ("name", "code"), [("SQLITE_FULL", sqlite3.SQLITE_FULL), ("SQLITE_IOERR_WRITE", 778)]
)
def test_a_full_disk_may_be_sqlites_temporary_directory(name: str, code: int) -> None:
    """Found by attack: with SQLITE_TMPDIR on a full filesystem and the store's disk
    nearly empty, the error said only that the disk was full."""
    error = sqlite3.OperationalError("database or disk is full")
    error.sqlite_errorcode, error.sqlite_errorname = code, name
    said = str(translate(error, "insert sessions"))
    assert "disk full" in said or "disk is full" in said
    assert (
        "(the database's, or that of SQLite's temporary files: SQLITE_TMPDIR, TMPDIR or"
        " /var/tmp)" in said
    )
