"""Arguments of the wrong kind are refused alike everywhere, naming the argument.

Counts given to reads: anything but an int in 0..2**63-1. Ids given to look something
up: anything but a string. Objects given to saves: anything but the model itself.
"""

from __future__ import annotations

from typing import Any

import pytest

from persistence import InvalidDataError, SessionStorage
from tests.factories import conversation

# Each was once answered differently by SQLite and PostgreSQL: a raw OverflowError or
# TypeError, a "datatype mismatch", or a float silently cut to an int.
NOT_COUNTS: list[Any] = [-1, 2**63, 10**20, 2.5, 2.0, "3", True, False, None]


@pytest.mark.parametrize("last", [value for value in NOT_COUNTS if value is not None])
async def test_load_session_refuses_a_last_that_is_not_a_count(
    storage: SessionStorage, last: Any
) -> None:
    session = conversation(3)
    await storage.save_session(session)

    with pytest.raises(InvalidDataError, match="last"):
        await storage.load_session(session.session_id, last=last)


@pytest.mark.parametrize("value", NOT_COUNTS)
async def test_pages_refuse_a_limit_or_offset_that_is_not_a_count(
    storage: SessionStorage, value: Any
) -> None:
    with pytest.raises(InvalidDataError, match="limit"):
        await storage.list_sessions(limit=value)
    with pytest.raises(InvalidDataError, match="offset"):
        await storage.list_sessions(offset=value)
    with pytest.raises(InvalidDataError, match="limit"):
        await storage.list_file_records(limit=value)
    with pytest.raises(InvalidDataError, match="limit"):
        await storage.search_messages("word", limit=value)


@pytest.mark.parametrize("value", [0, *NOT_COUNTS])
async def test_batch_sizes_that_are_not_counts_above_0_are_refused_and_nothing_breaks(
    storage: SessionStorage, value: Any
) -> None:
    """Found by attack: 2**70 reached the drivers (SQLite's OverflowError; on PostgreSQL
    a pooled connection left broken for every later snapshot read), "2" a TypeError."""
    session = conversation(2)
    await storage.save_session(session)

    with pytest.raises(InvalidDataError, match="batch_size"):
        [batch async for batch in storage.iter_sessions(value)]
    with pytest.raises(InvalidDataError, match="batch_size"):
        [batch async for batch in storage.iter_file_records(value)]
    with pytest.raises(InvalidDataError, match="status"):
        await storage.set_status([session.session_id], None)  # type: ignore[arg-type]

    batches = [batch async for batch in storage.iter_sessions(1)]
    assert [[s.session_id for s in batch] for batch in batches] == [[session.session_id]]
    assert (await storage.count()).total_sessions == 1


async def test_the_largest_counts_are_taken(storage: SessionStorage) -> None:
    session = conversation(3)
    await storage.save_session(session)

    loaded = await storage.load_session(session.session_id, last=2**63 - 1)
    assert loaded is not None and len(loaded.messages) == 3
    assert len(await storage.list_sessions(limit=2**63 - 1)) == 1
    assert await storage.list_sessions(limit=1, offset=2**63 - 1) == []
    assert await storage.list_file_records(limit=2**63 - 1) == []


# Found by audit: None or a number as an id raised a bare TypeError from deep inside, and
# a dict given to a save a bare AttributeError; neither named the argument.
NOT_IDS: list[Any] = [None, 5, b"s1", ["s1"]]


@pytest.mark.parametrize("value", NOT_IDS)
async def test_lookups_refuse_an_id_that_is_not_a_string(
    storage: SessionStorage, value: Any
) -> None:
    with pytest.raises(InvalidDataError, match="session_id: must be a string"):
        await storage.load_session(value)
    with pytest.raises(InvalidDataError, match="session_id: must be a string"):
        await storage.delete_session(value)
    with pytest.raises(InvalidDataError, match="file_id: must be a string"):
        await storage.load_file_record(value)
    with pytest.raises(InvalidDataError, match="session_ids: must be a string"):
        await storage.load_sessions(["s1", value])
    with pytest.raises(InvalidDataError, match="file_ids: must be a string"):
        await storage.load_file_records([value])
    async with storage.unit_of_work() as uow:
        with pytest.raises(InvalidDataError, match="session_id: must be a string"):
            await uow.sessions.get(value)
        with pytest.raises(InvalidDataError, match="file_id: must be a string"):
            await uow.files.get(value)


async def test_saves_refuse_what_is_not_the_model(storage: SessionStorage) -> None:
    session = conversation(1)
    as_dict = session.model_dump()
    record = {"file_id": "f1"}

    with pytest.raises(InvalidDataError, match="session: expected ChatSession, got dict"):
        await storage.save_session(as_dict)  # type: ignore[arg-type]
    with pytest.raises(InvalidDataError, match="file_record: expected UploadedFileRecord"):
        await storage.save_file_record(record)  # type: ignore[arg-type]
    async with storage.unit_of_work() as uow:
        with pytest.raises(InvalidDataError, match="session: expected ChatSession, got dict"):
            await uow.sessions.add(as_dict)  # type: ignore[arg-type]
        with pytest.raises(InvalidDataError, match="record: expected UploadedFileRecord, got dict"):
            await uow.files.add(record)  # type: ignore[arg-type]

    assert await storage.list_sessions() == []
    assert await storage.list_file_records() == []


async def test_bulk_inserts_and_lookups_refuse_what_is_not_a_list_of_their_kind(
    storage: SessionStorage,
) -> None:
    """Found by review: a dict among the sessions raised a bare AttributeError, None as
    the list of ids a bare TypeError."""
    session = conversation(1)
    with pytest.raises(InvalidDataError, match=r"sessions\[1\]: expected ChatSession"):
        await storage.insert_sessions([session, session.model_dump()])  # type: ignore[list-item]
    with pytest.raises(InvalidDataError, match=r"records\[0\]: expected UploadedFileRecord"):
        await storage.insert_file_records([{"file_id": "f"}])  # type: ignore[list-item]
    with pytest.raises(InvalidDataError, match="sessions: expected a list of ChatSession"):
        await storage.insert_sessions(None)  # type: ignore[arg-type]
    with pytest.raises(InvalidDataError, match="session_ids: expected a sequence of ids"):
        await storage.load_sessions(None)  # type: ignore[arg-type]
    with pytest.raises(InvalidDataError, match="file_ids: expected a sequence of ids"):
        await storage.load_file_records(5)  # type: ignore[arg-type]
    assert await storage.list_sessions() == []
