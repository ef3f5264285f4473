"""A SQLite storage grows its WAL file once when it opens (persistence.sql.wal_reserve).

What it must never do: commit anything, change the data, wait for another writer, or
leave a trace when the process dies half way.
"""

from __future__ import annotations

import asyncio
import sqlite3
import sys
import time
from pathlib import Path

import pytest

from persistence import SQLiteSessionStorage
from persistence.sql import wal_reserve
from persistence.sql.wal_reserve import reserve_wal
from tests.factories import conversation


def _wanted(path: Path) -> int:
    """The WAL's size at `wal_autocheckpoint` frames of the store's page size."""
    with sqlite3.connect(path) as connection:
        page_size = connection.execute("PRAGMA page_size").fetchone()[0]
        frames = connection.execute("PRAGMA wal_autocheckpoint").fetchone()[0]
    return 32 + frames * (24 + page_size)


def _wal(path: Path) -> Path:
    return path.with_name(path.name + "-wal")


def _tables(path: Path) -> list[str]:
    connection = sqlite3.connect(path)
    try:
        assert connection.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        rows = connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        return sorted(row[0] for row in rows)
    finally:
        connection.close()


async def test_initialize_grows_the_wal_once_and_commits_nothing(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    async with SQLiteSessionStorage(path) as storage:
        reserved = _wal(path).stat().st_size
        assert reserved >= _wanted(path)
        assert "persistence_wal_reserve" not in _tables(path)
        sessions = [conversation(3) for _ in range(20)]
        for session in sessions:
            await storage.save_session(session)
        # The saves wrote their frames over the reserved ones: the file did not grow.
        assert _wal(path).stat().st_size == reserved
    async with SQLiteSessionStorage(path) as storage:
        for session in sessions:
            assert await storage.load_session(session.session_id) == session
    assert "persistence_wal_reserve" not in _tables(path)


async def test_a_store_opened_for_reading_reserves_nothing(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    async with SQLiteSessionStorage(path) as storage:
        await storage.save_session(conversation(2))
    assert not _wal(path).exists()  # the last connection's close removed it
    storage = SQLiteSessionStorage(path)
    await storage.open_for_reading()
    try:
        assert len(await storage.list_sessions()) == 1
        assert not _wal(path).exists() or _wal(path).stat().st_size < _wanted(path)
    finally:
        await storage.close()


def test_it_never_waits_for_another_writer(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    writer = sqlite3.connect(path, isolation_level=None)
    writer.execute("PRAGMA journal_mode = WAL")
    writer.execute("CREATE TABLE t (x)")
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("INSERT INTO t VALUES (1)")
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("PRAGMA busy_timeout = 5000")
    other.execute("PRAGMA cache_size = -4096")
    try:
        started = time.monotonic()
        assert reserve_wal(other, path, 5000) == 0
        assert time.monotonic() - started < 2
        # Its own settings are put back as they were.
        assert other.execute("PRAGMA busy_timeout").fetchone()[0] == 5000
        assert other.execute("PRAGMA cache_size").fetchone()[0] == -4096
        assert not other.in_transaction
        writer.execute("COMMIT")
        assert reserve_wal(other, path, 5000) > 0
        assert reserve_wal(other, path, 5000) == 0  # large enough now
        assert other.execute("SELECT x FROM t").fetchall() == [(1,)]
    finally:
        other.close()
        writer.close()


async def test_a_symlinked_path_grows_the_file_it_names(tmp_path: Path) -> None:
    target = tmp_path / "real.db"
    async with SQLiteSessionStorage(target):
        pass
    link = tmp_path / "link.db"
    link.symlink_to(target)
    async with SQLiteSessionStorage(link) as storage:
        await storage.save_session(conversation(1))
        assert _wal(target).stat().st_size >= _wanted(target)
        connection = sqlite3.connect(link, isolation_level=None)
        try:
            assert reserve_wal(connection, link, 5000) == 0
        finally:
            connection.close()


_KILLED_MID_RESERVE = """
import os, signal, sqlite3, sys
connection = sqlite3.connect(sys.argv[1], isolation_level=None)
connection.execute("PRAGMA cache_size = 16")
connection.execute("BEGIN IMMEDIATE")
connection.execute("CREATE TABLE persistence_wal_reserve (page BLOB)")
connection.execute(
    "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 2000)"
    " INSERT INTO persistence_wal_reserve SELECT zeroblob(3000) FROM n"
)
connection.execute("DELETE FROM chat_messages")
os.kill(os.getpid(), signal.SIGKILL)
"""


async def test_a_process_killed_while_reserving_leaves_the_store_as_it_was(
    tmp_path: Path,
) -> None:
    path = tmp_path / "s.db"
    session = conversation(4)
    async with SQLiteSessionStorage(path) as storage:
        await storage.save_session(session)
        # While the storage is open its WAL holds the session: the child's frames of no
        # commit are written after it, then the child dies inside its transaction.
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _KILLED_MID_RESERVE, str(path), stderr=asyncio.subprocess.PIPE
        )
        _, stderr = await child.communicate()
        assert child.returncode == -9, stderr
        assert _wal(path).stat().st_size > 2000 * 4096
        assert await storage.load_session(session.session_id) == session
    assert "persistence_wal_reserve" not in _tables(path)
    async with SQLiteSessionStorage(path) as storage:
        assert await storage.load_session(session.session_id) == session
        session.add_message("user", "after")
        assert await storage.save_session(session)
    async with SQLiteSessionStorage(path) as storage:
        assert await storage.load_session(session.session_id) == session


def _store(path: Path, page_size: int = 4096) -> sqlite3.Connection:
    connection = sqlite3.connect(path, isolation_level=None)
    connection.execute(f"PRAGMA page_size = {page_size}")
    connection.execute("PRAGMA journal_mode = WAL")
    connection.execute("CREATE TABLE t (x)")
    connection.execute("INSERT INTO t VALUES (1)")
    return connection


def test_large_pages_reserve_no_more_than_the_default_wal(tmp_path: Path) -> None:
    """Found by attack: with 64 KiB pages the reserve was 66 MB and an open took ten
    times as long."""
    path = tmp_path / "s.db"
    connection = _store(path, page_size=65536)
    try:
        assert reserve_wal(connection, path, 5000) > 0
        # The cap, and a few frames for the table's schema and interior pages (not the
        # 66 MB of 1,000 frames).
        assert _wal(path).stat().st_size <= wal_reserve._MAX_RESERVE + 8 * (24 + 65536)
        assert connection.execute("SELECT x FROM t").fetchall() == [(1,)]
    finally:
        connection.close()


def test_a_nearly_full_disk_is_left_its_free_space(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by attack: on a nearly full disk the reserve took the last free space, the
    checkpoint could not grow the database, and the WAL was never emptied."""
    path = tmp_path / "s.db"
    connection = _store(path)
    before = _wal(path).stat().st_size
    wanted = _wanted(path)
    try:
        # Free space for the reserve but not the margin beyond it: nothing is written.
        monkeypatch.setattr(wal_reserve, "_free_bytes", lambda directory: 2 * wanted)
        assert reserve_wal(connection, path, 5000) == 0
        assert _wal(path).stat().st_size == before
        monkeypatch.setattr(
            wal_reserve, "_free_bytes", lambda directory: wanted + wal_reserve._FREE_MARGIN
        )
        assert reserve_wal(connection, path, 5000) > 0
    finally:
        connection.close()


def test_a_write_that_fails_half_way_leaves_the_wal_its_size(tmp_path: Path) -> None:
    """A full disk half way through the reserve (here the database's page limit, which
    fails the same way, SQLITE_FULL, after a few hundred frames were spilled): the file
    is cut back under the write lock, and the store goes on as before."""
    path = tmp_path / "s.db"
    connection = _store(path)
    try:
        pages = connection.execute("PRAGMA page_count").fetchone()[0]
        connection.execute(f"PRAGMA max_page_count = {pages + 300}")
        before = _wal(path).stat().st_size
        assert reserve_wal(connection, path, 5000) == 0
        assert _wal(path).stat().st_size == before
        assert not connection.in_transaction
        connection.execute("INSERT INTO t VALUES (2)")
        assert connection.execute("SELECT x FROM t").fetchall() == [(1,), (2,)]
    finally:
        connection.close()
    other = sqlite3.connect(path)
    try:
        assert other.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert other.execute("SELECT x FROM t").fetchall() == [(1,), (2,)]
    finally:
        other.close()
