"""verify_migration catches what was changed behind the API's back, with SQL."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, cast

import pytest
from sqlalchemy import Table, delete, insert, update
from sqlalchemy.ext.asyncio import AsyncConnection

from persistence import ChatSession, SessionStorage
from persistence.sql.runner import traced
from persistence.sql.tables import FileRow, MessageRow, SessionRow
from persistence.transfer import migrate_storage, verify_migration
from persistence.transfer.migration import copy_storage, verify_copied
from tests.transfer import data
from tests.transfer.data import populate

sessions = cast(Table, SessionRow.__table__)
messages = cast(Table, MessageRow.__table__)
files = cast(Table, FileRow.__table__)
Tamper = Callable[[AsyncConnection], Awaitable[Any]]


async def _changed_content(connection: AsyncConnection) -> None:
    await connection.execute(
        update(messages).where(messages.c.message_id == "ab-m1").values(content="tampered")
    )


async def _missing_message(connection: AsyncConnection) -> None:
    await connection.execute(delete(messages).where(messages.c.message_id == "a-b-m2"))


async def _extra_message(connection: AsyncConnection) -> None:
    await connection.execute(
        insert(messages).values(
            message_id="planted",
            session_id="Zz",
            position=999,
            role="user",
            content="planted",
            created_at=data._at(0),
            metadata={},
        )
    )


async def _extra_session(connection: AsyncConnection) -> None:
    await connection.execute(
        insert(sessions).values(
            session_id="planted",
            model="m",
            created_at=data._at(0),
            updated_at=data._at(0),
            message_count=0,
            metadata={},
            status="active",
            revision=1,
            incarnation="planted",
            next_position=0,
        )
    )


async def _changed_file(connection: AsyncConnection) -> None:
    await connection.execute(
        update(files).where(files.c.file_id == "file-1-b").values(size=files.c.size + 1)
    )


async def _missing_file(connection: AsyncConnection) -> None:
    await connection.execute(delete(files).where(files.c.file_id == "file-2-ü"))


async def _changed_status(connection: AsyncConnection) -> None:
    await connection.execute(
        update(sessions).where(sessions.c.session_id == "é").values(status="active")
    )


async def _changed_metadata_type(connection: AsyncConnection) -> None:
    # 1 and 1.0 compare equal in Python; an exact copy keeps which one it was.
    await connection.execute(
        update(messages)
        .where(messages.c.message_id == "AB-m1")
        .values(metadata={"turn": 1.0, "score": 1 / 3})
    )


async def _swapped_messages(connection: AsyncConnection) -> None:
    for message_id, position in (("s-0-m0", -1), ("s-0-m1", 0), ("s-0-m0", 1)):
        await connection.execute(
            update(messages).where(messages.c.message_id == message_id).values(position=position)
        )


TAMPERING: list[tuple[str, Tamper, dict[str, Any], str]] = [
    (
        "changed message content",
        _changed_content,
        {
            "kind": "message",
            "problem": "different",
            "id": "ab-m1",
            "field": "content",
            "destination": "tampered",
        },
        "differing_messages",
    ),
    (
        "missing message",
        _missing_message,
        {"kind": "message", "problem": "missing", "id": "a-b-m2", "session_id": "a-b"},
        "missing_messages",
    ),
    (
        "extra message",
        _extra_message,
        {"kind": "message", "problem": "extra", "id": "planted", "session_id": "Zz"},
        "extra_messages",
    ),
    (
        "extra session",
        _extra_session,
        {"kind": "session", "problem": "extra", "id": "planted"},
        "extra_sessions",
    ),
    (
        "changed file record",
        _changed_file,
        {
            "kind": "file",
            "problem": "different",
            "id": "file-1-b",
            "field": "size",
            "source": 1_000_000_007,
            "destination": 1_000_000_008,
        },
        "differing_files",
    ),
    (
        "missing file record",
        _missing_file,
        {"kind": "file", "problem": "missing", "id": "file-2-ü"},
        "missing_files",
    ),
    (
        "changed status",
        _changed_status,
        {
            "kind": "session",
            "problem": "different",
            "id": "é",
            "field": "status",
            "source": "expired",
            "destination": "active",
        },
        "differing_sessions",
    ),
    (
        "changed metadata type",
        _changed_metadata_type,
        {"kind": "message", "problem": "different", "id": "AB-m1", "field": "metadata"},
        "differing_messages",
    ),
    (
        "swapped messages",
        _swapped_messages,
        {"kind": "session", "problem": "out_of_order", "id": "s-0"},
        "misordered_sessions",
    ),
]


def _engine_of(storage: SessionStorage) -> Any:
    return storage.engine  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("tamper", "expected", "total"),
    [case[1:] for case in TAMPERING],
    ids=[case[0] for case in TAMPERING],
)
async def test_verification_catches_tampering(
    sql_pair: tuple[SessionStorage, SessionStorage],
    tamper: Tamper,
    expected: dict[str, Any],
    total: str,
) -> None:
    source, destination = sql_pair
    await populate(source)
    await migrate_storage(source, destination)
    assert (await verify_migration(source, destination))["ok"] is True

    async with _engine_of(destination).begin() as connection:
        await tamper(connection)
    report = await verify_migration(source, destination)

    assert report["ok"] is False
    assert report[total] == 1
    assert report["mismatch_count"] == len(report["mismatches"])
    matching = [
        entry
        for entry in report["mismatches"]
        if all(entry.get(key) == value for key, value in expected.items())
    ]
    assert matching, report["mismatches"]


async def _lost_metadata_key(connection: AsyncConnection) -> None:
    await connection.execute(
        update(sessions).where(sessions.c.session_id == "é").values(metadata={"index": 0})
    )


# What a merge never leaves behind: the check a migration runs must still fail on it.
FAILED_COPIES = {
    "changed message content": (_changed_content, "differing_messages"),
    "missing message": (_missing_message, "missing_messages"),
    "swapped messages": (_swapped_messages, "misordered_sessions"),
    "lost metadata key": (_lost_metadata_key, "differing_sessions"),
}


@pytest.mark.parametrize(("tamper", "total"), FAILED_COPIES.values(), ids=FAILED_COPIES.keys())
async def test_the_additive_check_still_catches_a_failed_copy(
    sql_pair: tuple[SessionStorage, SessionStorage], tamper: Tamper, total: str
) -> None:
    source, destination = sql_pair
    await populate(source)
    await migrate_storage(source, destination)
    async with _engine_of(destination).begin() as connection:
        await tamper(connection)

    report = await verify_migration(source, destination, additive=True)

    assert report["ok"] is False
    assert report[total] == 1


@pytest.mark.parametrize(("tamper", "total"), FAILED_COPIES.values(), ids=FAILED_COPIES.keys())
async def test_the_check_a_migration_runs_still_catches_a_failed_copy(
    sql_pair: tuple[SessionStorage, SessionStorage], tamper: Tamper, total: str
) -> None:
    """Comparing only what the copy wrote must not pass a copy that lost something: a
    change behind the API's back keeps the revision the copy left."""
    source, destination = sql_pair
    await populate(source)
    copy = await copy_storage(source, destination)
    async with _engine_of(destination).begin() as connection:
        await tamper(connection)

    report = await verify_copied(copy)

    assert report["ok"] is False
    assert report[total] == 1
    assert report["sessions_written_since"] == 0


async def test_the_check_a_migration_runs_names_a_session_gone_from_the_destination(
    sql_pair: tuple[SessionStorage, SessionStorage],
) -> None:
    source, destination = sql_pair
    await populate(source)
    copy = await copy_storage(source, destination)
    async with _engine_of(destination).begin() as connection:
        await connection.execute(delete(sessions).where(sessions.c.session_id == "é"))

    report = await verify_copied(copy)

    assert report["ok"] is False
    assert report["missing_sessions"] == 1
    assert [m["id"] for m in report["mismatches"]] == ["é"]


async def test_the_additive_check_accepts_the_fields_a_merge_keeps(
    sql_pair: tuple[SessionStorage, SessionStorage],
) -> None:
    source, destination = sql_pair
    await populate(source)
    await migrate_storage(source, destination)
    held = await destination.load_session("é")
    assert held is not None
    held.status = "active"
    await destination.save_session(held)

    assert (await verify_migration(source, destination))["ok"] is False
    report = await verify_migration(source, destination, additive=True)
    assert report["ok"] is True
    assert report["sessions_with_own_fields"] == 1


async def test_the_additive_check_catches_a_field_copied_wrongly_into_a_new_session(
    sql_pair: tuple[SessionStorage, SessionStorage],
) -> None:
    """A session the copy inserted and nobody wrote since (revision 1) must hold the
    source's fields: a difference there is a failed copy, not the destination's own."""
    source, destination = sql_pair
    await populate(source)
    await migrate_storage(source, destination)
    async with _engine_of(destination).begin() as connection:
        await _changed_status(connection)

    report = await verify_migration(source, destination, additive=True)
    assert report["ok"] is False
    assert report["sessions_with_own_fields"] == 0


async def test_verification_of_equal_stores_is_ok_and_counts_what_it_checked(
    pair: tuple[SessionStorage, SessionStorage],
) -> None:
    source, destination = pair
    await populate(source)
    await migrate_storage(source, destination, verify=False)

    report = await verify_migration(source, destination, batch_size=2)

    assert report["ok"] is True
    assert report["mismatches"] == []
    assert report["sessions_checked"] == 10
    assert report["messages_checked"] == sum(len(s.messages) for s in data.build_sessions())
    assert report["files_checked"] == 3
    assert report["source_counts"] == report["destination_counts"]


async def test_verification_of_an_empty_destination_lists_every_source_record(
    sqlite_storage: SessionStorage, other_sqlite: SessionStorage
) -> None:
    await populate(sqlite_storage)

    report = await verify_migration(sqlite_storage, other_sqlite)

    assert report["ok"] is False
    assert report["missing_sessions"] == 10
    assert report["missing_messages"] == sum(len(s.messages) for s in data.build_sessions())
    assert report["missing_files"] == 3
    assert {e["id"] for e in report["mismatches"] if e["kind"] == "session"} == set(
        data.SESSION_IDS
    )


async def test_a_long_mismatch_list_is_cut_but_fully_counted(
    sqlite_storage: SessionStorage,
    other_sqlite: SessionStorage,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import persistence.transfer.verification

    monkeypatch.setattr(persistence.transfer.verification, "MISMATCH_LIMIT", 4)
    await populate(sqlite_storage)

    report = await verify_migration(sqlite_storage, other_sqlite)

    assert len(report["mismatches"]) == 4
    assert report["mismatch_count"] == 13
    assert report["mismatches_truncated"] is True


async def test_a_long_content_difference_is_shown_shortened(
    sql_pair: tuple[SessionStorage, SessionStorage],
) -> None:
    source, destination = sql_pair
    await populate(source)
    await migrate_storage(source, destination)
    async with _engine_of(destination).begin() as connection:
        await connection.execute(
            update(messages).where(messages.c.message_id == "ab-m1").values(content="short")
        )

    report = await verify_migration(source, destination)

    (entry,) = report["mismatches"]
    assert entry["source"].endswith(f"({len(data.LARGE_CONTENT)} characters)")
    assert len(entry["source"]) < 300


async def _statements_of_verification(pair: tuple[SessionStorage, SessionStorage], n: int) -> int:
    source, destination = pair
    sessions = [ChatSession.create("m", session_id=f"v{n}-{i:03d}") for i in range(n)]
    for session in sessions:
        session.add_message("user", "hello")
    await source.insert_sessions(sessions)
    for index in range(n):
        await source.save_file_record(
            data.build_file_records()[0].model_copy(update={"file_id": f"f{n}-{index}"})
        )
    await migrate_storage(source, destination, verify=False)
    statements: list[str] = []
    with traced(statements.append):
        report = await verify_migration(source, destination, batch_size=100)
    assert report["ok"] is True
    return len(statements)


async def test_verification_costs_the_same_statements_for_10_or_60_sessions_and_files(
    sql_pair: tuple[SessionStorage, SessionStorage],
) -> None:
    few = await _statements_of_verification(sql_pair, 10)
    many = await _statements_of_verification(sql_pair, 50)

    assert many == few
