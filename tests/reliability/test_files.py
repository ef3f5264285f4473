"""Exports and backups: 0600 files, 0700 directories, no symlink followed, nothing
written outside the directory they were given, no partial file on failure."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from persistence import ChatSession, SessionManager, SessionStorage
from persistence.clock import utc_now
from persistence.errors import MigrationError
from persistence.transfer import backup_storage, export_to_json
from tests.reliability.conftest import Figures

VICTIM_TEXT = "the victim file must never change\n"


@pytest.fixture
def open_umask() -> Iterator[None]:
    """A umask of 0, so a mode the library does not set itself would show up."""
    previous = os.umask(0)
    try:
        yield
    finally:
        os.umask(previous)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def _tree(root: Path) -> dict[str, str]:
    """Every entry under `root`: relative path -> kind (file, dir, link)."""
    entries = {}
    for path in root.rglob("*"):
        kind = "link" if path.is_symlink() else "dir" if path.is_dir() else "file"
        entries[str(path.relative_to(root))] = kind
    return entries


async def _stored(storage: SessionStorage, sessions: int = 5) -> str:
    first = ""
    for index in range(sessions):
        session = ChatSession.create("files", session_id=f"files-{index}")
        session.add_message("user", f"message {index}")
        await storage.save_session(session)
        first = first or session.session_id
    return first


async def test_exports_and_backups_are_0600_in_0700_directories(
    sql_storage: SessionStorage, tmp_path: Path, open_umask: None
) -> None:
    session_id = await _stored(sql_storage)
    export = await export_to_json(sql_storage, tmp_path / "all.json")
    assert _mode(Path(export["path"])) == 0o600
    backup = await backup_storage(sql_storage, tmp_path / "backups")
    assert _mode(Path(backup["path"])) == 0o600
    assert _mode(tmp_path / "backups") == 0o700
    manager = SessionManager(sql_storage)
    for fmt in ("json", "text", "markdown"):
        target = tmp_path / f"one.{fmt}"
        assert await manager.export_to_file(session_id, target, fmt) is True
        assert _mode(target) == 0o600, fmt


async def test_a_planted_symlink_at_the_export_path_is_never_followed(
    sql_storage: SessionStorage, tmp_path: Path
) -> None:
    session_id = await _stored(sql_storage)
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "victim"
    victim.write_text(VICTIM_TEXT)
    exports = tmp_path / "exports"
    exports.mkdir()
    targets = {"all.json": None, "one.json": "json", "one.md": "markdown"}
    for name in targets:
        (exports / name).symlink_to(victim)
    # export_to_json (and the CLI's output files) refuse the link, leaving it as it is.
    with pytest.raises(MigrationError, match="symbolic link"):
        await export_to_json(sql_storage, exports / "all.json")
    assert (exports / "all.json").is_symlink()
    # SessionManager.export_to_file replaces the link itself.
    manager = SessionManager(sql_storage)
    for name, fmt in targets.items():
        if fmt is not None:
            await manager.export_to_file(session_id, exports / name, fmt)
    assert victim.read_text() == VICTIM_TEXT
    for name in ("one.json", "one.md"):
        assert not (exports / name).is_symlink(), name
        assert (exports / name).stat().st_size > 0
    assert _tree(outside) == {"victim": "file"}


def _check_backup_beside_the_links(path: Path, backups: Path, victim: Path, planted: int) -> None:
    assert path.parent == backups and not path.is_symlink() and _mode(path) == 0o600
    assert path.read_bytes()[:16] == b"SQLite format 3\x00"
    assert victim.read_text() == VICTIM_TEXT
    links = [p for p in backups.iterdir() if p.is_symlink()]
    assert len(links) == planted and all(p.resolve() == victim for p in links)


async def test_a_backup_never_follows_or_overwrites_a_planted_symlink(
    sqlite_storage: SessionStorage, tmp_path: Path, figures: Figures
) -> None:
    await _stored(sqlite_storage)
    victim = tmp_path / "victim"
    victim.write_text(VICTIM_TEXT)
    backups = tmp_path / "backups"
    backups.mkdir(mode=0o700)
    # Every name the backup could take in the next seconds already points at the victim.
    start = utc_now()
    planted = 0
    for ms in range(0, 4000):
        moment = start + timedelta(milliseconds=ms)
        stem = f"persistence-sqlite-{moment:%Y%m%dT%H%M%S}{moment.microsecond // 1000:03d}Z"
        (backups / f"{stem}.sqlite3").symlink_to(victim)
        planted += 1
    result = await backup_storage(sqlite_storage, backups)
    _check_backup_beside_the_links(Path(result["path"]), backups, victim, planted)
    figures["symlinks_planted"] = planted


async def test_exports_and_backups_write_only_where_they_were_told(
    sql_storage: SessionStorage, tmp_path: Path
) -> None:
    hostile = ChatSession.create("../../etc", session_id="../../../escape")
    hostile.add_message("user", "../" * 10)
    await sql_storage.save_session(hostile)
    await _stored(sql_storage)
    work = tmp_path / "work"
    work.mkdir()
    before = _tree(tmp_path)
    export = await export_to_json(sql_storage, work / "all.json")
    backup = await backup_storage(sql_storage, work / "backups")
    manager = SessionManager(sql_storage)
    await manager.export_to_file(hostile.session_id, work / "one.md", "markdown")
    after = _tree(tmp_path)
    added = {name: kind for name, kind in after.items() if name not in before}
    expected = {
        str(Path(export["path"]).relative_to(tmp_path)): "file",
        "work/backups": "dir",
        str(Path(backup["path"]).relative_to(tmp_path)): "file",
        "work/one.md": "file",
    }
    assert added == expected


async def test_an_export_into_a_missing_directory_is_a_clear_error(
    sql_storage: SessionStorage, tmp_path: Path
) -> None:
    before = _tree(tmp_path)
    with pytest.raises(MigrationError, match="missing: no such directory"):
        await export_to_json(sql_storage, tmp_path / "missing" / "all.json")
    assert _tree(tmp_path) == before


async def test_missing_parent_directories_of_a_backup_are_0700_too(
    sqlite_storage: SessionStorage, tmp_path: Path, open_umask: None
) -> None:
    await _stored(sqlite_storage, 1)
    await backup_storage(sqlite_storage, tmp_path / "new" / "backups")
    assert _mode(tmp_path / "new" / "backups") == 0o700
    assert _mode(tmp_path / "new") == 0o700
