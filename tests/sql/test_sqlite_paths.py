"""SQLite paths: what is not a database file is refused clearly, never replaced."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from persistence import (
    ChatSession,
    InvalidDataError,
    PersistenceError,
    SQLiteSessionStorage,
    StorageConnectionError,
)
from tests.filesystems import mounted_tmpfs

pytestmark = pytest.mark.sqlite


async def _refused(path: Path, match: str) -> None:
    for opening in ("initialize", "open_for_reading"):
        storage = SQLiteSessionStorage(path)
        with pytest.raises(StorageConnectionError, match=match):
            await getattr(storage, opening)()
        await storage.close()


async def test_a_directory_is_refused(tmp_path: Path) -> None:
    await _refused(tmp_path, "is a directory")
    assert os.listdir(tmp_path) == []


async def test_a_parent_that_is_a_file_is_refused(tmp_path: Path) -> None:
    parent = tmp_path / "notes.txt"
    parent.write_text("mine")

    await _refused(parent / "sessions.db", "notes.txt is a file, not a directory")
    assert parent.read_text() == "mine"


async def test_a_fifo_is_refused_and_left_in_place(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)

    await _refused(fifo, "is a FIFO")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


async def test_a_symlink_to_a_fifo_or_to_nothing_is_refused(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "to-pipe").symlink_to(tmp_path / "pipe")
    (tmp_path / "dangling").symlink_to(tmp_path / "missing.db")

    await _refused(tmp_path / "to-pipe", "is a FIFO")
    await _refused(tmp_path / "dangling", "does not exist")
    assert not (tmp_path / "missing.db").exists()
    assert (tmp_path / "dangling").is_symlink()


async def test_a_symlink_to_a_database_file_is_followed(tmp_path: Path) -> None:
    async with SQLiteSessionStorage(tmp_path / "real.db") as storage:
        await storage.save_session(ChatSession.create("m"))
    (tmp_path / "link.db").symlink_to(tmp_path / "real.db")

    async with SQLiteSessionStorage(tmp_path / "link.db") as storage:
        assert (await storage.count()).total_sessions == 1
    assert (tmp_path / "link.db").is_symlink()


async def test_a_relative_path_keeps_its_file_after_a_change_of_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by attack: opened as `rel.db`, then the process changed directory (as a
    daemon does): every later call was refused as a file replaced while open, and the
    pool's next connection would have opened `rel.db` in the new directory."""
    first, later = tmp_path / "first", tmp_path / "later"
    first.mkdir()
    later.mkdir()
    monkeypatch.chdir(first)
    storage = SQLiteSessionStorage("rel.db")
    await storage.initialize()
    try:
        session = ChatSession.create("m", session_id="a")
        session.add_message("user", "before the chdir")
        await storage.save_session(session)
        monkeypatch.chdir(later)
        session.add_message("user", "after the chdir")
        assert await storage.save_session(session)
        assert await storage.load_session("a") == session
        await storage.engine.dispose()  # the pool's next connection opens afresh
        async with storage.unit_of_work() as uow:
            await uow.sessions.add(ChatSession.create("m", session_id="b"))
            await uow.commit()
        assert [m.content for m in await storage.search_messages("chdir")] == [
            "after the chdir",
            "before the chdir",
        ]
        assert storage.database_path == Path("rel.db")
    finally:
        await storage.close()
    assert not (later / "rel.db").exists()
    async with SQLiteSessionStorage(first / "rel.db") as reopened:
        assert sorted(s.session_id for s in await reopened.list_sessions()) == ["a", "b"]


async def test_reading_a_missing_file_creates_nothing(tmp_path: Path) -> None:
    await _refused_reading(tmp_path / "nothing.db")
    assert os.listdir(tmp_path) == []


async def _refused_reading(path: Path) -> None:
    storage = SQLiteSessionStorage(path)
    with pytest.raises(StorageConnectionError, match="no database at"):
        await storage.open_for_reading()
    await storage.close()


async def test_a_read_only_database_is_read_without_writing_it(tmp_path: Path) -> None:
    directory = tmp_path / "ro"
    directory.mkdir()
    path = directory / "sessions.db"
    async with SQLiteSessionStorage(path) as storage:
        session = ChatSession.create("m")
        session.add_message("user", "kept")
        await storage.save_session(session)
    before = path.read_bytes()
    path.chmod(0o444)
    directory.chmod(0o555)
    try:
        storage = SQLiteSessionStorage(path)
        await storage.open_for_reading()
        try:
            assert (await storage.count()).messages == 1
            assert [s.session_id for s in await storage.list_sessions()] == [session.session_id]
        finally:
            await storage.close()
    finally:
        directory.chmod(0o755)
        path.chmod(0o644)
    assert path.read_bytes() == before


async def test_a_file_name_that_is_not_utf8_is_opened_again(tmp_path: Path) -> None:
    # Linux file names are bytes: b"caf\xe9.db" (Latin-1) decodes with a surrogate.
    path = Path(os.fsdecode(os.fsencode(tmp_path) + b"/caf\xe9.db"))
    async with SQLiteSessionStorage(path) as storage:
        await storage.save_session(ChatSession.create("m"))
    async with SQLiteSessionStorage(path) as storage:
        assert (await storage.count()).total_sessions == 1
    storage = SQLiteSessionStorage(path)
    try:
        await storage.open_for_reading()
        assert (await storage.count()).total_sessions == 1
    finally:
        await storage.close()
    assert all(name.startswith(b"caf\xe9.db") for name in os.listdir(os.fsencode(tmp_path)))


@pytest.mark.parametrize(
    "url", ["sqlite:///sessions.db", "SQLite+aiosqlite:///sessions.db", "file:sessions.db"]
)
def test_a_url_given_as_the_path_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, url: str
) -> None:
    """Found by audit: it made a directory named `sqlite:` and a store inside it."""
    monkeypatch.chdir(tmp_path)

    with pytest.raises(
        InvalidDataError, match="is not a file path; give SQLiteSessionStorage the file"
    ):
        SQLiteSessionStorage(url)

    assert list(tmp_path.iterdir()) == []


def test_another_databases_url_given_as_the_path_is_refused_unshown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by attack: it made a SQLite store under ./postgresql:/app:secret@db/."""
    monkeypatch.chdir(tmp_path)

    with pytest.raises(InvalidDataError) as refused:
        SQLiteSessionStorage("postgresql://app:s3cret@db/app")

    assert str(refused.value) == (
        "database_path: a postgresql: URL (not shown: it may hold a password) is not a file"
        " path; give SQLiteSessionStorage the file's path, or the URL to create_storage,"
        " StorageConfig or --url"
    )
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def tiny_filesystem(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs of 8 MB and 4 inodes (root only; skipped where it cannot be mounted)."""
    with mounted_tmpfs(tmp_path / "tiny", "size=8m,nr_inodes=4") as mount:
        yield mount


async def test_a_store_on_a_filesystem_out_of_inodes_says_so(
    tiny_filesystem: Path, tmp_path: Path
) -> None:
    """Found by attack: it failed as "unable to open database file", naming neither
    the cause nor the filesystem (SQLite could not create the -wal and -shm)."""
    made = tmp_path / "made.db"
    async with SQLiteSessionStorage(made) as storage:
        await storage.save_session(ChatSession.create("m", session_id="s1"))
    copied = tiny_filesystem / "s.db"
    shutil.copyfile(made, copied)
    filler = 0
    while True:  # the last free inodes
        try:
            (tiny_filesystem / f"filler-{filler}").touch()
        except OSError:
            break
        filler += 1

    with pytest.raises(PersistenceError, match="has no free inodes left"):
        async with SQLiteSessionStorage(copied) as storage:
            await storage.list_sessions()


def _remount_read_only(mount: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)


async def test_a_store_on_a_read_only_filesystem_says_so_and_is_read(
    tiny_filesystem: Path, tmp_path: Path
) -> None:
    """Found by attack: an existing store there was "unreachable (unable to open
    database file)", and a new one "permission denied"."""
    made = tmp_path / "made.db"
    async with SQLiteSessionStorage(made) as storage:
        await storage.save_session(ChatSession.create("m", session_id="s1"))
    copied = tiny_filesystem / "s.db"
    shutil.copyfile(made, copied)
    _remount_read_only(tiny_filesystem)

    with pytest.raises(StorageConnectionError) as raised:
        async with SQLiteSessionStorage(copied) as storage:
            pass
    assert str(raised.value).startswith(
        f"cannot write {copied}: its directory {tiny_filesystem} is on a read-only file system"
    )
    with pytest.raises(StorageConnectionError) as raised:
        async with SQLiteSessionStorage(tiny_filesystem / "new.db") as storage:
            pass
    assert str(raised.value) == (
        f"cannot create {tiny_filesystem / 'new.db'}: its directory {tiny_filesystem} is on"
        " a read-only file system"
    )
    reader = SQLiteSessionStorage(copied)
    try:
        await reader.open_for_reading()
        assert [s.session_id for s in await reader.list_sessions()] == ["s1"]
    finally:
        await reader.close()
