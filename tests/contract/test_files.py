"""File records: upsert, insert if absent, load, list, expiry."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import pytest

from persistence import InvalidDataError, SessionStorage
from tests.factories import file_record


async def test_file_record_round_trips(storage: SessionStorage) -> None:
    record = file_record(metadata={"pages": 12, "nested": {"ok": True}})

    assert await storage.save_file_record(record) is True

    assert await storage.load_file_record(record.file_id) == record
    assert await storage.load_file_record("missing") is None


async def test_saving_a_file_record_again_replaces_it(storage: SessionStorage) -> None:
    record = file_record()
    await storage.save_file_record(record)
    changed = record.model_copy(update={"display_name": "renamed.pdf", "size": 2048})

    await storage.save_file_record(changed)

    assert await storage.load_file_record(record.file_id) == changed
    assert (await storage.count()).files == 1


async def test_inserting_file_records_keeps_those_the_store_holds(
    storage: SessionStorage,
) -> None:
    held = file_record(file_id="held", display_name="the store's.pdf")
    await storage.save_file_record(held)
    records = [
        file_record(file_id="new-b", metadata={"n": 2}),
        held.model_copy(update={"display_name": "the copy's.pdf", "size": 1}),
        file_record(file_id="new-a"),
    ]

    assert await storage.insert_file_records(records) == ["new-b", "new-a"]
    assert await storage.insert_file_records(records) == []
    assert await storage.insert_file_records([]) == []

    assert await storage.load_file_record("held") == held
    assert await storage.load_file_record("new-b") == records[0]
    assert await storage.load_file_record("new-a") == records[2]
    assert (await storage.count()).files == 3


async def test_list_file_records_newest_upload_first(storage: SessionStorage) -> None:
    base = datetime(2025, 5, 1, tzinfo=UTC)
    records = [file_record(uploaded_at=base + timedelta(hours=i)) for i in range(5)]
    for record in records:
        await storage.save_file_record(record)

    listed = await storage.list_file_records(limit=3)

    assert listed == list(reversed(records))[:3]


async def test_delete_expired_files_removes_only_expired(storage: SessionStorage) -> None:
    fresh = file_record(expires_in=timedelta(hours=1))
    stale = [file_record(expires_in=timedelta(seconds=-1)) for _ in range(3)]
    for record in [fresh, *stale]:
        await storage.save_file_record(record)
    assert (await storage.count()).expired_files == 3

    assert await storage.delete_expired_files() == 3
    assert await storage.delete_expired_files() == 0

    assert [r.file_id for r in await storage.list_file_records()] == [fresh.file_id]


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("nul", "a\x00b"),
        ("nan", float("nan")),
        ("big", 2**64),
        ("surrogate", "\ud800"),
        ("set", {1}),
        ("bytes", b"x"),
        ("$dollar", 1),
    ],
)
async def test_file_record_metadata_changed_in_place_is_checked_by_every_save(
    storage: SessionStorage, key: str, value: object
) -> None:
    """Found by attack: metadata changed after the record was made skipped its
    validation. SQLite stored NUL and NaN (a migration to PostgreSQL then failed),
    PostgreSQL raised a server error, a set a raw TypeError."""
    record = file_record(file_id="f1", metadata={"ok": 1})
    record.metadata[key] = value

    with pytest.raises(InvalidDataError, match=re.escape(key)):
        await storage.save_file_record(record)
    with pytest.raises(InvalidDataError, match=re.escape(key)):
        await storage.insert_file_records([file_record(file_id="f0"), record])
    with pytest.raises(InvalidDataError, match=re.escape(key)):
        async with storage.unit_of_work() as uow:
            await uow.files.add(record)
            await uow.commit()

    assert await storage.list_file_records() == []
