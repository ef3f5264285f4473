"""A SQLite store's -wal and -shm changed under it, a file of two names, a file it cannot
create: refused with an error naming the file, never acknowledged and lost."""

from __future__ import annotations

import asyncio
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from persistence import ChatSession, PersistenceError, SQLiteSessionStorage, StorageConnectionError
from persistence.sql.opened_files import WAL_CHECK_SECONDS

pytestmark = pytest.mark.sqlite


def _session(session_id: str, text: str) -> ChatSession:
    session = ChatSession.create("m", session_id=session_id)
    session.add_message("user", text)
    return session


async def _stored(path: Path) -> dict[str, list[str]]:
    async with SQLiteSessionStorage(path) as storage:
        found = {}
        for summary in await storage.list_sessions():
            loaded = await storage.load_session(summary.session_id)
            assert loaded is not None
            found[loaded.session_id] = [message.content for message in loaded.messages]
    with sqlite3.connect(path) as connection:
        assert connection.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    connection.close()
    return found


@pytest.mark.parametrize("suffix", ["-wal", "-shm"])
async def test_a_removed_wal_or_shm_takes_no_write_and_closing_keeps_what_was_saved(
    tmp_path: Path, suffix: str
) -> None:
    """Found by attack: with the -wal removed, saves went on reporting success into the
    unlinked file, and after a kill all were gone; with the -shm removed, a second
    process indexed the -wal apart and the store was corrupt."""
    path = tmp_path / "live.db"
    storage = SQLiteSessionStorage(path)
    await storage.initialize()
    try:
        await storage.save_session(_session("before", "saved before the removal"))
        os.unlink(f"{path}{suffix}")
        # The -shm is checked by every transaction, the -wal at most every 0.1 s.
        await asyncio.sleep(WAL_CHECK_SECONDS)
        after = _session("after", "never acknowledged")
        with pytest.raises(PersistenceError, match=f"its {suffix} file .* replaced or removed"):
            await storage.save_session(after)
        with pytest.raises(PersistenceError, match=f"its {suffix} file"):
            async with storage.unit_of_work() as uow:
                await uow.sessions.add(_session("in-a-unit", "never acknowledged"))
                await uow.commit()
    finally:
        await storage.close()
    # Closing copied the -wal it still held into the database.
    assert await _stored(path) == {"before": ["saved before the removal"]}


async def test_a_file_with_two_names_is_refused_by_either(tmp_path: Path) -> None:
    """Found by attack: two storages through two hard links of one file each kept a -wal
    of their own; after 1,600 acknowledged saves `integrity_check` failed. In one
    process the second open failed as "disk I/O error"."""
    path, link = tmp_path / "live.db", tmp_path / "link.db"
    async with SQLiteSessionStorage(path) as storage:
        await storage.save_session(_session("kept", "one name"))
        os.link(path, link)
        for name in (link, path):
            with pytest.raises(StorageConnectionError, match=f"{name} has 2 hard links"):
                await SQLiteSessionStorage(name).initialize()
        # The storage opened before the link keeps working.
        await storage.save_session(_session("later", "still one writer"))
    link.unlink()
    assert await _stored(path) == {"kept": ["one name"], "later": ["still one writer"]}


async def test_a_file_that_is_not_a_database_is_named(tmp_path: Path) -> None:
    path = tmp_path / "notes.db"
    path.write_text("not a database\n" * 200)
    for reading in (False, True):
        storage = SQLiteSessionStorage(path)
        with pytest.raises(PersistenceError, match=f"{path} failed: the file is not a SQLite"):
            await (storage.open_for_reading() if reading else storage.initialize())
        await storage.close()


_WITHOUT_ROOTS_OVERRIDE = pytest.mark.skipif(
    os.geteuid() == 0 and shutil.which("setpriv") is None,
    reason="root creates files anywhere, and setpriv (to drop that) is not installed",
)


def _opened_in_a_read_only_directory(path: Path, directory: Path | None = None) -> str:
    """What initialize(), then open_for_reading(), of `path` say in a child process that
    may not write `directory` (by default the path's; its error, or `opened`), one line
    each."""
    script = (
        "import asyncio, sys\n"
        "from persistence import PersistenceError, SQLiteSessionStorage\n"
        "async def open_it(reading):\n"
        "    storage = SQLiteSessionStorage(sys.argv[1])\n"
        "    try:\n"
        "        await (storage.open_for_reading() if reading else storage.initialize())\n"
        "        print('opened')\n"
        "    except PersistenceError as exc:\n"
        "        print(type(exc).__name__, exc)\n"
        "    finally:\n"
        "        await storage.close()\n"
        "asyncio.run(open_it(False))\n"
        "asyncio.run(open_it(True))\n"
    )
    # Root may write anywhere: the capability that allows it is dropped for the child.
    drop = ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner", "--"]
    command = [*(drop if os.geteuid() == 0 else []), sys.executable, "-c", script, str(path)]
    directory = directory or path.parent
    directory.chmod(0o555)
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    finally:
        directory.chmod(0o755)
    assert done.returncode == 0, done.stderr
    return done.stdout


@_WITHOUT_ROOTS_OVERRIDE
def test_a_store_that_cannot_be_created_names_the_directory(tmp_path: Path) -> None:
    """Found by attack: SQLite's "unable to open database file" named neither."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    path = folder / "new.db"
    said = _opened_in_a_read_only_directory(path).splitlines()
    assert said[0] == (
        f"StorageConnectionError cannot create {path}: its directory {folder} is not writable"
    )
    assert not path.exists()


@_WITHOUT_ROOTS_OVERRIDE
async def test_a_store_in_a_directory_that_cannot_be_written_says_so_and_is_read(
    tmp_path: Path,
) -> None:
    """Found by attack: initialize() of an existing store there said "database
    unreachable (OperationalError: unable to open database file)"."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    path = folder / "store.db"
    async with SQLiteSessionStorage(path) as storage:
        await storage.save_session(ChatSession.create("m", session_id="kept"))
    said = _opened_in_a_read_only_directory(path).splitlines()
    assert said == [
        f"StorageConnectionError cannot write {path}: its directory {folder} is not"
        " writable (to write, SQLite"
        " makes the -wal and -shm files beside the database; it can still be opened for"
        " reading)",
        "opened",
    ]
    assert sorted(p.name for p in folder.iterdir()) == ["store.db"]


@_WITHOUT_ROOTS_OVERRIDE
async def test_the_directory_is_named_only_where_it_stops_the_writing(tmp_path: Path) -> None:
    """Found by attack: the directory was blamed for a file of mode 000 (which cannot
    be read either), and for a -wal of mode 0444 that SQLite need not make; and a store
    reached through a symlink had the link's directory checked, not the file's."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    path = folder / "store.db"
    async with SQLiteSessionStorage(path) as storage:
        await storage.save_session(ChatSession.create("m", session_id="kept"))

    path.chmod(0o000)
    try:
        said = _opened_in_a_read_only_directory(path)
    finally:
        path.chmod(0o644)
    assert "its directory" not in said, said

    # A writer killed with its -wal and -shm still there; the -wal read-only.
    (folder / "store.db-wal").write_bytes(b"")
    (folder / "store.db-shm").write_bytes(b"")
    (folder / "store.db-wal").chmod(0o444)
    said = _opened_in_a_read_only_directory(path)
    assert "its directory" not in said, said
    for sidecar in ("store.db-wal", "store.db-shm"):
        (folder / sidecar).unlink()

    # Through a symlink in a writable directory: the file's directory stops it.
    link = tmp_path / "link.db"
    link.symlink_to(path)
    said = _opened_in_a_read_only_directory(link, directory=folder).splitlines()
    assert said[0].startswith(
        f"StorageConnectionError cannot write {link}: its directory {folder} is not writable"
    )
    assert said[1] == "opened"
