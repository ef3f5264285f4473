"""How a SQLite store is opened read-only (engines.sqlite_reading_target): what it reads
is the committed state, through a symlink and in a directory that cannot be written."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from persistence import SQLiteSessionStorage, StorageConnectionError
from tests.directories import unwritable

pytestmark = pytest.mark.sqlite

ROOT = Path(__file__).resolve().parents[2]

# Saves a session; with "leave", ends the process before any checkpoint, so the
# session is committed in the -wal only.
_SAVE = """
import asyncio, os, sys
from persistence import ChatSession, SQLiteSessionStorage

async def main(path, session_id, leave):
    storage = SQLiteSessionStorage(path)
    await storage.initialize()
    session = ChatSession.create("m", session_id=session_id)
    session.add_message("user", "hello")
    await storage.save_session(session)
    if leave:
        os._exit(0)
    await storage.close()

asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3] == "1"))
"""


def _save(path: Path, session_id: str, *, leave_in_the_wal: bool = False) -> None:
    subprocess.run(
        [sys.executable, "-c", _SAVE, str(path), session_id, str(int(leave_in_the_wal))],
        check=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def _listed(path: Path) -> list[str]:
    async def listing() -> list[str]:
        storage = SQLiteSessionStorage(path)
        await storage.open_for_reading()
        try:
            return sorted(session.session_id for session in await storage.list_sessions())
        finally:
            await storage.close()

    return asyncio.run(listing())


def _stats(path: Path) -> subprocess.CompletedProcess[str]:
    """`persistence stats` of the store at `path`, run as an operator would."""
    return subprocess.run(
        [sys.executable, "-m", "persistence", "--url", f"sqlite:///{path}", "stats"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
    )


def test_a_symlink_in_an_unwritable_directory_reads_the_wal_beside_its_target(
    tmp_path: Path,
) -> None:
    """Found by attack: immutable was chosen by the symlink's own directory, so the
    committed -wal beside its target was ignored: a session was missing from listings,
    and `backup` through the link lost it and exited 0."""
    data, links = tmp_path / "data", tmp_path / "links"
    data.mkdir()
    links.mkdir()
    store = data / "s.db"
    _save(store, "A")
    _save(store, "B", leave_in_the_wal=True)
    assert Path(f"{store}-wal").stat().st_size > 0
    link = links / "s.db"
    link.symlink_to(store)
    with unwritable(links):
        assert _listed(link) == ["A", "B"]


def test_a_wal_store_in_an_unwritable_directory_with_a_finished_journal_is_read(
    tmp_path: Path,
) -> None:
    """Found by attack: any -journal that was not empty counted as hot, so a WAL store
    beside one a PERSIST-mode writer had left (its header zeroed) could not be read."""
    store = tmp_path / "store"
    store.mkdir()
    path = store / "s.db"
    _save(path, "A")
    assert not Path(f"{path}-wal").exists()
    Path(f"{path}-journal").write_bytes(bytes(8720))
    with unwritable(store):
        assert _listed(path) == ["A"]


@pytest.mark.parametrize("suffix", ["-journal", "-wal"])
def test_a_fifo_or_directory_where_a_journal_goes_is_refused_at_once(
    tmp_path: Path, suffix: str
) -> None:
    """Found by attack: a FIFO named `s.db-journal` made every read wait for good
    (SQLite opens it to look for a hot journal); a directory there gave "disk I/O error"."""
    path = tmp_path / "s.db"
    _save(path, "A")
    for make, what in ((os.mkfifo, "a FIFO"), (os.mkdir, "a directory")):
        journal = Path(f"{path}{suffix}")
        make(journal)
        done = _stats(path)
        assert done.returncode == 1, done
        assert f"{journal} is {what} where {path} keeps its" in done.stderr, done.stderr
        journal.rmdir() if journal.is_dir() else journal.unlink()


def test_a_wal_that_is_there_even_empty_keeps_the_open_from_being_immutable(
    tmp_path: Path,
) -> None:
    """Found by attack: beside an empty -wal and no -shm, the file was opened immutable,
    but a writer in EXCLUSIVE locking mode needs no -shm and committed into that -wal
    unseen by the open reader."""
    from persistence.sql.engines import sqlite_reading_target

    store = tmp_path / "store"
    store.mkdir()
    path = store / "s.db"
    _save(path, "A")
    with unwritable(store):
        assert "immutable=1" in sqlite_reading_target(path)
    Path(f"{path}-wal").write_bytes(b"")
    with unwritable(store), pytest.raises(StorageConnectionError, match="-shm is missing"):
        sqlite_reading_target(path)


@pytest.mark.parametrize("through_a_link", [False, True], ids=["file", "link"])
def test_a_wal_without_its_shm_in_an_unwritable_directory_is_refused_by_name(
    tmp_path: Path, through_a_link: bool
) -> None:
    """Found by attack: a store whose -wal holds commits, its -shm removed, in a
    directory that cannot be written, gave SQLite's "unable to open database file"
    (SQLite reads a -wal through the -shm, and cannot make one there). The error now
    names the missing -shm and the directory; once the -shm is there, it is read."""
    data = tmp_path / "data"
    data.mkdir()
    path = data / "s.db"
    _save(path, "A")
    _save(path, "B", leave_in_the_wal=True)
    shm = Path(f"{path}-shm")
    shm.unlink(missing_ok=True)
    opened = path
    if through_a_link:
        opened = tmp_path / "link.db"
        opened.symlink_to(path)
    with unwritable(data):
        done = _stats(opened)
    assert done.returncode == 1, done
    assert f"{shm} is missing and cannot be made ({data} is not writable)" in done.stderr
    assert f"cannot read {opened}" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert Path(f"{path}-wal").stat().st_size > 0 and not shm.exists()
    assert _listed(opened) == ["A", "B"]


def test_a_rollback_store_beside_a_stray_empty_wal_is_still_read(tmp_path: Path) -> None:
    """Found by attack: once a -wal without a -shm was refused, a rollback-mode store
    beside a stray empty -wal (which SQLite reads without a -shm) was refused too."""
    store = tmp_path / "store"
    store.mkdir()
    path = store / "s.db"
    _save(path, "A")
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode=DELETE").fetchone() == ("delete",)
    db.close()
    Path(f"{path}-wal").write_bytes(b"")
    assert not Path(f"{path}-shm").exists()
    with unwritable(store):
        assert _listed(path) == ["A"]
