"""Store-wide helpers (batches, counts, bulk status) and the storage's life cycle."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from persistence import InvalidDataError, PersistenceError, SessionStorage
from tests.factories import conversation, file_record


async def test_iter_sessions_yields_every_session_in_batches(storage: SessionStorage) -> None:
    sessions = [conversation(i % 4) for i in range(11)]
    for session in sessions:
        await storage.save_session(session)

    batches = [batch async for batch in storage.iter_sessions(batch_size=4)]

    assert [len(batch) for batch in batches] == [4, 4, 3]
    seen = [s for batch in batches for s in batch]
    assert [s.session_id for s in seen] == sorted(s.session_id for s in sessions)
    by_id = {s.session_id: s for s in sessions}
    assert all(s == by_id[s.session_id] for s in seen)


async def test_iter_sessions_without_messages_keeps_counts(storage: SessionStorage) -> None:
    await storage.save_session(conversation(3))

    batches = [batch async for batch in storage.iter_sessions(with_messages=False)]

    assert [(s.message_count, s.messages) for s in batches[0]] == [(3, [])]


async def test_iter_file_records_and_load_sessions(storage: SessionStorage) -> None:
    records = [file_record() for _ in range(5)]
    for record in records:
        await storage.save_file_record(record)
    sessions = [conversation(2) for _ in range(3)]
    for session in sessions:
        await storage.save_session(session)

    batches = [batch async for batch in storage.iter_file_records(batch_size=2)]
    loaded = await storage.load_sessions(
        [sessions[2].session_id, "missing", sessions[0].session_id]
    )

    assert [r for batch in batches for r in batch] == sorted(records, key=lambda r: r.file_id)
    assert loaded == [sessions[2], sessions[0]]


async def test_load_sessions_takes_any_number_of_ids_in_their_order(
    storage: SessionStorage,
) -> None:
    sessions = [conversation(turns) for turns in (1, 2, 3)]
    for session in sessions:
        await storage.save_session(session)
    ids = [f"missing-{index}" for index in range(1200)]
    ids[1199], ids[0], ids[600] = (session.session_id for session in sessions)

    loaded = await storage.load_sessions(ids)

    assert loaded == [sessions[1], sessions[2], sessions[0]]


async def test_load_sessions_matches_each_id_exactly(storage: SessionStorage) -> None:
    stored = conversation(2, session_id="s" * 255)
    await storage.save_session(stored)

    loaded = await storage.load_sessions(
        [stored.session_id, stored.session_id + "-longer", "s" * 254, "S" * 255]
    )

    assert loaded == [stored]
    assert [m.message_id for m in loaded[0].messages] == [m.message_id for m in stored.messages]


async def test_count_happens_in_the_database(storage: SessionStorage) -> None:
    for status, turns in [("active", 2), ("active", 1), ("archived", 3), ("expired", 0)]:
        session = conversation(turns)
        session.status = status  # type: ignore[assignment]
        await storage.save_session(session)
    await storage.save_file_record(file_record())
    await storage.save_file_record(file_record(expires_in=timedelta(seconds=-5)))

    counts = await storage.count()

    assert counts.sessions_by_status == {"active": 2, "archived": 1, "expired": 1}
    assert (counts.total_sessions, counts.messages, counts.files, counts.expired_files) == (
        4,
        6,
        2,
        1,
    )


async def test_expire_sessions_marks_only_stale_active_ones(storage: SessionStorage) -> None:
    now = datetime.now(UTC)
    stale, fresh, archived = conversation(1), conversation(1), conversation(1)
    stale.updated_at = now - timedelta(days=5)
    archived.updated_at = now - timedelta(days=5)
    archived.status = "archived"
    for session in (stale, fresh, archived):
        await storage.save_session(session)

    assert await storage.expire_sessions(now - timedelta(days=3)) == 1
    assert await storage.expire_sessions(now - timedelta(days=3)) == 0

    statuses = {s.session_id: s.status for s in await storage.list_sessions()}
    assert statuses == {
        stale.session_id: "expired",
        fresh.session_id: "active",
        archived.session_id: "archived",
    }


async def test_expire_sessions_takes_a_cutoff_after_a_dst_change_as_its_instant(
    storage: SessionStorage,
) -> None:
    """Found by review: SQLite reused 01:30 (fold=0)'s text for 01:30 (fold=1), an hour
    later, as the two compare equal."""
    new_york = ZoneInfo("America/New_York")
    updated = datetime(2024, 11, 3, 6, 0, tzinfo=UTC)
    session = conversation(1)
    session.updated_at = updated
    await storage.save_session(session)

    first = datetime(2024, 11, 3, 1, 30, tzinfo=new_york, fold=0)  # 05:30Z
    assert await storage.expire_sessions(first) == 0
    assert await storage.expire_sessions(first.replace(fold=1)) == 1  # 06:30Z


async def test_expire_sessions_reads_a_cutoff_to_the_millisecond(storage: SessionStorage) -> None:
    """Found by attack: a cutoff with microseconds (`expiry_hours=1/7`) expired on SQL a
    session updated in the cutoff's own millisecond; MongoDB, whose BSON keeps
    milliseconds, would have left it active. Every stored time is to the millisecond,
    and so is the cutoff now, on every backend."""
    session = conversation(1)
    session.updated_at = datetime(2024, 1, 1, 12, 0, 0, 285_000, tzinfo=UTC)
    await storage.save_session(session)

    assert await storage.expire_sessions(session.updated_at.replace(microsecond=285_714)) == 0
    assert await storage.expire_sessions(session.updated_at.replace(microsecond=286_000)) == 1


@pytest.mark.parametrize(
    "cutoff", [datetime(2030, 1, 1), 1_700_000_000, "2030-01-01T00:00:00Z"], ids=repr
)
async def test_expire_sessions_refuses_a_cutoff_that_is_no_aware_datetime(
    storage: SessionStorage, cutoff: object
) -> None:
    """Found by review: a naive cutoff was read as local time by SQLite, UTC by PostgreSQL."""
    session = conversation(1)
    await storage.save_session(session)

    with pytest.raises(InvalidDataError, match="updated_before"):
        await storage.expire_sessions(cutoff)  # type: ignore[arg-type]

    assert (await storage.count_sessions())["active"] == 1


async def test_forget_deletions_removes_the_records_of_deletes_before_the_cutoff(
    storage: SessionStorage,
) -> None:
    kept, deleted = conversation(1), [conversation(1) for _ in range(2)]
    for session in (kept, *deleted):
        await storage.save_session(session)
    before = datetime.now(UTC) - timedelta(seconds=1)
    for session in deleted:
        assert await storage.delete_session(session.session_id) is True

    assert await storage.forget_deletions(before) == 0
    assert await storage.forget_deletions(datetime.now(UTC) + timedelta(minutes=1)) == 2
    assert await storage.forget_deletions(datetime.now(UTC) + timedelta(minutes=1)) == 0
    assert [s.session_id for s in await storage.list_sessions()] == [kept.session_id]


@pytest.mark.parametrize("cutoff", [datetime(2030, 1, 1), "2030-01-01T00:00:00Z"], ids=repr)
async def test_forget_deletions_refuses_a_cutoff_that_is_no_aware_datetime(
    storage: SessionStorage, cutoff: object
) -> None:
    session = conversation(1)
    await storage.save_session(session)
    await storage.delete_session(session.session_id)

    with pytest.raises(InvalidDataError, match="deleted_before"):
        await storage.forget_deletions(cutoff)  # type: ignore[arg-type]
    assert await storage.forget_deletions(datetime.now(UTC) + timedelta(minutes=1)) == 1


async def test_set_status_changes_many_sessions_at_once(storage: SessionStorage) -> None:
    sessions = [conversation(1) for _ in range(3)]
    for session in sessions:
        await storage.save_session(session)
    ids = [s.session_id for s in sessions[:2]]

    assert await storage.set_status([*ids, "missing"], "archived") == 2
    assert await storage.set_status(ids, "archived") == 0

    archived = await storage.list_sessions(status="archived")
    assert sorted(s.session_id for s in archived) == sorted(ids)


async def test_set_status_refuses_one_id_given_as_a_string(storage: SessionStorage) -> None:
    session = conversation(1)
    await storage.save_session(session)
    # A str is a sequence of its characters: never taken as ids one letter long.
    with pytest.raises(InvalidDataError, match="sequence of ids, got one string"):
        await storage.set_status(session.session_id, "archived")
    loaded = await storage.load_session(session.session_id)
    assert loaded is not None and loaded.status == "active"


async def test_close_twice_is_harmless_and_a_closed_storage_refuses_use(
    storage: SessionStorage,
) -> None:
    await storage.close()
    await storage.close()

    with pytest.raises(PersistenceError, match="closed"):
        await storage.load_session("x")
    with pytest.raises(PersistenceError, match="closed"):
        await storage.initialize()


async def test_calls_made_while_close_runs_are_told_it_is_closed(storage: SessionStorage) -> None:
    """Found by attack: on SQLite they were told the storage was never initialized."""
    session = conversation(1)
    await storage.save_session(session)
    closing = asyncio.create_task(storage.close())
    await asyncio.sleep(0)  # close() has begun
    calls = (
        lambda: storage.load_session(session.session_id),
        lambda: storage.save_session(conversation(1)),
        lambda: storage.search_messages("message"),
    )
    for call in calls:
        try:
            await call()
        except PersistenceError as exc:
            assert "not initialized" not in str(exc)
    await closing


@pytest.mark.parametrize("unstorable", ["nul\x00inside", "lone \ud800 surrogate"])
async def test_ids_no_backend_can_store_name_nothing(
    storage: SessionStorage, unstorable: str
) -> None:
    """Text with a NUL or a lone surrogate is refused on every write, so as an id it names
    nothing: each lookup answers so, as for any id not stored, and a unit of work goes on
    after one (on PostgreSQL a refused statement would end its transaction)."""
    stored = conversation(1)
    await storage.save_session(stored)
    record = file_record()
    await storage.save_file_record(record)

    assert await storage.load_session(unstorable) is None
    assert await storage.load_session(unstorable, last=1) is None
    assert await storage.load_sessions([unstorable, stored.session_id]) == [stored]
    assert await storage.delete_session(unstorable) is False
    assert await storage.set_status([unstorable], "archived") == 0
    assert await storage.load_file_record(unstorable) is None
    assert await storage.load_file_records([unstorable, record.file_id]) == [record]
    later = conversation(1)
    async with storage.unit_of_work() as uow:
        assert await uow.sessions.get(unstorable) is None
        assert await uow.sessions.delete(unstorable) is False
        assert await uow.files.get(unstorable) is None
        assert await uow.files.delete(unstorable) is False
        await uow.sessions.add(later)
        await uow.commit()
    assert await storage.load_session(later.session_id) == later


async def test_lookups_by_many_refuse_one_id_given_as_a_string(storage: SessionStorage) -> None:
    session = conversation(1, session_id="abc")
    await storage.save_session(session)

    for lookup in (storage.load_sessions, storage.load_file_records):
        with pytest.raises(InvalidDataError, match="expected a sequence of ids"):
            await lookup("abc")  # type: ignore[arg-type]
