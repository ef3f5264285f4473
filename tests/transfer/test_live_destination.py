"""Moving data into a store that live service instances are writing.

The live writer is a second storage on the same store (another connection, as
another service process would hold), writing between a batch's read of the
destination and its write: the one moment a batch can be wrong about what the
destination holds.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from persistence import (
    ChatSession,
    PostgreSQLSessionStorage,
    SessionConflictError,
    SessionStorage,
    SQLiteSessionStorage,
    UploadedFileRecord,
)
from persistence.transfer import export_to_json, import_from_json, migrate_storage
from tests.transfer.data import _at, build_file_records


@asynccontextmanager
async def second_storage(storage: SessionStorage) -> AsyncIterator[SessionStorage]:
    """Another storage on the same store: what another service instance holds."""
    other: SessionStorage
    if isinstance(storage, SQLiteSessionStorage):
        other = SQLiteSessionStorage(storage.database_path)
    else:
        assert isinstance(storage, PostgreSQLSessionStorage)
        other = PostgreSQLSessionStorage(storage.url.render_as_string(hide_password=False))
    async with other:
        yield other


@asynccontextmanager
async def service_writes_between_read_and_write(
    monkeypatch: pytest.MonkeyPatch,
    destination: SessionStorage,
    live_write: Callable[[SessionStorage], Awaitable[None]],
    *,
    batch: int = 1,
    on: SessionStorage | None = None,
) -> AsyncIterator[None]:
    """Inside the block, a service (a second storage on `on`, the destination unless
    given) runs `live_write(service)` once, right after batch number `batch` has read
    the destination (the batches before it are written by then)."""
    read = destination.load_sessions
    reads: list[bool] = []
    async with second_storage(on or destination) as service:

        async def read_then_live_write(session_ids: Any, **options: Any) -> Any:
            found = await read(session_ids, **options)
            reads.append(True)
            if len(reads) == batch:
                await live_write(service)
            return found

        monkeypatch.setattr(destination, "load_sessions", read_then_live_write)
        try:
            yield
        finally:
            monkeypatch.undo()


def _source_sessions() -> list[ChatSession]:
    sessions = []
    for n in range(3):
        session = ChatSession.create("source-model", session_id=f"live-{n}")
        session.metadata = {"title": f"source title {n}", "origin": "source"}
        session.add_message("user", f"hello {n}")
        session.add_message("assistant", f"hi {n}")
        sessions.append(session)
    return sessions


@pytest.fixture
async def exported(sql_storage: SessionStorage, tmp_path: Path) -> Path:
    """An export file of three sessions, made from a scratch SQLite store."""
    async with SQLiteSessionStorage(tmp_path / "scratch.db") as scratch:
        for session in _source_sessions():
            await scratch.save_session(session)
        path = tmp_path / "export.json"
        await export_to_json(scratch, path)
    return path


async def test_a_live_write_of_a_key_the_merge_adds_makes_the_batch_plan_again(
    sql_storage: SessionStorage, exported: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by attack: a service setting the metadata key a merge was adding, between
    the batch's read and its write, raised SessionConflictError and stopped the import."""
    destination = sql_storage
    held = ChatSession.create("live-model", session_id="live-0")
    held.add_message("user", "hello 0 (destination's own)")
    await destination.save_session(held)

    async def live_write(service: SessionStorage) -> None:
        mine = await service.load_session("live-0")
        assert mine is not None
        mine.metadata["title"] = "set by the service"
        mine.add_message("user", "written live")
        await service.save_session(mine)

    async with service_writes_between_read_and_write(monkeypatch, destination, live_write):
        result = await import_from_json(destination, exported)

    stored = await destination.load_session("live-0")
    assert stored is not None
    assert stored.metadata == {"title": "set by the service", "origin": "source"}
    assert stored.model == "live-model"
    contents = [m.content for m in stored.messages]
    assert contents[:2] == ["hello 0 (destination's own)", "written live"]
    assert sorted(contents[2:]) == ["hello 0", "hi 0"]
    assert (result["sessions_imported"], result["sessions_already_present"]) == (3, 0)
    assert result["messages_imported"] == 6


async def test_a_session_a_service_creates_meanwhile_keeps_its_fields(
    sql_storage: SessionStorage, exported: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by attack: a session the batch read as absent, created by a service before
    the batch wrote it, took the file's model, status and metadata values: the unit of
    work's create merged the file's copy over the service's write."""
    destination = sql_storage
    touched = ChatSession.create("live-model", session_id="live-1")
    touched.add_message("user", "something the file lacks")
    await destination.save_session(touched)  # merged by the batch: its careful path

    async def live_write(service: SessionStorage) -> None:
        created = ChatSession.create("service-model", session_id="live-2")
        created.metadata = {"title": "the service's title"}
        created.add_message("user", "the service's first message")
        await service.save_session(created)

    async with service_writes_between_read_and_write(monkeypatch, destination, live_write):
        result = await import_from_json(destination, exported)

    stored = await destination.load_session("live-2")
    assert stored is not None
    assert stored.model == "service-model"
    assert stored.metadata == {"title": "the service's title", "origin": "source"}
    assert [m.content for m in stored.messages] == [
        "the service's first message",
        "hello 2",
        "hi 2",
    ]
    assert result["sessions_imported"] == 3
    assert result["messages_imported"] == 6


async def test_a_live_write_during_a_migration_is_kept_and_verified(
    sql_pair: tuple[SessionStorage, SessionStorage], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same race through migrate_storage: the copy completes, keeps the service's
    write, and its verification passes."""
    source, destination = sql_pair
    for session in _source_sessions():
        await source.save_session(session)
    held = ChatSession.create("live-model", session_id="live-0")
    await destination.save_session(held)

    async def live_write(service: SessionStorage) -> None:
        mine = await service.load_session("live-0")
        assert mine is not None
        mine.metadata["title"] = "set by the service"
        await service.save_session(mine)

    async with service_writes_between_read_and_write(monkeypatch, destination, live_write):
        result = await migrate_storage(source, destination)

    stored = await destination.load_session("live-0")
    assert stored is not None
    assert stored.metadata["title"] == "set by the service"
    assert len(stored.messages) == 2
    assert result["verified"] is True, result["verification"]
    assert result["sessions_migrated"] == 3


async def test_an_import_runs_beside_a_service_writing_the_same_sessions(
    sql_storage: SessionStorage, tmp_path: Path
) -> None:
    """A service appending to and titling the sessions an import merges, all along:
    the import completes and every write of the service stays."""
    destination = sql_storage
    async with SQLiteSessionStorage(tmp_path / "busy-source.db") as scratch:
        for n in range(40):
            session = ChatSession.create("source-model", session_id=f"busy-{n:02d}")
            session.metadata = {"title": "from the file", "tag": n}
            session.add_message("user", f"file {n}")
            await scratch.save_session(session)
        exported = tmp_path / "busy.json"
        await export_to_json(scratch, exported)
    for n in range(0, 40, 2):  # half of them held already: merged
        await destination.save_session(ChatSession.create("live", session_id=f"busy-{n:02d}"))

    written: dict[str, list[str]] = {}
    stop = asyncio.Event()

    async def service(ids: list[str]) -> None:
        async with second_storage(destination) as mine:
            turn = 0
            while not stop.is_set():
                for session_id in ids:
                    while (held := await mine.load_session(session_id)) is not None:
                        held.metadata["title"] = f"service {turn}"
                        held.add_message("user", f"service {turn}")
                        try:
                            await mine.save_session(held)
                        except SessionConflictError:
                            continue  # the import merged a title first: reapply
                        written.setdefault(session_id, []).append(f"service {turn}")
                        break
                turn += 1
                await asyncio.sleep(0)

    ids = [f"busy-{n:02d}" for n in range(40)]
    tasks = [asyncio.create_task(service(ids[i::2])) for i in range(2)]
    try:
        for _ in range(3):
            await import_from_json(destination, exported, batch_size=4)
    finally:
        stop.set()
        await asyncio.gather(*tasks)

    for session_id in ids:
        stored = await destination.load_session(session_id)
        assert stored is not None
        contents = [m.content for m in stored.messages]
        assert [c for c in contents if c.startswith("service")] == written.get(session_id, [])
        assert contents.count(f"file {int(session_id[-2:])}") == 1
        if session_id in written:
            assert stored.metadata["title"] == written[session_id][-1]


async def test_a_second_migration_verifies_after_the_source_changed_a_field(
    sql_pair: tuple[SessionStorage, SessionStorage],
) -> None:
    """Found by attack: a session the first migration inserted (revision 1 there) whose
    model the source changed since was kept by the second migration, as a merge keeps
    the destination's fields, and its verification then failed on that field."""
    source, destination = sql_pair
    for session in _source_sessions():
        await source.save_session(session)
    await migrate_storage(source, destination)
    changed = await source.load_session("live-1")
    assert changed is not None
    changed.model = "changed-in-source"
    await source.save_session(changed)

    result = await migrate_storage(source, destination)

    assert result["verified"] is True, result["verification"]["mismatches"]
    report = result["verification"]
    assert report["sessions_with_own_fields"] == 1
    assert (report["sessions_checked"], report["sessions_compared"]) == (3, 3)
    assert (await destination.load_session("live-1")).model == "source-model"  # type: ignore[union-attr]


async def test_messages_added_to_the_source_during_the_copy_are_reported_not_failed(
    sql_pair: tuple[SessionStorage, SessionStorage], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by attack: a session gaining a message in the source after its batch was
    copied (a live source) failed verification with a missing message, as did a session
    created in the source behind the copy."""
    source, destination = sql_pair
    for session in _source_sessions():
        await source.save_session(session)

    async def source_written(service: SessionStorage) -> None:
        copied = await service.load_session("live-0")
        assert copied is not None
        copied.add_message("user", "after its batch")
        await service.save_session(copied)
        await service.save_session(ChatSession.create("m", session_id="a-behind-the-copy"))

    async with service_writes_between_read_and_write(
        monkeypatch, destination, source_written, batch=2, on=source
    ):
        result = await migrate_storage(source, destination, batch_size=1)

    report = result["verification"]
    assert result["verified"] is True, report["mismatches"]
    assert result["sessions_migrated"] == 3
    assert report["sessions_changed_in_source_since"] == 1
    assert report["changed_in_source_since"] == ["live-0"]
    assert report["source_sessions_not_copied"] == 1
    assert report["sessions_compared"] == 2
    stored = await destination.load_session("live-0")
    assert stored is not None and len(stored.messages) == 2


async def test_a_service_rewinding_a_copied_session_is_reported_not_failed(
    sql_pair: tuple[SessionStorage, SessionStorage], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by attack: a service rewinding a session the migration had just inserted
    failed the migration's verification with missing messages, though nothing was lost
    by the copy."""
    source, destination = sql_pair
    for session in _source_sessions():
        await source.save_session(session)

    async def service_rewinds(service: SessionStorage) -> None:
        copied = await service.load_session("live-0")
        assert copied is not None
        copied.rewind(None)
        await service.save_session(copied)

    async with service_writes_between_read_and_write(
        monkeypatch, destination, service_rewinds, batch=2
    ):
        result = await migrate_storage(source, destination, batch_size=1)

    report = result["verification"]
    assert result["verified"] is True, report["mismatches"]
    assert report["sessions_written_since"] == 1
    assert report["written_since"] == ["live-0"]
    assert report["inserted"] == ["live-0", "live-1", "live-2"]
    assert report["sessions_inserted"] == 3
    assert (await destination.load_session("live-0")).messages == []  # type: ignore[union-attr]


async def _files_and_a_reupload(
    source: SessionStorage,
) -> tuple[UploadedFileRecord, UploadedFileRecord]:
    """Saves three file records in the source; returns the first, and the same file as
    a service re-uploads it (a new URI and expiry)."""
    for record in build_file_records():
        await source.save_file_record(record)
    first = build_file_records()[0]
    reuploaded = first.model_copy(
        update={"gemini_file_uri": "https://example.invalid/again", "expires_at": _at(90)}
    )
    return first, reuploaded


async def test_a_file_record_the_destination_holds_keeps_its_values(
    sql_pair: tuple[SessionStorage, SessionStorage], tmp_path: Path
) -> None:
    """Found by attack: import, restore and migrate wrote a file record the destination
    held with other values over it (a service's re-upload: its new URI and expiry), so an
    older file put back the expired upload; API.md: they keep what the store holds."""
    source, destination = sql_pair
    first, reuploaded = await _files_and_a_reupload(source)
    await destination.save_file_record(reuploaded)

    result = await migrate_storage(source, destination)
    path = tmp_path / "files.json"
    await export_to_json(source, path)
    imported = await import_from_json(destination, path)

    assert await destination.load_file_record(first.file_id) == reuploaded
    assert (result["files_migrated"], result["files_already_present"]) == (2, 1)
    assert (imported["files_imported"], imported["files_already_present"]) == (0, 3)
    report = result["verification"]
    assert result["verified"] is True, report["mismatches"]
    assert report["files_with_own_fields"] == 1


async def test_a_file_record_a_service_writes_meanwhile_keeps_its_values(
    sql_pair: tuple[SessionStorage, SessionStorage], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by attack: the copy looked up which file records the destination held, then
    saved the others (upserts); a record a service wrote between the two was replaced by
    the source's older one."""
    source, destination = sql_pair
    first, reuploaded = await _files_and_a_reupload(source)
    look = destination.load_file_records

    async def look_then_service_writes(file_ids: Any) -> Any:
        held = await look(file_ids)
        async with second_storage(destination) as service:
            await service.save_file_record(reuploaded)
        return held

    monkeypatch.setattr(destination, "load_file_records", look_then_service_writes)
    result = await migrate_storage(source, destination)
    monkeypatch.undo()

    assert await destination.load_file_record(first.file_id) == reuploaded
    assert (result["files_migrated"], result["files_already_present"]) == (2, 1)
    report = result["verification"]
    assert result["verified"] is True, report["mismatches"]
    assert report["files_with_own_fields"] == 1
    for record in build_file_records()[1:]:
        assert await destination.load_file_record(record.file_id) == record


async def test_a_migration_beside_services_writing_both_stores_verifies_truthfully(
    sql_pair: tuple[SessionStorage, SessionStorage],
) -> None:
    """Services append to sessions of the source and of the destination all along:
    every migration completes, its check passes, and no service write is lost."""
    source, destination = sql_pair
    ids = [f"both-{n:02d}" for n in range(30)]
    for session_id in ids:
        session = ChatSession.create("m", session_id=session_id)
        session.add_message("user", "first")
        await source.save_session(session)
    stop = asyncio.Event()
    appended: dict[str, list[str]] = {}

    async def service(storage: SessionStorage, name: str) -> None:
        async with second_storage(storage) as mine:
            turn = 0
            while not stop.is_set():
                for session_id in ids[turn % 3 :: 3]:
                    held = await mine.load_session(session_id)
                    if held is not None:
                        held.add_message("user", f"{name} {turn}")
                        await mine.save_session(held)  # appends never conflict
                        appended.setdefault(name, []).append(session_id)
                turn += 1
                await asyncio.sleep(0)

    tasks = [
        asyncio.create_task(service(source, "source")),
        asyncio.create_task(service(destination, "destination")),
    ]
    results = []
    try:
        for _ in range(3):
            results.append(await migrate_storage(source, destination, batch_size=4))
    finally:
        stop.set()
        await asyncio.gather(*tasks)

    for result in results:
        assert result["verified"] is True, result["verification"]["mismatches"]
    for session_id in ids:
        stored = await destination.load_session(session_id)
        assert stored is not None
        contents = [m.content for m in stored.messages]
        assert contents.count("first") == 1
        mine = appended.get("destination", []).count(session_id)
        assert sum(c.startswith("destination") for c in contents) == mine
