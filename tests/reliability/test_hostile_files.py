"""SQLite files that are not databases, truncated or damaged: a clear error, no crash."""

from __future__ import annotations

import os
import random
import sqlite3
from pathlib import Path

import pytest

from persistence import (
    ChatSession,
    PersistenceError,
    SessionManager,
    SQLiteSessionStorage,
    StorageConnectionError,
)
from persistence.transfer import backup_storage, export_to_json
from tests.factories import file_record
from tests.reliability.conftest import Figures

pytestmark = pytest.mark.sqlite


async def _every_operation(path: Path) -> list[str]:
    """Runs each public operation; returns the library errors (anything else propagates)."""
    errors: list[str] = []
    storage = SQLiteSessionStorage(path)
    try:
        await storage.initialize()
    except PersistenceError as exc:
        errors.append(str(exc))
        await storage.close()
        return errors
    session = ChatSession.create("m", session_id="after-damage")
    session.add_message("user", "hello")
    operations = [
        lambda: storage.list_sessions(),
        lambda: storage.load_session("s-1"),
        lambda: storage.search_messages("message"),
        lambda: storage.count(),
        lambda: storage.list_file_records(),
        lambda: storage.save_session(session),
        lambda: storage.delete_session("s-2"),
    ]
    for operation in operations:
        try:
            await operation()
        except PersistenceError as exc:
            errors.append(str(exc))
    await storage.close()
    return errors


async def _filled(path: Path, sessions: int = 200) -> None:
    async with SQLiteSessionStorage(path) as storage:
        await storage.initialize()
        for index in range(sessions):
            session = ChatSession.create("m", session_id=f"s-{index}")
            for turn in range(5):
                session.add_message("user", f"message {index} {turn} " + "w" * 300)
            await storage.save_session(session)


async def test_a_file_that_is_not_a_database_is_refused_and_left_untouched(
    tmp_path: Path,
) -> None:
    path = tmp_path / "notes.db"
    original = b"these are my notes, not a database\n" * 1000
    path.write_bytes(original)
    storage = SQLiteSessionStorage(path)
    with pytest.raises(PersistenceError, match="not a SQLite database") as caught:
        await storage.initialize()
    assert not isinstance(caught.value, StorageConnectionError)
    await storage.close()
    assert path.read_bytes() == original


async def test_a_directory_in_place_of_the_file_is_a_clear_error(tmp_path: Path) -> None:
    storage = SQLiteSessionStorage(tmp_path)
    with pytest.raises(PersistenceError, match="is a directory, not a database file"):
        await storage.initialize()
    await storage.close()


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.5, 0.9, 0.999])
async def test_a_truncated_database_gives_clear_errors_or_works(
    tmp_path: Path, fraction: float, figures: Figures
) -> None:
    path = tmp_path / "truncated.db"
    await _filled(path)
    size = path.stat().st_size
    with path.open("r+b") as handle:
        handle.truncate(int(size * fraction))
    errors = await _every_operation(path)
    # SQLite notices a missing page only when it reads it; whatever it notices is clear.
    assert all("corrupt" in e or "not a SQLite database" in e for e in errors), errors
    if 0 < fraction <= 0.5:
        assert errors, "half the file is gone and nothing noticed"
    figures["errors"] = len(errors)


async def test_damaged_pages_give_clear_errors_never_a_crash(
    tmp_path: Path, figures: Figures
) -> None:
    path = tmp_path / "damaged.db"
    await _filled(path)
    pristine = path.read_bytes()
    rng = random.Random(11)
    outcomes = {"errors": 0, "unnoticed": 0}
    for _ in range(12):
        damaged = bytearray(pristine)
        for _ in range(rng.randint(1, 4)):
            offset = rng.randrange(100, len(damaged) - 64)
            damaged[offset : offset + 64] = rng.randbytes(64)
        path.write_bytes(bytes(damaged))
        errors = await _every_operation(path)
        assert all(isinstance(e, str) and e for e in errors)
        outcomes["errors" if errors else "unnoticed"] += 1
    figures["damaged_files"] = 12
    figures["with_clear_errors"] = outcomes["errors"]


async def test_an_empty_file_becomes_a_fresh_database(tmp_path: Path) -> None:
    path = tmp_path / "empty.db"
    path.touch()
    assert await _every_operation(path) == []


@pytest.mark.parametrize("change", ["replaced", "removed"])
async def test_a_file_moved_under_an_open_storage_takes_no_write(
    tmp_path: Path, change: str
) -> None:
    """Found by attack: after `mv other.db live.db` under an open storage, its saves
    reported success into the old, unlinked file (lost with it), and the -wal beside the
    path left the new file corrupt."""
    path, other = tmp_path / "live.db", tmp_path / "other.db"
    async with SQLiteSessionStorage(other) as storage:
        theirs = ChatSession.create("m", session_id="theirs")
        theirs.add_message("user", "kept as it was")
        await storage.save_session(theirs)
    storage = SQLiteSessionStorage(path)
    await storage.initialize()
    try:
        ours = ChatSession.create("m", session_id="ours")
        ours.add_message("user", "before the move")
        await storage.save_session(ours)
        # Frames not yet checkpointed when a file is moved stay in the -wal beside the
        # path, where SQLite reads them with the new file: no storage can undo that
        # (SQLite names moving an open database as a way to corrupt it). Checkpointed
        # here, the test sees only what the storage does after the move.
        with sqlite3.connect(path) as connection:
            connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        connection.close()
        if change == "replaced":
            os.replace(other, path)
        else:
            path.unlink()
        ours.add_message("user", "after the move")
        with pytest.raises(PersistenceError, match="replaced or removed while open") as caught:
            await storage.save_session(ours)
        assert str(path) in str(caught.value)
        with pytest.raises(PersistenceError, match="replaced or removed while open"):
            async with storage.unit_of_work() as uow:
                await uow.sessions.add(ChatSession.create("m", session_id="in-a-unit"))
                await uow.commit()
        with pytest.raises(PersistenceError, match="replaced or removed while open"):
            await storage.load_session("ours")
    finally:
        await storage.close()
    if change == "removed":
        assert not path.exists()
        return
    with sqlite3.connect(path) as connection:
        assert connection.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    connection.close()
    async with SQLiteSessionStorage(path) as reopened:
        assert [s.session_id for s in await reopened.list_sessions()] == ["theirs"]
        loaded = await reopened.load_session("theirs")
        assert loaded is not None
        assert [m.content for m in loaded.messages] == ["kept as it was"]


@pytest.mark.parametrize("change", ["replaced", "removed"])
async def test_a_unit_of_work_whose_file_moved_is_not_committed(
    tmp_path: Path, change: str
) -> None:
    """Found by attack: the file check ran when the unit's transaction began, so a unit
    whose file was replaced or removed after its first statement committed into the old,
    unlinked file and reported success."""
    path, other = tmp_path / "live.db", tmp_path / "other.db"
    async with SQLiteSessionStorage(other) as storage:
        await storage.save_session(ChatSession.create("m", session_id="theirs"))
    async with SQLiteSessionStorage(path) as storage:
        ours = ChatSession.create("m", session_id="ours")
        await storage.save_session(ours)
        with sqlite3.connect(path) as connection:
            connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        connection.close()
        with pytest.raises(PersistenceError, match="replaced or removed while open"):
            async with storage.unit_of_work() as uow:
                ours.add_message("user", "in the unit")
                await uow.sessions.add(ours)
                if change == "replaced":
                    os.replace(other, path)
                else:
                    path.unlink()
                await uow.commit()
        # Nothing of it was taken as stored: the message is still to be sent.
        assert ours.message_count == 1
    if change == "replaced":
        async with SQLiteSessionStorage(path) as reopened:
            assert [s.session_id for s in await reopened.list_sessions()] == ["theirs"]


async def test_a_backup_of_a_file_replaced_under_an_open_storage_is_refused(
    tmp_path: Path,
) -> None:
    """Found by attack: every other call was refused, but a backup copied the old,
    unlinked file and reported its sessions."""
    path, other = tmp_path / "live.db", tmp_path / "other.db"
    async with SQLiteSessionStorage(other) as storage:
        await storage.save_session(ChatSession.create("m", session_id="theirs"))
    async with SQLiteSessionStorage(path) as storage:
        await storage.save_session(ChatSession.create("m", session_id="ours"))
        with sqlite3.connect(path) as connection:
            connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        connection.close()
        os.replace(other, path)
        backups = tmp_path / "backups"
        with pytest.raises(PersistenceError, match="replaced or removed while open"):
            await backup_storage(storage, backups)
    assert not backups.exists() or not any(backups.iterdir())


async def _edited(path: Path, *statements: str) -> None:
    """Sessions s0 and s1 of three messages each, then `statements` run as a hand edit
    in the sqlite3 shell would (CHECK constraints ignored)."""
    async with SQLiteSessionStorage(path) as storage:
        for index in range(2):
            session = ChatSession.create("m", session_id=f"s{index}")
            for turn in range(3):
                session.add_message("user", f"hello {index} {turn}")
            await storage.save_session(session)
    with sqlite3.connect(path) as connection:
        connection.execute("PRAGMA ignore_check_constraints = 1")
        for statement in statements:
            connection.execute(statement)
    connection.close()


@pytest.mark.parametrize(
    ("message_metadata", "session_metadata"), [("{not json", "[oops"), ("[1, 2]", "null")]
)
async def test_metadata_that_is_not_a_json_object_is_a_library_error_naming_the_row(
    tmp_path: Path, message_metadata: str, session_metadata: str
) -> None:
    """Found by attack: one message's metadata edited to invalid JSON made loads,
    searches, exports and SessionManager.startup raise a bare JSONDecodeError; edited to
    JSON that is not an object (`[1, 2]`, `null`), it was loaded into the models, copied
    by migrate and exported into a file that import refused."""
    path = tmp_path / "edited.db"
    await _edited(
        path,
        f"UPDATE chat_messages SET metadata = '{message_metadata}'"
        " WHERE session_id = 's1' AND position = 1",
        f"UPDATE chat_sessions SET metadata = '{session_metadata}' WHERE session_id = 's0'",
    )
    with sqlite3.connect(path) as connection:
        (message_id,) = connection.execute(
            "SELECT message_id FROM chat_messages WHERE session_id = 's1' AND position = 1"
        ).fetchone()
    connection.close()
    async with SQLiteSessionStorage(path) as storage:
        with pytest.raises(PersistenceError) as caught:
            await storage.load_session("s1")
        assert all(
            name in str(caught.value) for name in ("'s1'", message_id, "chat_messages.metadata")
        )
        with pytest.raises(PersistenceError, match=r"'s1'.*chat_messages\.metadata"):
            await storage.load_session("s1", last=2)
        with pytest.raises(PersistenceError, match=message_id):
            await storage.search_messages("hello")
        with pytest.raises(PersistenceError, match=r"'s0'.*chat_sessions\.metadata"):
            await storage.list_sessions()
        with pytest.raises(PersistenceError, match="is not a JSON object"):
            await export_to_json(storage, tmp_path / "all.json")
        with pytest.raises(PersistenceError, match="is not a JSON object"):
            await SessionManager(storage).startup()


@pytest.mark.parametrize("pending", [False, True], ids=["indexed", "pending"])
async def test_content_edited_to_a_blob_is_named_and_blocks_no_save(
    tmp_path: Path, pending: bool
) -> None:
    """Found by attack: content a hand edit set to a BLOB (as sqlite3's readfile()
    stores a file) loaded as bytes; searches and exports raised a bare TypeError, and
    while its search document was pending, so did every later save of the store."""
    path = tmp_path / "edited.db"
    documents = ", search_text = NULL" if pending else ""
    await _edited(
        path,
        f"UPDATE chat_messages SET content = CAST('hello blob' AS BLOB){documents}"
        " WHERE session_id = 's1' AND position = 1",
    )
    with sqlite3.connect(path) as connection:
        (message_id,) = connection.execute(
            "SELECT message_id FROM chat_messages WHERE session_id = 's1' AND position = 1"
        ).fetchone()
    connection.close()
    named = rf"'s1', message '{message_id}': the stored chat_messages\.content is not text"
    async with SQLiteSessionStorage(path) as storage:
        with pytest.raises(PersistenceError, match=named):
            await storage.load_session("s1")
        with pytest.raises(PersistenceError, match=r"'s1'.*chat_messages\.content is not text"):
            await storage.load_session("s1", last=2)
        with pytest.raises(PersistenceError, match=named):
            await storage.search_messages("hello")
        with pytest.raises(PersistenceError, match=named):
            await export_to_json(storage, tmp_path / "all.json")
        # The store's other sessions stay usable, saves and all.
        assert len((await storage.load_session("s0")).messages) == 3
        session = ChatSession.create("m", session_id="s2")
        session.add_message("user", "written after the edit")
        await storage.save_session(session)
        found = await storage.search_messages("written")
        assert [m.session_id for m in found] == ["s2"]
    # The advice of the error works: cast back, the message is text again and found.
    with sqlite3.connect(path) as connection:
        connection.execute("UPDATE chat_messages SET content = CAST(content AS TEXT)")
    connection.close()
    async with SQLiteSessionStorage(path) as storage:
        assert (await storage.load_session("s1")).messages[1].content == "hello blob"
        assert message_id in [m.message_id for m in await storage.search_messages("blob")]


@pytest.mark.parametrize("edited", ["[1, 2]", "null", "3"])
async def test_file_metadata_that_is_not_a_json_object_is_a_library_error_naming_the_file(
    tmp_path: Path, edited: str
) -> None:
    """Found by attack: a file record whose metadata a hand edit made `[1, 2]` was loaded
    into the model as a list; the session columns had been guarded, the file's not."""
    path = tmp_path / "edited.db"
    async with SQLiteSessionStorage(path) as storage:
        await storage.save_file_record(file_record(file_id="f1"))
        await storage.save_file_record(file_record(file_id="f2"))
    with sqlite3.connect(path) as connection:
        connection.execute(f"UPDATE uploaded_files SET metadata = '{edited}' WHERE file_id = 'f1'")
    connection.close()
    async with SQLiteSessionStorage(path) as storage:
        with pytest.raises(PersistenceError, match=r"'f1'.*uploaded_files\.metadata.*not a JSON"):
            await storage.load_file_record("f1")
        with pytest.raises(PersistenceError, match=r"'f1'.*uploaded_files\.metadata"):
            await storage.list_file_records()
        loaded = await storage.load_file_record("f2")
        assert loaded is not None and loaded.metadata == {"source": "upload"}


@pytest.mark.parametrize(
    ("edited", "shown"), [("'2026-13-45 99:00'", "'2026-13-45 99:00'"), ("0", "0")]
)
async def test_a_stored_value_its_column_cannot_read_is_named_not_called_corruption(
    tmp_path: Path, edited: str, shown: str
) -> None:
    """Found by attack: one updated_at edited to '2026-13-45 99:00' made every listing
    say "the database file is corrupt", naming nothing, though integrity_check passed;
    edited to the number 0, every listing raised a bare TypeError."""
    path = tmp_path / "edited.db"
    await _edited(path, f"UPDATE chat_sessions SET updated_at = {edited} WHERE session_id = 's1'")
    async with SQLiteSessionStorage(path) as storage:
        with pytest.raises(PersistenceError) as caught:
            await storage.list_sessions()
    message = str(caught.value)
    assert f"chat_sessions.updated_at holds {shown}, which is not a timestamp" in message
    assert "chat_sessions.session_id 's1'" in message
    assert "corrupt" not in message
