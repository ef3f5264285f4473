"""Scratch files of transfers killed with SIGKILL: none is left for good.

A process killed with SIGKILL runs no clean-up. Found by attack: each import killed so
left a `persistence-import-*` directory, each restore a `persistence-restore-*` one
holding a full copy of its backup, each export a hidden partial file beside its
destination. The children here kill themselves at a set point of the work.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from persistence import ChatSession, SQLiteSessionStorage
from persistence.transfer import backup_storage, export_to_json, restore_backup
from persistence.transfer.scratch import partial_file, scratch_directory
from tests.factories import conversation
from tests.reliability.support import child_env

pytestmark = pytest.mark.sqlite

# Runs a transfer and kills itself with SIGKILL at the first step it reports.
_KILLED = """
import asyncio, os, signal, sys
from persistence import SQLiteSessionStorage
from persistence.transfer import export_to_json, import_from_json, restore_backup
from persistence.transfer import exchange_format

mode, store, path = sys.argv[1:]

def die(*_):
    os.kill(os.getpid(), signal.SIGKILL)

if mode == "import":  # killed while the file is validated, ids half recorded
    add = exchange_format._SeenIds.add
    calls = []
    def add_then_die(self, kind, identifier):
        calls.append(1)
        if len(calls) == 20:
            die()
        return add(self, kind, identifier)
    exchange_format._SeenIds.add = add_then_die

async def main():
    async with SQLiteSessionStorage(store) as storage:
        if mode == "import":
            await import_from_json(storage, path)
        elif mode == "restore":
            await restore_backup(storage, path, progress_callback=die)
        else:
            await export_to_json(storage, path, progress_callback=die, batch_size=5)

asyncio.run(main())
"""

# Holds a scratch directory and a partial file until its stdin closes.
_HOLDER = """
import sys
from pathlib import Path
from persistence.transfer.scratch import partial_file, scratch_directory

with scratch_directory("persistence-restore-") as held, partial_file(Path(sys.argv[1]), "out.json"):
    print(held, flush=True)
    sys.stdin.read()
"""


def _run_killed(mode: str, store: Path, path: Path, temporary: Path) -> None:
    env = child_env() | {"TMPDIR": str(temporary)}
    child = subprocess.run(
        [sys.executable, "-c", _KILLED, mode, str(store), str(path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr


def _names(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir())


async def _store_of(path: Path, sessions: int = 30) -> list[ChatSession]:
    made = [conversation(turns=3) for _ in range(sessions)]
    async with SQLiteSessionStorage(path) as storage:
        for session in made:
            await storage.save_session(session)
    return made


@pytest.fixture
def temporary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The temporary directory of this process and of the children."""
    directory = tmp_path / "tmp"
    directory.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(directory))
    return directory


async def test_an_import_killed_while_validating_leaves_nothing_behind(
    tmp_path: Path, temporary: Path
) -> None:
    await _store_of(tmp_path / "source.db")
    exported = tmp_path / "all.json"
    async with SQLiteSessionStorage(tmp_path / "source.db") as source:
        await export_to_json(source, exported)

    _run_killed("import", tmp_path / "destination.db", exported, temporary)

    assert _names(temporary) == []


async def test_a_killed_restores_copy_is_removed_by_the_next_restore(
    tmp_path: Path, temporary: Path
) -> None:
    made = await _store_of(tmp_path / "source.db")
    async with SQLiteSessionStorage(tmp_path / "source.db") as source:
        backup = Path((await backup_storage(source, tmp_path / "backups"))["path"])

    _run_killed("restore", tmp_path / "destination.db", backup, temporary)
    (left,) = _names(temporary)
    assert left.startswith("persistence-restore-")
    assert "backup.sqlite3" in _names(temporary / left)

    async with SQLiteSessionStorage(tmp_path / "destination.db") as destination:
        restored = await restore_backup(destination, backup)
        stored = {s.session_id for s in await destination.list_sessions(limit=100)}
    assert restored["sessions_restored"] == len(made)
    assert stored == {session.session_id for session in made}
    assert _names(temporary) == []


async def test_a_killed_exports_partial_file_is_removed_by_the_next_export(
    tmp_path: Path, temporary: Path
) -> None:
    await _store_of(tmp_path / "source.db")
    exports = tmp_path / "exports"
    exports.mkdir()
    target = exports / "all.json"

    _run_killed("export", tmp_path / "source.db", target, temporary)
    (left,) = _names(exports)
    assert left.startswith(".all.json.") and left.endswith(".persistence-partial")

    async with SQLiteSessionStorage(tmp_path / "source.db") as source:
        summary = await export_to_json(source, target)
    assert summary["sessions"] == 30
    assert _names(exports) == ["all.json"]


async def test_a_killed_exports_partial_file_is_removed_by_the_next_output_of_any_name(
    tmp_path: Path, temporary: Path
) -> None:
    """Found by attack: only an export to the same name removed it; an export to another
    name and a backup into the directory left it."""
    await _store_of(tmp_path / "source.db")
    exports = tmp_path / "exports"
    exports.mkdir()

    _run_killed("export", tmp_path / "source.db", exports / "all.json", temporary)
    (left,) = _names(exports)
    assert left.startswith(".all.json.") and left.endswith(".persistence-partial")
    async with SQLiteSessionStorage(tmp_path / "source.db") as source:
        await export_to_json(source, exports / "other.json")
        assert _names(exports) == ["other.json"]
        _run_killed("export", tmp_path / "source.db", exports / "third.json", temporary)
        assert len(_names(exports)) == 2
        backup = await backup_storage(source, exports)
    assert _names(exports) == sorted(["other.json", Path(backup["path"]).name])


def test_a_live_process_scratch_is_kept_and_removed_once_it_is_killed(
    tmp_path: Path, temporary: Path
) -> None:
    exports = tmp_path / "exports"
    exports.mkdir()
    # Look-alikes not made by a scratch_directory: no lock file, a symlink.
    (temporary / "persistence-restore-by-hand").mkdir()
    (temporary / "persistence-restore-link").symlink_to(tmp_path)
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(exports)],
        env=child_env() | {"TMPDIR": str(temporary)},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        held = Path(holder.stdout.readline().strip())
        (partial,) = exports.iterdir()

        with scratch_directory("persistence-restore-"), partial_file(exports, "out.json"):
            assert held.is_dir() and partial.exists()
        assert held.is_dir() and partial.exists()

        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
        with scratch_directory("persistence-restore-") as mine:
            with partial_file(exports, "out.json") as other:
                assert not held.exists() and not partial.exists()
                assert sorted(p.name for p in exports.iterdir()) == [other.name]
            left = sorted(p.name for p in temporary.iterdir())
        assert left == sorted(
            [mine.name, "persistence-restore-by-hand", "persistence-restore-link"]
        )
        assert tmp_path.is_dir()
    finally:
        if holder.poll() is None:
            holder.kill()
        holder.communicate(timeout=30)
    assert not os.path.exists(mine)


def test_a_users_own_file_of_a_like_name_is_left_alone(tmp_path: Path) -> None:
    """Found by attack: `.all.json.draft.partial`, made by hand, was removed."""
    mine = [".all.json.draft.partial", ".all.json.draft.persistence-partial", ".all.json.tmp"]
    for name in mine:
        (tmp_path / name).write_text("mine")
    with partial_file(tmp_path, "all.json") as made:
        assert made.name.endswith(".persistence-partial")
    assert _names(tmp_path) == sorted(mine)


def test_where_flock_fails_the_file_is_made_unlocked_and_never_taken_for_abandoned(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by attack: on NFS, whose flock needs a descriptor open for writing, every
    export and backup failed (EBADF). Simulated: flock raises as there."""
    import errno

    from persistence.transfer import scratch

    def no_flock(descriptor: int, operation: int) -> None:
        raise OSError(errno.EBADF, "Bad file descriptor")

    monkeypatch.setattr(scratch.fcntl, "flock", no_flock)
    with partial_file(tmp_path, "all.json") as first:
        first.write_text("written")
        with partial_file(tmp_path, "all.json") as second:
            assert first.exists() and second.exists()
    assert _names(tmp_path) == []


def test_a_single_file_export_does_not_look_for_abandoned_files(tmp_path: Path) -> None:
    """Each look lists the directory (25 ms in one of 50,000 entries): a file per
    session goes without it; export-all and backup do look."""
    from persistence.transfer.files import write_text

    abandoned = tmp_path / ".out.json.abcdefgh.persistence-partial"
    abandoned.write_text("left by a killed export")
    write_text(tmp_path / "out.json", "one session")
    assert abandoned.exists()
    with partial_file(tmp_path, "out.json"):
        assert not abandoned.exists()


# Restores a backup into a store, under a file size limit (if not -1) set once the store is
# open.
_RESTORED_AT_A_SIZE_LIMIT = """
import asyncio, resource, sys
from persistence import PersistenceError, SQLiteSessionStorage
from persistence.transfer import restore_backup

store, backup, limit = sys.argv[1], sys.argv[2], int(sys.argv[3])

async def main():
    async with SQLiteSessionStorage(store) as storage:
        if limit >= 0:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        try:
            await restore_backup(storage, backup)
        except PersistenceError as exc:
            print(exc)
        print((await storage.count()).total_sessions)

asyncio.run(main())
"""


async def _backup_of_30_long_sessions(tmp_path: Path) -> Path:
    async with SQLiteSessionStorage(tmp_path / "source.db") as storage:
        for _ in range(30):
            session = ChatSession.create("m")
            for turn in range(10):
                session.add_message("user", f"turn {turn} " + "x" * 2000)
            await storage.save_session(session)
        return Path((await backup_storage(storage, tmp_path / "backups"))["path"])


async def _restored_with_room(store: Path, backup: Path) -> tuple[bool, int]:
    async with SQLiteSessionStorage(store) as storage:
        verified = (await restore_backup(storage, backup))["verified"]
        return verified, (await storage.count()).total_sessions


def _restore_in_a_child(store: Path, backup: Path, limit: int, **env: str) -> list[str]:
    """The lines a child restoring `backup` into `store` prints: its error (if any) and
    the sessions the store holds after; `env` added to its environment."""
    done = subprocess.run(
        [sys.executable, "-c", _RESTORED_AT_A_SIZE_LIMIT, str(store), str(backup), str(limit)],
        env={**child_env(), **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()


def test_a_restore_whose_copy_of_the_backup_finds_no_room_names_that_not_the_backup(
    tmp_path: Path,
) -> None:
    """Found by attack: a full temporary directory made `restore` say "cannot read
    BACKUP: No space left on device", of a backup that restores with room."""
    backup = asyncio.run(_backup_of_30_long_sessions(tmp_path))
    size = backup.stat().st_size
    scratch_parent = tmp_path / "tmp"
    scratch_parent.mkdir()
    store = tmp_path / "restored.db"

    error, count = _restore_in_a_child(store, backup, size // 2, TMPDIR=str(scratch_parent))
    assert error == (
        f"cannot copy the backup {backup} into the temporary directory {scratch_parent}:"
        f" File too large: this process may not write a file of about {size:,} bytes (its"
        " file size limit, `ulimit -f`)"
    )
    assert count == "0"
    assert list(scratch_parent.iterdir()) == []
    assert asyncio.run(_restored_with_room(store, backup)) == (True, 30)


def test_a_restore_whose_temporary_directory_is_full_names_it_and_the_room_needed(
    tmp_path: Path, full_filesystem: Path
) -> None:
    """Found by attack: a full temporary directory made `restore` say "cannot read
    BACKUP: No space left on device"."""
    backup = asyncio.run(_backup_of_30_long_sessions(tmp_path))
    store = tmp_path / "restored.db"

    # SQLite's own temporary files elsewhere: opening the store makes some.
    error, count = _restore_in_a_child(
        store, backup, -1, TMPDIR=str(full_filesystem), SQLITE_TMPDIR=str(tmp_path)
    )
    assert error == (
        f"cannot copy the backup {backup} into the temporary directory {full_filesystem}:"
        " No space left on device; a restore works on a copy of the backup and needs about"
        f" {backup.stat().st_size:,} bytes free there (TMPDIR names another directory)"
    )
    assert count == "0"
    assert sorted(p.name for p in full_filesystem.iterdir()) == ["filler"]
