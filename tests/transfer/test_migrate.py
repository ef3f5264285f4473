"""migrate_storage: exact, idempotent, additive, in batches of one transaction each."""

from __future__ import annotations

import asyncio
import shutil
import time
import tracemalloc
from datetime import timedelta
from pathlib import Path

import pytest

from persistence import (
    ChatMessage,
    ChatSession,
    InvalidDataError,
    PostgreSQLSessionStorage,
    SessionStorage,
    SQLiteSessionStorage,
)
from persistence.clock import utc_now
from persistence.sql.checkout import driver_connection
from persistence.sql.runner import traced
from persistence.transfer import migrate_storage, migration, unfinished, verify_migration
from persistence.transfer.unfinished import (
    CopySource,
    copy_begins,
    copy_finished,
    unfinished_copies,
)
from tests.factories import conversation
from tests.transfer.cancelling import cancelled_in_the_second_batch
from tests.transfer.data import build_sessions, populate, snapshot

Pair = tuple[SessionStorage, SessionStorage]


async def test_migration_copies_every_field_exactly(pair: Pair) -> None:
    source, destination = pair
    await populate(source)

    result = await migrate_storage(source, destination, batch_size=4)

    assert await snapshot(destination) == await snapshot(source)
    assert result["verified"] is True
    assert result["sessions_migrated"] == 10
    assert result["messages_migrated"] == sum(len(s.messages) for s in build_sessions())
    assert result["files_migrated"] == 3
    counts = await destination.count()
    assert counts.sessions_by_status == {"active": 4, "archived": 3, "expired": 3}


async def test_sqlite_to_postgresql_to_sqlite_round_trip_is_exact(
    sqlite_storage: SessionStorage, postgresql_storage: SessionStorage, tmp_path: Path
) -> None:
    await populate(sqlite_storage)
    original = await snapshot(sqlite_storage)

    await migrate_storage(sqlite_storage, postgresql_storage)
    async with SQLiteSessionStorage(tmp_path / "back.db") as back:
        result = await migrate_storage(postgresql_storage, back)
        assert await snapshot(back) == original
    assert result["verified"] is True
    assert await snapshot(postgresql_storage) == original


async def test_migrating_twice_stores_one_copy(pair: Pair) -> None:
    source, destination = pair
    await populate(source)
    await migrate_storage(source, destination)
    once = await snapshot(destination)

    second = await migrate_storage(source, destination, batch_size=3)

    assert await snapshot(destination) == once
    assert second["destination_counts"] == second["destination_counts_before"]
    assert second["verified"] is True
    messages = sum(len(s.messages) for s in build_sessions())
    assert [second[f"{n}_migrated"] for n in ("sessions", "messages", "files")] == [0, 0, 0]
    assert [second[f"{n}_already_present"] for n in ("sessions", "messages", "files")] == [
        10,
        messages,
        3,
    ]


async def test_a_partial_rerun_counts_only_what_it_wrote(pair: Pair) -> None:
    source, destination = pair
    await populate(source)
    await migrate_storage(source, destination)
    grown = await source.load_session("ab")
    assert grown is not None
    grown.add_message("user", "one more in the source")
    await source.save_session(grown)
    await source.save_session(ChatSession.create("m", session_id="brand-new"))

    result = await migrate_storage(source, destination, batch_size=4)

    assert (result["sessions_migrated"], result["messages_migrated"]) == (2, 1)
    assert (result["sessions_already_present"], result["files_already_present"]) == (9, 3)
    assert result["verified"] is True
    assert await snapshot(destination) == await snapshot(source)


async def test_new_sessions_cost_a_few_statements_per_batch_not_per_session(
    sql_pair: Pair,
) -> None:
    source, destination = sql_pair
    for start in range(0, 60, 20):
        batch = [ChatSession.create("m", session_id=f"s{n:02d}") for n in range(start, start + 20)]
        for session in batch:
            session.add_message("user", "hello")
        await source.insert_sessions(batch)
    statements: list[str] = []

    with traced(statements.append):
        await migrate_storage(source, destination, verify=False, batch_size=20)

    session_inserts = [
        sql
        for sql in statements
        if sql.startswith(("INSERT INTO chat_sessions", "COPY chat_sessions"))
    ]
    if destination.backend_name == "postgresql":
        assert len(session_inserts) == 3
    else:
        assert len(session_inserts) == 3 * 2  # 16 + 4 rows per batch
    assert not any("ON CONFLICT" in sql for sql in statements)


async def test_an_interrupted_migration_says_how_far_it_got_and_resumes(pair: Pair) -> None:
    source, destination = pair
    for start in range(0, 30, 10):
        await source.insert_sessions(
            [ChatSession.create("m", session_id=f"s{n:02d}") for n in range(start, start + 10)]
        )
    written = asyncio.Event()

    def progress(done: int, total: int) -> None:
        if done >= 10:
            written.set()

    task = asyncio.create_task(
        migrate_storage(source, destination, progress_callback=progress, batch_size=10)
    )
    await written.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError) as raised:
        await task

    note = " ".join(raised.value.__notes__)
    assert "of 30 sessions were copied" in note and "resumes" in note
    # The destination says so itself (a copy killed outright runs no code of ours).
    [unfinished] = await unfinished_copies(destination)
    assert unfinished.source == repr(source) and unfinished.started_at is not None
    result = await migrate_storage(source, destination, batch_size=10)
    assert result["sessions_migrated"] + result["sessions_already_present"] == 30
    assert result["verified"] is True
    assert await unfinished_copies(destination) == []


async def test_a_migration_cancelled_while_it_writes_a_batch_counts_what_it_wrote(
    pair: Pair,
) -> None:
    """Found by attack: into SQLite, whose cancelled calls still commit, a migration
    stopped while it wrote its second batch said `10 of 30 sessions were copied` where
    20 were. The batch being written ends first, and is counted."""
    source, destination = pair
    await source.insert_sessions(
        [ChatSession.create("m", session_id=f"s{n:02d}") for n in range(30)]
    )
    reported, note = await cancelled_in_the_second_batch(
        lambda progress: migrate_storage(
            source, destination, progress_callback=progress, batch_size=10
        ),
        batch_size=10,
    )

    assert (await destination.count()).total_sessions == 20 == reported
    assert "20 of 30 sessions were copied" in note


async def test_a_cancel_stops_a_batch_that_waits_on_a_lock_after_a_grace(
    sqlite_storage: SessionStorage,
    postgresql_storage: PostgreSQLSessionStorage,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Found by attack: a cancel (SIGTERM, asyncio.wait_for's timeout) of a migration
    whose batch waited on another connection's lock waited as long as the lock was
    held. The batch gets BATCH_GRACE_SECONDS to end; then it is stopped too, and the
    note says that its sessions may be stored."""
    monkeypatch.setattr(migration, "BATCH_GRACE_SECONDS", 0.5)
    await sqlite_storage.insert_sessions(
        [ChatSession.create("m", session_id=f"s{n:02d}") for n in range(30)]
    )
    first_batch = asyncio.Event()
    reported = [0]

    def progress(done: int, total: int) -> None:
        reported.append(done)
        if done >= 10:
            first_batch.set()

    task = asyncio.create_task(
        migrate_storage(
            sqlite_storage, postgresql_storage, progress_callback=progress, batch_size=10
        )
    )
    async with driver_connection(postgresql_storage.engine) as locker:
        await first_batch.wait()
        async with locker.transaction():
            await locker.execute("LOCK TABLE chat_sessions IN ACCESS EXCLUSIVE MODE")
            await asyncio.sleep(0.3)  # the second batch waits on the lock
            started = time.monotonic()
            task.cancel()
            done, _ = await asyncio.wait([task], timeout=10)
            waited = time.monotonic() - started
    assert done and waited < 5, waited
    with pytest.raises(asyncio.CancelledError) as raised:
        await task
    note = " ".join(raised.value.__notes__)
    copied = max(reported)  # 10, or 20 where the second batch took its lock first
    assert f"{copied} of 30 sessions were copied" in note, note
    assert "perhaps the 10 being written when it stopped" in note, note
    assert (await postgresql_storage.count()).total_sessions == copied


async def test_migration_keeps_destination_content_and_appends_missing_messages(
    pair: Pair,
) -> None:
    source, destination = pair
    shared = ChatSession.create("gemini", session_id="shared")
    for turn in range(5):
        shared.add_message("user", f"turn {turn}")
    await source.save_session(shared)
    partial = ChatSession.model_validate(
        {**shared.model_dump(), "messages": shared.model_dump()["messages"][:2]}
    )
    partial.message_count = 2
    await destination.save_session(partial)
    own = ChatSession.create("other-model", session_id="only-in-destination")
    own.add_message("user", "keep me")
    await destination.save_session(own)

    result = await migrate_storage(source, destination)

    stored = await destination.load_session("shared")
    assert stored is not None
    assert [m.content for m in stored.messages] == [f"turn {t}" for t in range(5)]
    assert stored.message_count == 5
    assert await destination.load_session("only-in-destination") == own
    assert result["verified"] is True
    assert result["verification"]["extra_sessions"] == 1
    assert (await destination.count()).messages == 6


async def test_destination_session_updated_later_keeps_its_fields(pair: Pair) -> None:
    source, destination = pair
    session = ChatSession.create("gemini", session_id="s")
    session.add_message("user", "first")
    await source.save_session(session)
    await migrate_storage(source, destination)
    later = await destination.load_session("s")
    assert later is not None
    later.add_message("assistant", "only in the destination")
    later.status = "archived"
    await destination.save_session(later)
    session.add_message("user", "second, only in the source")
    session.updated_at = later.updated_at.replace(year=2000)
    await source.save_session(session)

    await migrate_storage(source, destination)

    stored = await destination.load_session("s")
    assert stored is not None
    assert stored.status == "archived"
    assert stored.updated_at == later.updated_at
    assert [m.content for m in stored.messages] == [
        "first",
        "only in the destination",
        "second, only in the source",
    ]
    assert stored.message_count == 3


async def test_a_second_migration_keeps_the_destinations_own_fields(pair: Pair) -> None:
    """Found by review: an archive or a model change made in the destination (neither
    moves updated_at) was undone by the next migration, which then failed to verify."""
    source, destination = pair
    session = ChatSession.create("gemini-a", session_id="s", metadata={"shared": "source"})
    session.add_message("user", "first")
    await source.save_session(session)
    await migrate_storage(source, destination)
    copy = await destination.load_session("s")
    assert copy is not None
    copy.status, copy.model = "archived", "gemini-b"
    copy.metadata = {"shared": "destination"}
    await destination.save_session(copy)
    session.add_message("assistant", "second, only in the source")
    session.metadata = {**session.metadata, "added": "in the source"}
    await source.save_session(session)

    result = await migrate_storage(source, destination)

    stored = await destination.load_session("s")
    assert stored is not None
    assert (stored.status, stored.model) == ("archived", "gemini-b")
    assert stored.created_at == copy.created_at
    assert stored.metadata == {"shared": "destination", "added": "in the source"}
    assert [m.content for m in stored.messages] == ["first", "second, only in the source"]
    assert result["verified"] is True
    assert result["verification"]["sessions_with_own_fields"] == 1
    again = await migrate_storage(source, destination)
    assert await destination.load_session("s") == stored
    assert (again["sessions_migrated"], again["verified"]) == (0, True)


async def test_progress_reports_every_session_once_its_batch_is_written(pair: Pair) -> None:
    source, destination = pair
    for index in range(23):
        await source.save_session(ChatSession.create("m", session_id=f"s{index:02d}"))
    calls: list[tuple[int, int]] = []

    await migrate_storage(
        source,
        destination,
        verify=False,
        batch_size=5,
        progress_callback=lambda done, total: calls.append((done, total)),
    )

    assert calls == [(done, 23) for done in range(24)]


async def test_a_refused_batch_leaves_the_earlier_batches_whole(pair: Pair) -> None:
    source, destination = pair
    for index in range(15):
        session = ChatSession.create("m", session_id=f"s{index:02d}")
        session.messages.append(
            ChatMessage(
                message_id=f"m{index:02d}", session_id=session.session_id, role="user", content="hi"
            )
        )
        session.message_count = 1
        await source.save_session(session)
    # The destination already holds message m12 in another session: batch 3 is refused.
    clash = ChatSession.create("m", session_id="zz-clash")
    clash.messages.append(
        ChatMessage(message_id="m12", session_id="zz-clash", role="user", content="taken")
    )
    clash.message_count = 1
    await destination.save_session(clash)

    with pytest.raises(InvalidDataError, match="m12") as raised:
        await migrate_storage(source, destination, batch_size=5)

    stored = await destination.load_sessions([f"s{index:02d}" for index in range(15)])
    assert sorted(s.session_id for s in stored) == [f"s{index:02d}" for index in range(10)]
    assert any("10 of 15 sessions" in note for note in raised.value.__notes__)


async def test_migration_reads_each_session_in_one_state_while_it_is_written(
    pair: Pair,
) -> None:
    source, destination = pair
    sessions = [ChatSession.create("m", session_id=f"busy-{n}") for n in range(20)]
    for session in sessions:
        await source.save_session(session)
    stop = asyncio.Event()

    async def writer(group: list[ChatSession]) -> None:
        turn = 0
        while not stop.is_set():
            for session in group:
                session.add_message("user", str(turn))
                await source.save_session(session)
            turn += 1

    tasks = [asyncio.create_task(writer(sessions[i::4])) for i in range(4)]
    try:
        await asyncio.sleep(0.05)
        for _ in range(5):
            await migrate_storage(source, destination, verify=False, batch_size=3)
    finally:
        stop.set()
        await asyncio.gather(*tasks)

    async for batch in destination.iter_sessions(50):
        for stored in batch:
            assert stored.message_count == len(stored.messages)
            assert [m.content for m in stored.messages] == [
                str(t) for t in range(len(stored.messages))
            ]
            if stored.messages:
                assert stored.updated_at == stored.messages[-1].created_at


@pytest.mark.parametrize("batch_size", [0, -1, 2.5, True])
async def test_migration_refuses_a_bad_batch_size(
    sqlite_storage: SessionStorage, other_sqlite: SessionStorage, batch_size: object
) -> None:
    with pytest.raises(InvalidDataError, match="batch_size"):
        await migrate_storage(sqlite_storage, other_sqlite, batch_size=batch_size)  # type: ignore[arg-type]


async def test_migration_refuses_the_same_storage_on_both_sides(
    sqlite_storage: SessionStorage,
) -> None:
    with pytest.raises(InvalidDataError, match="same storage"):
        await migrate_storage(sqlite_storage, sqlite_storage)
    with pytest.raises(InvalidDataError, match="same storage"):
        await verify_migration(sqlite_storage, sqlite_storage)


async def test_migration_refuses_one_store_reached_by_two_names(
    sql_storage: SessionStorage, tmp_path: Path
) -> None:
    # Only `source is destination` was refused: the same store through another name
    # was migrated into itself. (A hard link of the file is refused by the CLI before
    # it opens anything: SQLite cannot open one file through two names at once.)
    await sql_storage.save_session(conversation(2))
    if isinstance(sql_storage, SQLiteSessionStorage):
        linked = tmp_path / "linked.db"
        linked.symlink_to(sql_storage.database_path)
        other: SessionStorage = SQLiteSessionStorage(linked)
    else:
        assert isinstance(sql_storage, PostgreSQLSessionStorage)
        # Another URL form of the same database: another host name, another scheme.
        url = sql_storage.url.set(drivername="postgresql", host="localhost")
        other = PostgreSQLSessionStorage(url.render_as_string(hide_password=False), 1, 2)
    async with other:
        with pytest.raises(InvalidDataError, match="same store"):
            await migrate_storage(sql_storage, other)
        # Found by attack: verify_migration "verified" such a store against itself.
        for first, second in ((sql_storage, other), (other, sql_storage)):
            with pytest.raises(InvalidDataError, match="same store"):
                await verify_migration(first, second)
    assert (await sql_storage.count()).total_sessions == 1


async def _migration_peak(directory: Path, sessions: int) -> int:
    async with (
        SQLiteSessionStorage(directory / f"source-{sessions}.db") as source,
        SQLiteSessionStorage(directory / f"destination-{sessions}.db") as destination,
    ):
        async with source.unit_of_work() as uow:
            for index in range(sessions):
                session = ChatSession.create("m", session_id=f"s{index:05d}")
                for _ in range(5):
                    session.add_message("user", "x" * 2000)
                await uow.sessions.add(session)
            await uow.commit()
        tracemalloc.start()
        try:
            await migrate_storage(source, destination, batch_size=20)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()


async def test_migration_memory_does_not_grow_with_the_store(tmp_path: Path) -> None:
    await _migration_peak(tmp_path, 20)  # warms caches that any first run fills

    small = await _migration_peak(tmp_path, 100)
    large = await _migration_peak(tmp_path, 800)

    # 800 sessions carry about 8 MB of content; one batch of 20 about 200 kB.
    assert large < small * 1.5
    assert large < 4_000_000


async def test_a_finished_copy_removes_its_note_and_older_ones_from_its_source_only(
    sql_pair: Pair, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each copy has a note of its own (found by attack: one note per source, so a copy
    that finished removed the note of one still running beside it). A copy that
    finishes removes its own, and those of copies from its source begun before it
    (killed or stopped: it wrote what they would have), by their runs' numbers, not
    the clock (found by attack: a clock stepped back left the killed copy's note);
    never one begun after it, or one from another store: a copy of a SQLite file that
    has diverged, or a file at the inode of a deleted source (found by attack)."""
    source, destination = sql_pair
    other = SQLiteSessionStorage(tmp_path / "other.db")
    await other.initialize()
    try:
        by_source = await CopySource.of(source)
        by_other = await CopySource.of(other)
        assert by_source.prefix != by_other.prefix

        first = await copy_begins(by_source, destination)
        second = await copy_begins(by_source, destination)
        from_other = await copy_begins(by_other, destination)
        assert (first.run, second.run, from_other.run) == (1, 2, 1)

        await copy_finished(by_source, first, destination)  # the second stays
        assert len(await unfinished_copies(destination)) == 2
        stepped_back = utc_now() - timedelta(hours=1)
        monkeypatch.setattr(unfinished, "utc_now", lambda: stepped_back)
        again = await copy_begins(by_source, destination)
        await copy_finished(by_source, again, destination)
        assert [c.source for c in await unfinished_copies(destination)] == [repr(other)]
        await copy_finished(by_other, from_other, destination)
        assert await unfinished_copies(destination) == []
    finally:
        await other.close()


@pytest.mark.sqlite
async def test_a_copy_of_a_sqlite_store_is_another_source_to_the_notes(tmp_path: Path) -> None:
    """Found by attack: keyed by the store's id alone, a finished copy from a diverged
    `cp` of a store cleared the note of a stopped copy from the store itself."""
    async with SQLiteSessionStorage(tmp_path / "store.db") as store:
        await store.save_session(ChatSession.create("m"))
        key = await store.source_key()
    shutil.copyfile(tmp_path / "store.db", tmp_path / "copy.db")
    async with SQLiteSessionStorage(tmp_path / "copy.db") as copy:
        assert await copy.source_key() != key
