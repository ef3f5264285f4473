"""backup_storage and restore_backup: consistent, private, never outside the directory."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import shutil
import sqlite3
import stat
from datetime import UTC, datetime
from pathlib import Path

import pytest

from persistence import (
    ChatSession,
    InvalidDataError,
    MigrationError,
    PersistenceError,
    SchemaVersionError,
    SessionStorage,
    SQLiteSessionStorage,
)
from persistence.transfer import backup_storage, restore_backup, validate_backup_file
from persistence.transfer.unfinished import unfinished_copies
from tests.transfer.data import build_edge_session, edge_numbers_kept, populate, snapshot


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _head(path: Path) -> bytes:
    with open(path, "rb") as stream:
        return stream.read(16)


def _as_an_editor_saves(source: Path, target: Path) -> None:
    """`source` with a UTF-8 byte order mark and blank lines before it."""
    target.write_bytes(b"\xef\xbb\xbf" + b"\n" * 40 + source.read_bytes())


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


async def test_sqlite_backup_is_a_native_copy_restored_exactly(
    sqlite_storage: SessionStorage, postgresql_storage: SessionStorage, tmp_path: Path
) -> None:
    await populate(sqlite_storage)
    directory = tmp_path / "backups" / "nested"

    backup = await backup_storage(sqlite_storage, directory)

    path = Path(backup["path"])
    assert backup["kind"] == "sqlite"
    assert re.fullmatch(r"persistence-sqlite-\d{8}T\d{9}Z\.sqlite3", path.name)
    assert path.parent == directory
    assert os.listdir(directory) == [path.name]
    assert _mode(directory) == 0o700
    assert _mode(path) == 0o600
    assert (backup["sessions"], backup["files"]) == (10, 3)
    assert _head(path) == b"SQLite format 3\x00"
    before = _digest(path)

    restored = await restore_backup(postgresql_storage, path)

    assert await snapshot(postgresql_storage) == await snapshot(sqlite_storage)
    assert restored["kind"] == "sqlite"
    assert restored["verified"] is True
    assert restored["sessions_restored"] == 10
    assert _digest(path) == before
    assert os.listdir(directory) == [path.name]


async def test_postgresql_backup_is_an_export_file_restored_exactly(
    postgresql_storage: SessionStorage, sqlite_storage: SessionStorage, tmp_path: Path
) -> None:
    await populate(postgresql_storage)

    backup = await backup_storage(postgresql_storage, tmp_path / "backups")
    await restore_backup(sqlite_storage, backup["path"])
    once = await snapshot(sqlite_storage)
    await restore_backup(sqlite_storage, backup["path"])

    path = Path(backup["path"])
    assert backup["kind"] == "json"
    assert re.fullmatch(r"persistence-postgresql-\d{8}T\d{9}Z\.json", path.name)
    assert _mode(path) == 0o600
    assert once == await snapshot(postgresql_storage)
    assert await snapshot(sqlite_storage) == once


async def test_numbers_at_the_edges_come_back_exactly_from_a_backup(
    sql_pair: tuple[SessionStorage, SessionStorage], tmp_path: Path
) -> None:
    # SQLite -> PostgreSQL restores a native copy; PostgreSQL -> SQLite an export file.
    source, destination = sql_pair
    await source.save_session(build_edge_session())
    backup = await backup_storage(source, tmp_path / "backups")

    restored = await restore_backup(destination, backup["path"])

    assert restored["messages_restored"] == 1
    assert edge_numbers_kept(await destination.load_session("edge numbers"))
    assert await snapshot(destination) == await snapshot(source)


async def test_a_sqlite_backup_restores_into_sqlite_twice_as_one_copy(
    sqlite_storage: SessionStorage, other_sqlite: SessionStorage, tmp_path: Path
) -> None:
    await populate(sqlite_storage)
    backup = await backup_storage(sqlite_storage, tmp_path / "backups")

    await restore_backup(other_sqlite, backup["path"])
    await restore_backup(other_sqlite, backup["path"])

    assert await snapshot(other_sqlite) == await snapshot(sqlite_storage)


async def test_a_backup_taken_while_writers_run_holds_whole_sessions(
    sql_storage: SessionStorage, tmp_path: Path
) -> None:
    storage = sql_storage
    sessions = [ChatSession.create("m", session_id=f"busy-{n:02d}") for n in range(16)]
    for session in sessions:
        await storage.save_session(session)
    stop = asyncio.Event()

    async def writer(first: ChatSession, second: ChatSession) -> None:
        # Two sessions grow together in one transaction.
        turn = 0
        while not stop.is_set():
            async with storage.unit_of_work() as uow:
                for session in (first, second):
                    session.add_message("user", str(turn))
                    await uow.sessions.add(session)
                await uow.commit()
            turn += 1

    tasks = [asyncio.create_task(writer(sessions[i], sessions[i + 8])) for i in range(8)]
    try:
        await asyncio.sleep(0.1)
        backups = [await backup_storage(storage, tmp_path / "backups") for _ in range(3)]
    finally:
        stop.set()
        await asyncio.gather(*tasks)

    for number, backup in enumerate(backups):
        async with SQLiteSessionStorage(tmp_path / f"restored-{number}.db") as restored:
            await restore_backup(restored, backup["path"])
            loaded = {
                s.session_id: s
                for s in await restored.load_sessions([s.session_id for s in sessions])
            }
        assert len(loaded) == 16
        for stored in loaded.values():
            assert stored.message_count == len(stored.messages)
            assert [m.content for m in stored.messages] == [
                str(t) for t in range(len(stored.messages))
            ]
            if stored.messages:
                assert stored.updated_at == stored.messages[-1].created_at
        if storage.backend_name == "sqlite":
            # The native copy is one snapshot of the database: transactions stay whole.
            for i in range(8):
                first, second = sessions[i].session_id, sessions[i + 8].session_id
                assert loaded[first].message_count == loaded[second].message_count


async def test_a_backup_never_follows_a_symlink_planted_at_its_name(
    sqlite_storage: SessionStorage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import persistence.transfer.backups

    frozen = datetime(2026, 5, 6, 7, 8, 9, 123000, tzinfo=UTC)
    monkeypatch.setattr(persistence.transfer.backups, "utc_now", lambda: frozen)
    await populate(sqlite_storage)
    outside = tmp_path / "outside.db"
    outside.write_bytes(b"precious")
    directory = tmp_path / "backups"
    directory.mkdir()
    planted = directory / "persistence-sqlite-20260506T070809123Z.sqlite3"
    planted.symlink_to(outside)

    backup = await backup_storage(sqlite_storage, directory)

    assert Path(backup["path"]) == directory / "persistence-sqlite-20260506T070809123Z-1.sqlite3"
    assert outside.read_bytes() == b"precious"
    assert planted.is_symlink()
    assert sorted(os.listdir(directory)) == sorted([planted.name, Path(backup["path"]).name])
    assert sorted(os.listdir(tmp_path)) == sorted(
        ["backups", "outside.db", "sessions.db", "sessions.db-shm", "sessions.db-wal"]
    )


def _foreign_sqlite(path: Path) -> None:
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE notes (body TEXT)")
    db.close()


@pytest.mark.parametrize(
    ("content", "error"),
    [
        (b"", "not a backup"),
        (b"random bytes", "not a backup"),
        (b"SQLite format 3\x00" + b"\x07" * 5000, "SQLite"),
        (None, "not a persistence backup"),
    ],
    ids=["empty", "random", "corrupt sqlite", "foreign sqlite"],
)
async def test_restore_refuses_a_file_that_is_not_a_backup(
    sql_storage: SessionStorage, tmp_path: Path, content: bytes | None, error: str
) -> None:
    await populate(sql_storage)
    before = await snapshot(sql_storage)
    path = tmp_path / "suspect"
    if content is None:
        _foreign_sqlite(path)
    else:
        path.write_bytes(content)

    with pytest.raises(InvalidDataError, match=error):
        await restore_backup(sql_storage, path)

    assert await snapshot(sql_storage) == before


async def _backup_from_the_future(storage: SessionStorage, directory: Path) -> Path:
    """A SQLite backup of a populated store, its schema revision one this version lacks."""
    await populate(storage)
    backup = Path((await backup_storage(storage, directory / "backups"))["path"])
    with sqlite3.connect(backup) as db:
        db.execute("UPDATE persistence_alembic_version SET version_num = 'from_the_future'")
    db.close()
    return backup


async def test_restore_refuses_a_backup_from_a_newer_version(
    sqlite_storage: SessionStorage, postgresql_storage: SessionStorage, tmp_path: Path
) -> None:
    backup = await _backup_from_the_future(sqlite_storage, tmp_path)

    with pytest.raises(SchemaVersionError):
        await restore_backup(postgresql_storage, backup)

    assert (await postgresql_storage.count()).total_sessions == 0


async def test_a_backup_of_a_newer_version_is_refused_naming_it_not_a_copy(
    sqlite_storage: SessionStorage,
    other_sqlite: SessionStorage,
    postgresql_storage: SessionStorage,
    tmp_path: Path,
) -> None:
    backup = await _backup_from_the_future(sqlite_storage, tmp_path)
    named = re.escape(f"{backup}: the schema is at revision from_the_future")

    with pytest.raises(SchemaVersionError, match=named):
        validate_backup_file(backup)
    for destination in (other_sqlite, postgresql_storage):
        with pytest.raises(SchemaVersionError, match=named):
            await restore_backup(destination, backup)
        assert (await destination.count()).total_sessions == 0
    assert os.listdir(backup.parent) == [backup.name]


async def test_backing_up_into_an_empty_path_is_refused(
    sqlite_storage: SessionStorage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    current = tmp_path / "current"
    current.mkdir()
    monkeypatch.chdir(current)

    with pytest.raises(MigrationError, match="empty path"):
        await backup_storage(sqlite_storage, "")

    assert os.listdir(current) == []


async def test_restoring_a_missing_file_is_refused(
    sqlite_storage: SessionStorage, tmp_path: Path
) -> None:
    with pytest.raises(InvalidDataError, match="no such file"):
        await restore_backup(sqlite_storage, tmp_path / "missing.sqlite3")


async def test_a_sqlite_backup_reports_the_rows_it_copied_not_the_stored_counts(
    tmp_path: Path,
) -> None:
    """Found by attack: a backup's summary was the sum of message_count, which a hand
    edit can make wrong, not the rows copied; and a message of no session (a delete in
    the sqlite3 shell) is one restore skips, so it is not counted either."""
    path = tmp_path / "store.db"
    async with SQLiteSessionStorage(path) as storage:
        for session_id in ("s0", "s1", "s2"):
            session = ChatSession.create("m", session_id=session_id)
            for turn in range(3):
                session.add_message("user", f"turn {turn}")
            await storage.save_session(session)
    with sqlite3.connect(path) as connection:
        connection.execute("UPDATE chat_sessions SET message_count = 1 WHERE session_id = 's1'")
        connection.execute("DELETE FROM chat_sessions WHERE session_id = 's2'")
    connection.close()

    async with SQLiteSessionStorage(path) as storage:
        backup = await backup_storage(storage, tmp_path / "backups")

    assert (backup["sessions"], backup["messages"], backup["files"]) == (2, 6, 0)


@pytest.mark.sqlite
async def test_a_sqlite_file_whose_wal_holds_writes_is_refused_naming_it(
    sqlite_storage: SessionStorage, tmp_path: Path
) -> None:
    """Found by attack: the restore copied the main file alone, so the sessions a program
    with the file open still had in its -wal were left out, and the check passed."""
    live_path = tmp_path / "live.db"
    async with SQLiteSessionStorage(live_path) as live:
        await populate(live)
        assert (tmp_path / "live.db-wal").stat().st_size > 0
        before = await snapshot(sqlite_storage)

        with pytest.raises(InvalidDataError, match=r"live\.db: its -wal file holds writes"):
            validate_backup_file(live_path)
        with pytest.raises(InvalidDataError, match="persistence backup"):
            await restore_backup(sqlite_storage, live_path)
        # Through a symlink too (found by attack: the check looked beside the link, and
        # the restore dropped the sessions in the -wal).
        link = tmp_path / "elsewhere" / "link.db"
        link.parent.mkdir()
        link.symlink_to(live_path)
        with pytest.raises(InvalidDataError, match=r"link\.db: its -wal file holds writes"):
            validate_backup_file(link)
        with pytest.raises(InvalidDataError, match="persistence backup"):
            await restore_backup(sqlite_storage, link)

        assert await snapshot(sqlite_storage) == before
        # What the error says to do works, with the program still running.
        backup = await backup_storage(live, tmp_path / "backups")
    await restore_backup(sqlite_storage, backup["path"])
    assert (await sqlite_storage.count()).total_sessions == 10


# A writer of a rollback-journal file that changes every session in one transaction,
# with a page cache of one page so its changes reach the main file before any COMMIT;
# it waits there to be killed.
_KILLED_WRITER = """
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("PRAGMA cache_size=1")
db.execute("BEGIN")
db.execute("UPDATE chat_sessions SET model = 'uncommitted'")
print("ready", flush=True)
time.sleep(60)
"""


@pytest.mark.sqlite
async def test_a_sqlite_file_whose_journal_holds_an_unfinished_transaction_is_refused(
    sqlite_storage: SessionStorage, tmp_path: Path
) -> None:
    """Found by attack: a file in rollback-journal mode whose writer was killed before
    its COMMIT holds pages of that transaction, which SQLite rolls back from the
    -journal when it next opens the file. The restore copied the main file alone,
    restored the uncommitted changes, and reported them verified."""
    import signal
    import sys

    path = tmp_path / "journaled.db"
    async with SQLiteSessionStorage(path) as storage:
        await populate(storage)
    with sqlite3.connect(path) as connection:
        assert connection.execute("PRAGMA journal_mode=DELETE").fetchone() == ("delete",)
    connection.close()
    writer = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _KILLED_WRITER, str(path), stdout=asyncio.subprocess.PIPE
    )
    assert writer.stdout is not None and await writer.stdout.readline() == b"ready\n"
    writer.send_signal(signal.SIGKILL)
    await writer.wait()
    before = await snapshot(sqlite_storage)

    with pytest.raises(InvalidDataError, match=r"journaled\.db: its -journal file holds a"):
        validate_backup_file(path)
    with pytest.raises(InvalidDataError, match="PRAGMA quick_check"):
        await restore_backup(sqlite_storage, path)
    assert await snapshot(sqlite_storage) == before

    # Opening it as a store says the same, not "read-only" (found by attack), and
    # alters nothing: each open reads it read-only first.
    for opening in ("initialize", "open_for_reading"):
        journaled = SQLiteSessionStorage(path)
        with pytest.raises(PersistenceError, match="-journal holds a transaction a program"):
            await getattr(journaled, opening)()
        await journaled.close()
    assert (tmp_path / "journaled.db-journal").stat().st_size > 0

    # What the error says to do: SQLite rolls the transaction back on a writable open.
    with sqlite3.connect(path) as connection:
        assert connection.execute("PRAGMA quick_check").fetchone() == ("ok",)
    connection.close()
    # The journal is now deleted, or left with its header zeroed (journal_mode=PERSIST):
    # a journal that holds nothing is no reason to refuse.
    connection = sqlite3.connect(path, isolation_level=None)
    assert connection.execute("PRAGMA journal_mode=PERSIST").fetchone() == ("persist",)
    connection.execute("PRAGMA user_version = 7")  # a write, committed
    connection.close()
    assert (tmp_path / "journaled.db-journal").stat().st_size > 0
    result = await restore_backup(sqlite_storage, path)
    assert result["verified"] is True and result["sessions_restored"] == 10
    restored = await sqlite_storage.list_sessions(limit=100)
    assert len(restored) == 10 and "uncommitted" not in {s.model for s in restored}


@pytest.mark.sqlite
async def test_a_journal_that_is_a_fifo_does_not_stop_a_restore(
    sqlite_storage: SessionStorage, tmp_path: Path
) -> None:
    """Found by attack: the journal check opened a `-journal` that was a FIFO, which
    waits for a writer for good, and froze the event loop. Only a regular file is
    read; a FIFO holds no transaction of the file's."""
    path = tmp_path / "store.db"
    async with SQLiteSessionStorage(path) as storage:
        await populate(storage)
    os.mkfifo(tmp_path / "store.db-journal")
    restored = await asyncio.wait_for(restore_backup(sqlite_storage, path), timeout=30)
    assert restored["sessions_restored"] == 10 and restored["verified"] is True


async def test_restoring_a_store_into_itself_is_refused_as_such(tmp_path: Path) -> None:
    """Found by attack: a store's own file, restored into it, was refused as "a program
    has it open" (the restore's own storage), and the error sent the user to back the
    store up and restore that copy, into itself again."""
    path = tmp_path / "store.db"
    link = tmp_path / "elsewhere" / "link.db"
    link.parent.mkdir()
    link.symlink_to(path)
    hard = tmp_path / "hard.db"
    async with SQLiteSessionStorage(path) as storage:
        await populate(storage)
        os.link(path, hard)
        before = await snapshot(storage)
        for named in (path, link, hard):
            with pytest.raises(InvalidDataError) as raised:
                await restore_backup(storage, named)
            assert str(raised.value) == (
                f"{named}: this is the database file of the store being restored into; a"
                " store holds everything its own file does, so there is nothing to restore"
            )
        assert await snapshot(storage) == before
        # Another store's file is no such thing, even at the same name elsewhere.
        async with SQLiteSessionStorage(tmp_path / "other" / "store.db") as other:
            backup = await backup_storage(storage, tmp_path / "backups")
            await restore_backup(other, backup["path"])
            assert (await other.count()).total_sessions == 10


async def test_a_json_backup_an_editor_saved_with_a_bom_and_blank_lines_restores(
    postgresql_storage: SessionStorage, sqlite_storage: SessionStorage, tmp_path: Path
) -> None:
    """Found by attack: `import` took such a file and `restore` called it not a backup."""
    await populate(postgresql_storage)
    backup = await backup_storage(postgresql_storage, tmp_path / "backups")
    edited = tmp_path / "edited.json"
    _as_an_editor_saves(Path(backup["path"]), edited)

    assert validate_backup_file(edited) == "json"
    await restore_backup(sqlite_storage, edited)

    assert await snapshot(sqlite_storage) == await snapshot(postgresql_storage)


# Edits a hand or another tool can make to a SQLite backup, and what the refusal names.
# The session edited is the last one read (session ids sort), after the others passed.
HAND_EDITS = [
    (
        "UPDATE chat_messages SET content = 'a' || char(0) || 'b' WHERE id = (SELECT max(id)"
        " FROM chat_messages)",
        "NUL characters cannot be stored",
    ),
    (
        "UPDATE chat_messages SET created_at = '2024-05-01 12:00:00.123456+00:00'"
        " WHERE id = (SELECT max(id) FROM chat_messages)",
        "a part below the millisecond",
    ),
    ("UPDATE chat_sessions SET updated_at = 'yesterday'", "a row cannot be read"),
    ("UPDATE chat_sessions SET metadata = '{\"k\": NaN}'", "nan is not a JSON number"),
    (
        "PRAGMA ignore_check_constraints = 1; UPDATE chat_sessions SET status = 'deleted'",
        "status",
    ),
    ("UPDATE uploaded_files SET metadata = '{\"$k\": 1}'", "starts with '$'"),
]


@pytest.mark.parametrize(("edit", "named"), HAND_EDITS)
async def test_a_sqlite_backup_holding_a_row_the_models_refuse_restores_nothing(
    other_sqlite: SessionStorage,
    sql_storage: SessionStorage,
    tmp_path: Path,
    edit: str,
    named: str,
) -> None:
    """Found by attack: rows were restored as they were (a NUL, NaN, microseconds), or
    the restore stopped at the first unreadable one after the batches before it."""
    await populate(other_sqlite)
    backup = Path((await backup_storage(other_sqlite, tmp_path / "backups"))["path"])
    await asyncio.to_thread(_edit_file, backup, edit)
    before = await snapshot(sql_storage)

    with pytest.raises(InvalidDataError, match=re.escape(named)) as refused:
        await restore_backup(sql_storage, backup)

    assert str(refused.value).startswith(f"{backup}: ")
    assert str(refused.value).endswith("nothing was restored")
    assert await snapshot(sql_storage) == before


def _edit_file(path: Path, script: str) -> None:
    with sqlite3.connect(path) as db:
        db.executescript(script)
    db.close()


async def test_a_restore_stopped_half_way_is_noted_by_its_backup_until_run_again(
    sqlite_storage: SessionStorage, other_sqlite: SessionStorage, tmp_path: Path
) -> None:
    """A restore reads a scratch copy of its backup, another file each time: its note
    of an unfinished copy names the backup, and is kept by the store backed up, so that
    the restore run again takes it over and removes it: from a symlink, a hard link or
    a copy of the file too (found by attack: the note was kept by the backup's real
    path, and a restore through a hard link left it for good)."""
    for start in range(0, 30, 10):
        await sqlite_storage.insert_sessions(
            [ChatSession.create("m", session_id=f"s{n:02d}") for n in range(start, start + 10)]
        )
    backup = await backup_storage(sqlite_storage, tmp_path / "backups")

    class Stop(Exception):
        pass

    def stop(done: int, total: int) -> None:
        if done:
            raise Stop

    with pytest.raises(Stop):
        await restore_backup(other_sqlite, backup["path"], progress_callback=stop)
    [unfinished] = await unfinished_copies(other_sqlite)
    assert unfinished.source == f"the backup {backup['path']}"

    os.link(backup["path"], tmp_path / "hard")
    os.symlink(tmp_path / "hard", tmp_path / "soft")
    shutil.copyfile(backup["path"], tmp_path / "copied")
    for again in ("hard", "soft", "copied"):
        with pytest.raises(Stop):  # a note of its own, beside the first one's
            await restore_backup(other_sqlite, backup["path"], progress_callback=stop)
        assert await unfinished_copies(other_sqlite) != []
        await restore_backup(other_sqlite, tmp_path / again)
        assert await unfinished_copies(other_sqlite) == [], again
    assert await snapshot(other_sqlite) == await snapshot(sqlite_storage)


async def test_a_restore_of_another_backup_of_the_store_leaves_a_stopped_ones_note(
    sqlite_storage: SessionStorage, other_sqlite: SessionStorage, tmp_path: Path
) -> None:
    """Found by attack: keyed by the store backed up, a finished restore of Monday's
    backup (1 session) cleared the note of a stopped restore of Tuesday's (30): the
    destination lacked most of Tuesday's, and nothing said so."""
    await sqlite_storage.save_session(ChatSession.create("m", session_id="monday"))
    monday = await backup_storage(sqlite_storage, tmp_path / "monday")
    await sqlite_storage.insert_sessions(
        [ChatSession.create("m", session_id=f"s{n:02d}") for n in range(29)]
    )
    tuesday = await backup_storage(sqlite_storage, tmp_path / "tuesday")

    def stop(done: int, total: int) -> None:
        if done:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        await restore_backup(other_sqlite, tuesday["path"], progress_callback=stop)
    await restore_backup(other_sqlite, monday["path"])
    [left] = await unfinished_copies(other_sqlite)
    assert left.source == f"the backup {tuesday['path']}"
    await restore_backup(other_sqlite, tuesday["path"])
    assert await unfinished_copies(other_sqlite) == []


async def test_a_backup_from_before_revision_0015_is_one_backup_to_the_notes(
    sqlite_storage: SessionStorage, other_sqlite: SessionStorage, tmp_path: Path
) -> None:
    """Found by attack: a backup taken before revision 0015 (no store id) drew a new id
    in each restore's scratch copy, so a key of the store's id never matched and the
    stopped restore's note stayed. The key is the backup's content, read before the
    scratch copy is brought to head."""
    await sqlite_storage.insert_sessions(
        [ChatSession.create("m", session_id=f"s{n:02d}") for n in range(12)]
    )
    backup = await backup_storage(sqlite_storage, tmp_path / "backups")
    old = sqlite3.connect(backup["path"])
    with old:
        old.execute("DROP TABLE persistence_store")
        old.execute("UPDATE persistence_alembic_version SET version_num = '0014'")
    old.close()  # the last connection: its -wal goes into the file
    os.chmod(backup["path"], 0o400)

    def stop(done: int, total: int) -> None:
        if done:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        await restore_backup(other_sqlite, backup["path"], progress_callback=stop)
    assert len(await unfinished_copies(other_sqlite)) == 1
    await restore_backup(other_sqlite, backup["path"])
    assert await unfinished_copies(other_sqlite) == []
