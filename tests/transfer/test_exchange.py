"""export_to_json and import_from_json: one validated JSON document, streamed both ways."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sqlite3
import stat
import threading
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from persistence import ChatSession, InvalidDataError, MigrationError, SessionStorage
from persistence.transfer import (
    FORMAT_NAME,
    export_to_json,
    import_from_json,
    validate_export_file,
)
from persistence.validation import MAX_METADATA_DEPTH
from tests.transfer.cancelling import cancelled_in_the_second_batch
from tests.transfer.data import (
    build_edge_file_record,
    build_edge_session,
    build_sessions,
    edge_numbers_kept,
    populate,
    snapshot,
)

Pair = tuple[SessionStorage, SessionStorage]


def _read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as stream:
        return json.load(stream)


def _write_mutated(source: Path, target: Path, mutate: Callable[[bytes], bytes]) -> None:
    target.write_bytes(mutate(source.read_bytes()))


@pytest.fixture
async def exported(other_sqlite: SessionStorage, tmp_path: Path) -> Path:
    await populate(other_sqlite)
    path = tmp_path / "export.json"
    await export_to_json(other_sqlite, path)
    return path


async def test_export_then_import_is_exact_on_every_backend(
    other_sqlite: SessionStorage, storage: SessionStorage, exported: Path
) -> None:
    result = await import_from_json(storage, exported)

    assert await snapshot(storage) == await snapshot(other_sqlite)
    assert result["sessions_imported"] == 10
    assert result["files_imported"] == 3
    assert result["format_version"] == 1


async def test_an_import_cancelled_while_it_writes_a_batch_counts_what_it_wrote(
    storage: SessionStorage, exported: Path
) -> None:
    """Found by attack: into SQLite, whose cancelled calls still commit, an import
    stopped while it wrote a batch left that batch out of `N of M sessions were
    copied`. The batch being written ends first, and is counted."""
    reported, note = await cancelled_in_the_second_batch(
        lambda progress: import_from_json(
            storage, exported, batch_size=4, progress_callback=progress
        ),
        batch_size=4,
    )

    assert (await storage.count()).total_sessions == 8 == reported
    assert "8 of 10 sessions were copied" in note


async def test_numbers_at_the_edges_come_back_exactly_on_every_backend(
    pair: Pair, tmp_path: Path
) -> None:
    source, destination = pair
    await populate(source)
    await source.save_session(build_edge_session())
    await source.save_file_record(build_edge_file_record())
    path = tmp_path / "edge.json"
    await export_to_json(source, path)

    # Small batches: the numbers are met after records already validated and written.
    result = await import_from_json(destination, path, batch_size=2)

    assert result["sessions_imported"] == 11
    assert result["files_imported"] == 4
    assert edge_numbers_kept(await destination.load_session("edge numbers"))
    assert await snapshot(destination) == await snapshot(source)


def _with_number(raw: bytes, number: str) -> bytes:
    """The export with `number` as the value of the last message's metadata key "n"."""
    document = json.loads(raw)
    _last_message(document)["metadata"] = {"n": "placeholder"}
    return json.dumps(document, ensure_ascii=False).replace('"placeholder"', number).encode()


@pytest.mark.parametrize(
    ("number", "error"),
    [
        (str(2**63), "integer 9223372036854775808 does not fit in 64 bits"),
        (str(-(2**63) - 1), "integer -9223372036854775809 does not fit in 64 bits"),
        ("1" + "0" * 40, "does not fit in 64 bits"),
        ("1e400", "inf is not a JSON number"),
        ("1e16", "would come back from PostgreSQL as an integer"),
        ("-0.0", "-0.0 would come back from PostgreSQL"),
    ],
)
def test_a_number_validation_refuses_is_named_not_reported_as_corruption(
    exported: Path, tmp_path: Path, number: str, error: str
) -> None:
    bad = tmp_path / "bad.json"
    _write_mutated(exported, bad, lambda raw: _with_number(raw, number))

    with pytest.raises(InvalidDataError, match=re.escape(error)):
        validate_export_file(bad)


def test_a_truncated_file_holding_int64_min_is_still_reported_as_truncated(
    exported: Path, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.json"
    _write_mutated(exported, bad, lambda raw: _with_number(raw, str(-(2**63)))[:-40])

    with pytest.raises(InvalidDataError, match="not valid JSON"):
        validate_export_file(bad)


async def test_importing_twice_stores_one_copy(storage: SessionStorage, exported: Path) -> None:
    await import_from_json(storage, exported)
    once = await snapshot(storage)

    second = await import_from_json(storage, exported, batch_size=3)

    assert await snapshot(storage) == once
    messages = sum(len(s.messages) for s in build_sessions())
    assert [second[f"{n}_imported"] for n in ("sessions", "messages", "files")] == [0, 0, 0]
    assert [second[f"{n}_already_present"] for n in ("sessions", "messages", "files")] == [
        10,
        messages,
        3,
    ]


async def test_import_keeps_what_the_store_holds(storage: SessionStorage, exported: Path) -> None:
    own = ChatSession.create("m", session_id="mine")
    own.add_message("user", "kept")
    await storage.save_session(own)

    await import_from_json(storage, exported)

    assert await storage.load_session("mine") == own
    assert (await storage.count()).total_sessions == 11


async def test_importing_again_keeps_the_stores_own_fields(
    storage: SessionStorage, exported: Path
) -> None:
    """Found by review: a second import undid field changes made in the store since."""
    await import_from_json(storage, exported)
    expected = build_sessions()[0]
    held = await storage.load_session(expected.session_id)
    assert held is not None and held.messages
    held.model = "changed-here"  # neither change moves updated_at
    held.status = "expired" if held.status != "expired" else "active"
    await storage.save_session(held)

    result = await import_from_json(storage, exported)

    stored = await storage.load_session(expected.session_id)
    assert stored is not None
    assert (stored.model, stored.status) == ("changed-here", held.status)
    assert [m.message_id for m in stored.messages] == [m.message_id for m in expected.messages]
    assert (result["sessions_imported"], result["sessions_already_present"]) == (0, 10)


async def test_a_message_id_the_store_holds_elsewhere_stops_the_import_saying_it_will_again(
    sql_storage: SessionStorage, other_sqlite: SessionStorage, tmp_path: Path
) -> None:
    """Found by attack: every run stopped at the same session, and its note said that
    running it again resumes safely."""
    held = ChatSession.create("m", session_id="held-here")
    taken = held.add_message("user", "mine")
    await sql_storage.save_session(held)
    clash = ChatSession.create("m", session_id="from-file")
    clash.add_message("user", "hello")
    clash.messages.append(taken.model_copy(update={"session_id": "from-file"}))
    await other_sqlite.save_session(clash)
    path = tmp_path / "clash.json"
    await export_to_json(other_sqlite, path)

    for _ in range(2):
        with pytest.raises(InvalidDataError, match="already stored") as stopped:
            await import_from_json(sql_storage, path)
        (note,) = stopped.value.__notes__
        assert note.endswith("stops at the same session until the data it names is mended")
    assert await sql_storage.load_session("from-file") is None


async def test_a_session_a_writer_deletes_while_its_batch_merges_it_is_imported_new(
    storage: SessionStorage, exported: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by attack: the batch's save of its merge raised SessionDeletedError, and the
    whole import (restore, migration) stopped. The batch now plans again."""
    await import_from_json(storage, exported)
    victim = await storage.load_session(build_sessions()[0].session_id)
    assert victim is not None and victim.messages
    victim.pop_message()  # the store lacks a message: the import merges the session
    await storage.save_session(victim)
    read = storage.load_sessions

    async def read_then_delete(session_ids: Any, **options: Any) -> Any:
        found = await read(session_ids, **options)
        await storage.delete_session(victim.session_id)  # a live service, meanwhile
        return found

    monkeypatch.setattr(storage, "load_sessions", read_then_delete)
    result = await import_from_json(storage, exported)
    monkeypatch.undo()

    assert result["sessions_imported"] == 1
    stored = await storage.load_session(victim.session_id)
    expected = next(s for s in build_sessions() if s.session_id == victim.session_id)
    assert stored is not None
    assert [m.message_id for m in stored.messages] == [m.message_id for m in expected.messages]
    assert (await storage.count()).total_sessions == 10


async def test_export_is_one_private_json_document_with_header_and_counts(
    other_sqlite: SessionStorage, exported: Path
) -> None:
    document = _read_json(exported)

    assert stat.S_IMODE(os.stat(exported).st_mode) == 0o600
    assert list(document)[:2] == ["format", "version"]
    assert document["format"] == FORMAT_NAME
    assert document["version"] == 1
    assert document["exported_at"].endswith("+00:00")
    messages = sum(len(s.messages) for s in build_sessions())
    assert document["counts"] == {"sessions": 10, "messages": messages, "files": 3}
    assert len(document["sessions"]) == 10
    assert sum(len(s["messages"]) for s in document["sessions"]) == messages
    assert len(document["file_records"]) == 3
    # No temp file is left next to it.
    assert [name for name in os.listdir(exported.parent) if name.startswith(".")] == []


async def test_a_failed_export_leaves_the_previous_file_and_no_temp_file(
    other_sqlite: SessionStorage, tmp_path: Path
) -> None:
    await populate(other_sqlite)
    out = tmp_path / "out"
    out.mkdir()
    target = out / "export.json"
    target.write_text("previous")

    def fail(done: int, total: int) -> None:
        if done:
            raise RuntimeError("stop")

    with pytest.raises(RuntimeError):
        await export_to_json(other_sqlite, target, batch_size=2, progress_callback=fail)

    assert target.read_text() == "previous"
    assert os.listdir(out) == ["export.json"]


async def test_export_refuses_a_symlink_and_leaves_it_and_its_target_alone(
    other_sqlite: SessionStorage, tmp_path: Path
) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_text("untouched")
    out = tmp_path / "out"
    out.mkdir()
    (out / "export.json").symlink_to(outside)

    with pytest.raises(MigrationError, match=r"export\.json: it is a symbolic link"):
        await export_to_json(other_sqlite, out / "export.json")

    assert outside.read_text() == "untouched"
    assert (out / "export.json").is_symlink()
    assert sorted(p.name for p in out.iterdir()) == ["export.json"]


@pytest.mark.sqlite
async def test_export_into_the_stores_own_files_is_refused(tmp_path: Path) -> None:
    """Found by attack: export_to_json into the SQLite store's own file replaced the
    database with the export and reported success; into its -wal it wrote over that.
    SessionManager.export_to_file's rename did the same. The CLI refused both."""
    from persistence import SessionManager, SQLiteSessionStorage

    path = tmp_path / "store.db"
    hard = tmp_path / "hard.db"
    async with SQLiteSessionStorage(path) as storage:
        session = ChatSession.create("m")
        session.add_message("user", "keep me")
        await storage.save_session(session)
        os.link(path, hard)
        (tmp_path / "sub").mkdir()
        named = [path, hard, tmp_path / "sub" / ".." / "store.db", Path(f"{path}-wal")]
        for target in named:
            with pytest.raises(InvalidDataError, match=r"refusing to write .*: it is the"):
                await export_to_json(storage, target)
        manager = SessionManager(storage, auto_save_enabled=False)
        for target in (path, Path(f"{path}-journal")):
            with pytest.raises(InvalidDataError, match=r"refusing to write .*: it is the"):
                await manager.export_to_file(session.session_id, target, "text")
        assert (await export_to_json(storage, tmp_path / "export.json"))["sessions"] == 1
    hard.unlink()  # a file of two names is refused at open
    async with SQLiteSessionStorage(path) as reopened:
        loaded = await reopened.load_session(session.session_id)
        assert loaded is not None and [m.content for m in loaded.messages] == ["keep me"]


async def test_export_over_another_sqlite_database_or_journal_is_refused(
    other_sqlite: SessionStorage, tmp_path: Path
) -> None:
    """Found by attack: export_to_json and SessionManager.export_to_file refused only
    the store's own files; over another database they replaced it with the export."""
    from persistence import SessionManager

    (tmp_path / "out").mkdir()
    database = tmp_path / "out" / "another.db"
    with contextlib.closing(sqlite3.connect(database)) as connection:
        connection.execute("CREATE TABLE t (x)")
        connection.commit()
    before = database.read_bytes()
    manager = SessionManager(other_sqlite, auto_save_enabled=False)
    session = ChatSession.create("m")
    await other_sqlite.save_session(session)
    for target in (database, Path(f"{database}-wal"), Path(f"{database}-journal")):
        with pytest.raises(InvalidDataError, match=r"refusing to write .*: it is .*SQLite"):
            await export_to_json(other_sqlite, target)
        with pytest.raises(InvalidDataError, match=r"refusing to write .*: it is .*SQLite"):
            await manager.export_to_file(session.session_id, target, "text")
    assert database.read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["another.db"]


async def test_a_database_made_at_the_output_while_the_export_runs_is_not_replaced(
    other_sqlite: SessionStorage, tmp_path: Path
) -> None:
    """Found by attack: the output was checked once, before the store was read, and the
    temp file renamed over it at the end: a database made there meanwhile was lost."""
    target = tmp_path / "out.db"
    await other_sqlite.save_session(ChatSession.create("m"))

    def made_meanwhile(done: int, total: int) -> None:
        if not target.exists():
            with contextlib.closing(sqlite3.connect(target)) as connection:
                connection.execute("CREATE TABLE kept (x)")
                connection.commit()

    with pytest.raises(InvalidDataError, match=r"out\.db: it is a SQLite database"):
        await export_to_json(other_sqlite, target, progress_callback=made_meanwhile)
    with contextlib.closing(sqlite3.connect(target)) as connection:
        assert connection.execute("SELECT count(*) FROM kept").fetchone() == (0,)
    assert [name for name in os.listdir(tmp_path) if "partial" in name] == []


_UNREADABLE_CHILD = """
import asyncio, sys
from persistence import ChatSession, SQLiteSessionStorage
from persistence.transfer import export_to_json

async def main():
    async with SQLiteSessionStorage(sys.argv[1]) as storage:
        await storage.save_session(ChatSession.create("m"))
        for target in sys.argv[2:]:
            try:
                await export_to_json(storage, target)
                print("written", target)
            except Exception as exc:
                print("refused", type(exc).__name__, exc)

asyncio.run(main())
"""


def test_an_export_over_a_file_it_cannot_read_is_refused(tmp_path: Path) -> None:
    """Found by attack: another user's 0600 database, in a directory the caller may
    write, counted as "not a database" (its first bytes could not be read), and the
    export's rename replaced it; an export named as its -wal made it unopenable. Run
    as a process bound by file permissions: as root, with its capabilities dropped."""
    import subprocess
    import sys

    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    other = shared / "other.db"
    with contextlib.closing(sqlite3.connect(other)) as connection:
        connection.execute("CREATE TABLE kept (value TEXT)")
        connection.execute("INSERT INTO kept VALUES ('precious')")
        connection.commit()
    command = [sys.executable, "-c", _UNREADABLE_CHILD, str(tmp_path / "mine.db")]
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv to drop the capabilities")
        os.chown(other, 65534, 65534)  # another user's (nobody's)
        command = ["setpriv", "--bounding-set=-all", "--inh-caps=-all", *command]
    other.chmod(0o600 if os.geteuid() == 0 else 0o000)
    before = other.read_bytes()
    result = subprocess.run(
        [*command, str(other), f"{other}-wal", f"{other}-journal"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])},
    )
    lines = result.stdout.splitlines()
    assert len(lines) == 3 and all(line.startswith("refused InvalidDataError") for line in lines), (
        result.stdout + result.stderr
    )
    assert "cannot read" in lines[0] and "cannot read" in lines[1]
    assert other.read_bytes() == before
    assert sorted(p.name for p in shared.iterdir()) == ["other.db"]


async def test_export_writes_through_a_fifo(other_sqlite: SessionStorage, tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()))
    reader.start()
    result = await export_to_json(other_sqlite, fifo)
    reader.join(timeout=30)
    assert stat.S_ISFIFO(fifo.lstat().st_mode)  # still the FIFO, not a file in its place
    assert json.loads(received[0])["format"] == FORMAT_NAME
    assert result["bytes"] == len(received[0])


async def test_export_writes_through_a_symlink_to_a_fifo_and_leaves_both(
    other_sqlite: SessionStorage, tmp_path: Path
) -> None:
    """Found by attack: a link to a FIFO or device (/dev/stdout, /dev/stderr) was
    refused as a symlink; there is no file to replace, so it is written through."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    link = tmp_path / "link.json"
    link.symlink_to(fifo)
    received: list[bytes] = []
    # A daemon: if the export fails, the reader blocked on the FIFO stops no one.
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()), daemon=True)
    reader.start()
    await export_to_json(other_sqlite, link)
    reader.join(timeout=30)
    assert link.is_symlink() and stat.S_ISFIFO(fifo.lstat().st_mode)
    assert json.loads(received[0])["format"] == FORMAT_NAME


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full")
async def test_export_to_a_full_device_fails_naming_it(other_sqlite: SessionStorage) -> None:
    with pytest.raises(MigrationError, match="cannot write /dev/full: No space left on device"):
        await export_to_json(other_sqlite, "/dev/full")
    assert stat.S_ISCHR(os.lstat("/dev/full").st_mode)


async def test_export_to_a_directory_is_refused(
    other_sqlite: SessionStorage, tmp_path: Path
) -> None:
    with pytest.raises(MigrationError, match="it is a directory"):
        await export_to_json(other_sqlite, tmp_path)


async def test_export_into_a_missing_directory_is_refused(
    other_sqlite: SessionStorage, tmp_path: Path
) -> None:
    with pytest.raises(MigrationError, match="nowhere: no such directory"):
        await export_to_json(other_sqlite, tmp_path / "nowhere" / "export.json")


def _last_session(document: dict[str, Any]) -> dict[str, Any]:
    return document["sessions"][-1]  # type: ignore[no-any-return]


def _edit(change: Callable[[dict[str, Any]], None]) -> Callable[[bytes], bytes]:
    def edit(raw: bytes) -> bytes:
        document = json.loads(raw)
        change(document)
        return json.dumps(document, ensure_ascii=False).encode()

    return edit


def _set(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda document: document.__setitem__(key, value)


def _last_message(document: dict[str, Any]) -> dict[str, Any]:
    return _last_session(document)["messages"][-1]  # type: ignore[no-any-return]


def _duplicate_message_id(document: dict[str, Any]) -> None:
    _last_message(document)["message_id"] = document["sessions"][0]["messages"][0]["message_id"]


def _duplicate_session(document: dict[str, Any]) -> None:
    copy = json.loads(json.dumps(document["sessions"][0]))
    for index, message in enumerate(copy["messages"]):
        message["message_id"] = f"fresh-{index}"
    document["sessions"].append(copy)
    document["counts"]["sessions"] += 1
    document["counts"]["messages"] += len(copy["messages"])


def _without_counts(document: dict[str, Any]) -> None:
    del document["counts"]


REFUSED: list[tuple[str, Callable[[bytes], bytes], str]] = [
    ("truncated in the middle", lambda raw: raw[: len(raw) // 2], "truncated"),
    ("truncated at the end", lambda raw: raw[:-3], "truncated"),
    ("empty", lambda raw: b"", "empty"),
    ("not json", lambda raw: b"hello", "not valid JSON"),
    ("a json array", lambda raw: b"[]", "not a JSON object"),
    ("trailing garbage", lambda raw: raw + b"{}", "not valid JSON"),
    ("invalid utf-8", lambda raw: raw.replace(b'"gemini-9"', b'"gemini-\xff"'), "JSON"),
    # Found by attack: these passed the parser and failed as a bare UnicodeDecodeError.
    (
        "an encoded surrogate",
        lambda raw: raw.replace(b'"gemini-9"', b'"gemini-\xed\xa0\x80"'),
        r"a string is not UTF-8 \(invalid continuation byte: b'\\xed'\)",
    ),
    (
        "an overlong encoding",
        lambda raw: raw.replace(b'"gemini-9"', b'"gemini-\xc0\xaf"'),
        "a string is not UTF-8",
    ),
    ("foreign format", _edit(_set("format", "something-else")), "not an export file"),
    ("future version", _edit(_set("version", 2)), "newer"),
    ("version as text", _edit(_set("version", "1")), "version"),
    ("unknown version", _edit(_set("version", 0)), "unknown format version"),
    ("no export time", _edit(lambda d: d.pop("exported_at")), "exported_at"),
    ("unknown key", _edit(_set("extra", 1)), "unexpected top-level key"),
    ("no counts", _edit(_without_counts), "counts"),
    ("wrong counts", _edit(lambda d: d["counts"].__setitem__("files", 4)), "counts"),
    ("unknown role", _edit(lambda d: _last_message(d).__setitem__("role", "wizard")), "role"),
    (
        "naive time",
        _edit(lambda d: _last_message(d).__setitem__("created_at", "2026-01-01T00:00:00")),
        "timezone-aware",
    ),
    # Found by review: numbers were read as Unix time, seconds or milliseconds guessed.
    (
        "a number as a time",
        _edit(lambda d: _last_message(d).__setitem__("created_at", 1_700_000_000_123)),
        "Unix time is ambiguous",
    ),
    (
        "digits as a time",
        _edit(lambda d: _last_session(d).__setitem__("updated_at", "1700000000")),
        "Unix time is ambiguous",
    ),
    ("nul in content", _edit(lambda d: _last_message(d).__setitem__("content", "a\x00b")), "NUL"),
    ("lone surrogate", lambda raw: raw.replace(b'"gemini-9"', b'"gemini-\\ud800"'), "unicode"),
    ("unknown session field", _edit(lambda d: _last_session(d).__setitem__("colour", 1)), "colour"),
    (
        "message of another session",
        _edit(lambda d: _last_message(d).__setitem__("session_id", "ab")),
        "session_id",
    ),
    (
        "message_count off",
        _edit(lambda d: _last_session(d).__setitem__("message_count", 1)),
        "message_count",
    ),
    ("negative file size", _edit(lambda d: d["file_records"][-1].__setitem__("size", -1)), "size"),
    ("duplicate session id", _edit(_duplicate_session), "duplicate session_id"),
    ("duplicate message id", _edit(_duplicate_message_id), "duplicate message_id"),
    (
        "duplicate file id",
        _edit(
            lambda d: d["file_records"][-1].__setitem__("file_id", d["file_records"][0]["file_id"])
        ),
        "duplicate file_id",
    ),
    ("sessions not a list", _edit(_set("sessions", {})), "not a JSON array"),
    # Found by attack: defaults filled in a missing id or time, a new one each import.
    (
        "a message without its id",
        _edit(lambda d: _last_message(d).pop("message_id")),
        r"messages\[\d+\]: message_id missing",
    ),
    ("a session without its id", _edit(lambda d: _last_session(d).pop("session_id")), "missing"),
    (
        "a session without status and times",
        _edit(lambda d: [_last_session(d).pop(key) for key in ("status", "updated_at")]),
        "updated_at, status missing",
    ),
    (
        "a file record without its upload time",
        _edit(lambda d: d["file_records"][-1].pop("uploaded_at")),
        "uploaded_at missing",
    ),
    # Found by attack: the exact re-read of a number past 64 bits gave yajl's C code an
    # integer past Python's 4,300-digit limit: a SystemError, then a crashed process.
    # Valid JSON, past what any store keeps (found by attack: called a corrupt file).
    (
        "a number of 5,000 digits",
        lambda raw: _with_number(raw, "1" + "0" * 5_000),
        "out of the range any store keeps",
    ),
    (
        "a number of a million digits",
        lambda raw: _with_number(raw, "9" * 1_000_000),
        "out of the range any store keeps",
    ),
    # Found by attack: 32,000 levels (64 KB) took 2.5 GB to build, 200,000 all memory.
    (
        "metadata nested 200,000 levels",
        lambda raw: _with_number(raw, "[" * 200_000 + "]" * 200_000),
        "a record nests deeper than 71 levels",
    ),
    # Found by attack: the parser kept the last of two values of one key, silently.
    (
        "a message's key twice",
        lambda raw: raw.replace(b'"content": ', b'"content": "EVIL", "content": ', 1),
        r"sessions\[0\]: the key 'content' appears twice",
    ),
    (
        "a metadata key twice",
        lambda raw: raw.replace(b'"metadata": {', b'"metadata": {"float": 2, ', 1),
        "the key 'float' appears twice",
    ),
    (
        "a file record's key twice",
        lambda raw: raw.replace(b'"size": ', b'"size": 1, "size": ', 1),
        r"file_records\[0\]: the key 'size' appears twice",
    ),
    (
        "counts twice",
        lambda raw: raw.replace(b'"counts": ', b'"counts": {"sessions": 99},\n"counts": ', 1),
        "'counts' appears twice",
    ),
]


@pytest.mark.parametrize(
    ("mutate", "error"), [case[1:] for case in REFUSED], ids=[case[0] for case in REFUSED]
)
async def test_a_bad_file_is_refused_before_anything_is_written(
    sql_storage: SessionStorage,
    exported: Path,
    tmp_path: Path,
    mutate: Callable[[bytes], bytes],
    error: str,
) -> None:
    own = ChatSession.create("m", session_id="mine")
    own.add_message("user", "kept")
    await sql_storage.save_session(own)
    before = await snapshot(sql_storage)
    bad = tmp_path / "bad.json"
    _write_mutated(exported, bad, mutate)

    with pytest.raises(InvalidDataError, match=error):
        await import_from_json(sql_storage, bad)

    assert await snapshot(sql_storage) == before


def test_a_key_twice_is_reported_at_the_record_that_holds_it(
    exported: Path, tmp_path: Path
) -> None:
    """Found by attack: the parser builds records a buffer ahead, and a key twice in
    sessions[1500] was reported at sessions[1480] (here: the last at the first)."""
    document = _read_json(exported)
    last = len(document["sessions"]) - 1
    document["sessions"][last]["metadata"] = {"AAAA": 1, "BBBB": 2}
    bad = tmp_path / "bad.json"
    bad.write_bytes(json.dumps(document).encode().replace(b'"BBBB"', b'"AAAA"'))

    with pytest.raises(InvalidDataError, match=re.escape(f"sessions[{last}]: the key 'AAAA'")):
        validate_export_file(bad)


async def test_metadata_as_deep_as_a_message_keeps_it_imports(
    other_sqlite: SessionStorage, storage: SessionStorage, tmp_path: Path
) -> None:
    """The bound on a record's depth (json_stream.MAX_RECORD_DEPTH) leaves room for the
    deepest metadata a message or a session keeps."""
    deepest: Any = 1
    for _ in range(MAX_METADATA_DEPTH - 1):  # under the metadata object itself
        deepest = [deepest]
    session = ChatSession.create("m", session_id="deep", metadata={"k": deepest})
    session.add_message("user", "deep", metadata={"k": deepest})
    await other_sqlite.save_session(session)
    path = tmp_path / "deep.json"
    await export_to_json(other_sqlite, path)

    await import_from_json(storage, path)

    assert await snapshot(storage) == await snapshot(other_sqlite)


async def test_a_file_an_editor_saved_with_a_byte_order_mark_imports(
    sqlite_storage: SessionStorage, other_sqlite: SessionStorage, exported: Path, tmp_path: Path
) -> None:
    # Found by attack: it was refused as "not valid JSON (truncated or corrupt file)".
    marked = tmp_path / "marked.json"
    _write_mutated(exported, marked, lambda raw: b"\xef\xbb\xbf" + raw)

    result = await import_from_json(sqlite_storage, marked)

    assert result["sessions_imported"] == 10
    assert await snapshot(sqlite_storage) == await snapshot(other_sqlite)


async def test_importing_a_missing_file_is_refused(
    sqlite_storage: SessionStorage, tmp_path: Path
) -> None:
    with pytest.raises(InvalidDataError, match="no such file"):
        await import_from_json(sqlite_storage, tmp_path / "missing.json")


async def _peak_bytes(work: Any) -> int:
    tracemalloc.start()
    try:
        await work
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


async def test_export_and_import_stream_instead_of_holding_the_file(
    sqlite_storage: SessionStorage, other_sqlite: SessionStorage, tmp_path: Path
) -> None:
    for index in range(150):
        session = ChatSession.create("m", session_id=f"s{index:03d}")
        session.add_message("user", f"{index} " + "y" * 100_000)
        await other_sqlite.save_session(session)
    path = tmp_path / "big.json"

    exported_peak = await _peak_bytes(export_to_json(other_sqlite, path, batch_size=5))
    imported_peak = await _peak_bytes(import_from_json(sqlite_storage, path, batch_size=5))

    size = path.stat().st_size
    assert size > 15_000_000
    assert exported_peak < size / 4
    assert imported_peak < size / 4
    assert (await sqlite_storage.count()).messages == 150


async def test_validate_export_file_checks_without_writing(exported: Path, tmp_path: Path) -> None:
    assert validate_export_file(exported) == {
        "format_version": 1,
        "sessions": 10,
        "messages": sum(len(s.messages) for s in build_sessions()),
        "files": 3,
    }
    bad = tmp_path / "bad.json"
    _write_mutated(exported, bad, lambda raw: raw[:-10])
    with pytest.raises(InvalidDataError, match="truncated"):
        validate_export_file(bad)
