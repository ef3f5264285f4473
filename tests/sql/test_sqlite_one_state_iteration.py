"""SQLite's iter_sessions and iter_file_records read every batch in one WAL snapshot.

The cases both SQL backends share are in test_one_state_iteration.py; these are
SQLite's own (persistence/sql/sqlite_one_state.py): the iteration's read transaction,
on a connection of its own, holds back checkpoints while it lasts and no longer; other
storages and processes write meanwhile; a file replaced under it, a closed storage and
a file not in WAL mode.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import sqlite3
import subprocess
import sys
import threading
import time
from contextlib import aclosing, closing
from pathlib import Path

import pytest

from persistence import ChatSession, PersistenceError, SQLiteSessionStorage
from persistence.sql import sqlite_one_state
from persistence.sql.engines import WAL_SIZE_LIMIT
from persistence.sql.runner import run_in_thread
from persistence.sql.sqlite_one_state import WATCH_SECONDS
from tests.sql.moved_sessions import ids, moved, stored

pytestmark = pytest.mark.sqlite


def _reader_holds_the_wal(path: Path) -> bool:
    """Whether a reader keeps a checkpoint from starting the -wal over (TRUNCATE
    reports busy), asked without waiting."""
    with closing(sqlite3.connect(path, timeout=0)) as connection:
        busy, _, _ = connection.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    return bool(busy)


def _wal_size(path: Path) -> int:
    return Path(f"{path}-wal").stat().st_size


async def test_an_iteration_holds_back_checkpoints_only_while_it_lasts(
    sqlite_storage: SQLiteSessionStorage, sqlite_path: Path
) -> None:
    storage = sqlite_storage
    await stored(storage, "s1", "s2", "s3")
    assert not _reader_holds_the_wal(sqlite_path)
    async with aclosing(storage.iter_sessions(1)) as batches:
        async for batch in batches:
            assert [s.session_id for s in batch] == ["s1"]
            await stored(storage, "s4")  # a commit after the iteration's state
            assert _reader_holds_the_wal(sqlite_path)
            break
    assert not _reader_holds_the_wal(sqlite_path)
    # Without aclosing, once the loop lets go of it (the event loop closes it).
    async for _batch in storage.iter_sessions(1):
        await stored(storage, "s5")
        break
    gc.collect()
    deadline = time.monotonic() + 5
    while _reader_holds_the_wal(sqlite_path):
        assert time.monotonic() < deadline, "the iteration's read never ended"
        await asyncio.sleep(0.01)
    # To the end, it ends its read as well.
    assert await ids(storage.iter_sessions(2)) == ["s1", "s2", "s3", "s4", "s5"]
    await stored(storage, "s6")
    assert not _reader_holds_the_wal(sqlite_path)


async def test_another_storage_moving_a_session_between_batches_is_not_seen(
    sqlite_storage: SQLiteSessionStorage, sqlite_path: Path
) -> None:
    """As another process of the service would: through its own connections."""
    await stored(sqlite_storage, "a-first", "m-middle")
    other = SQLiteSessionStorage(sqlite_path)
    await other.initialize()
    try:
        batches = sqlite_storage.iter_sessions(1)
        assert [s.session_id for s in await anext(batches)] == ["a-first"]
        await moved(other, "a-first", "z-last")
        await stored(other, "b-second")
        assert await ids(batches) == ["m-middle"]
        assert await ids(sqlite_storage.iter_sessions(1)) == [
            "b-second",
            "m-middle",
            "z-last",
        ]
    finally:
        await other.close()


async def test_iterations_at_once_with_saves_between_their_batches(
    sqlite_storage: SQLiteSessionStorage,
) -> None:
    """Two iterations, each saving between its batches, wait for nothing."""
    storage = sqlite_storage
    await stored(storage, "s1", "s2", "s3")
    # Both have read their first batch (so begun their state) before either saves: found
    # in a full run, the second's connect could end after the first's first save.
    both_begun = asyncio.Barrier(2)

    async def each_saved() -> list[int]:
        counts = []
        async for batch in storage.iter_sessions(1):
            session = batch[0]
            counts.append(session.message_count)
            if len(counts) == 1:
                await both_begun.wait()
            session.add_message("assistant", "a reply")
            await storage.save_session(session)
            await asyncio.sleep(0)
        return counts

    done = await asyncio.wait_for(asyncio.gather(each_saved(), each_saved()), 20)
    # Each read the state it began in: the other's replies are not in it.
    assert done == [[1, 1, 1], [1, 1, 1]]
    counts = [s.message_count async for batch in storage.iter_sessions() for s in batch]
    assert counts == [3, 3, 3]


async def test_close_ends_an_iteration_under_way(sqlite_path: Path) -> None:
    storage = SQLiteSessionStorage(sqlite_path)
    await storage.initialize()
    await stored(storage, "s1", "s2")
    batches = storage.iter_sessions(1)
    assert [s.session_id for s in await anext(batches)] == ["s1"]
    await storage.close()
    with pytest.raises(PersistenceError, match="closed"):
        await anext(batches)
    await batches.aclose()
    assert not _reader_holds_the_wal(sqlite_path)


async def test_a_file_replaced_between_batches_says_so(
    sqlite_storage: SQLiteSessionStorage, sqlite_path: Path, tmp_path: Path
) -> None:
    """The iteration's connection reads the file it opened: once the path names another
    store, the next batch says so, as every call of the storage does."""
    await stored(sqlite_storage, "s1", "s2")
    replacement = SQLiteSessionStorage(tmp_path / "other.db")
    await replacement.initialize()
    await stored(replacement, "x1", "x2")
    await replacement.close()
    batches = sqlite_storage.iter_sessions(1)
    assert [s.session_id for s in await anext(batches)] == ["s1"]
    (tmp_path / "other.db").replace(sqlite_path)
    with pytest.raises(PersistenceError, match="replaced or removed"):
        await anext(batches)
    await batches.aclose()


async def test_a_file_not_in_wal_mode_is_read_a_batch_at_a_time(
    sqlite_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A reader of a file in rollback-journal mode makes its writers wait: such a file
    (a copy opened for reading) has its batches read apart, and a warning says so."""
    storage = SQLiteSessionStorage(sqlite_path)
    await storage.initialize()
    await stored(storage, "s1", "s2", "s3")
    await storage.close()
    with closing(sqlite3.connect(sqlite_path)) as connection:
        assert connection.execute("PRAGMA journal_mode=DELETE").fetchone() == ("delete",)
    reader = SQLiteSessionStorage(sqlite_path)
    await reader.open_for_reading()
    try:
        caplog.set_level(logging.WARNING, logger="persistence.sql")
        batches = reader.iter_sessions(1)
        assert [s.session_id for s in await anext(batches)] == ["s1"]
        # Between two batches a writer waits for nothing.
        with closing(sqlite3.connect(sqlite_path, timeout=0)) as writer:
            writer.execute("UPDATE chat_sessions SET model = 'n' WHERE session_id = 's3'")
            writer.commit()
        assert [s.model async for batch in batches for s in batch] == ["m", "n"]
        assert any("not wal" in r.getMessage() for r in caplog.records)
    finally:
        await reader.close()


async def test_an_iteration_of_a_removed_file_names_it_and_creates_nothing(
    sqlite_storage: SQLiteSessionStorage, sqlite_path: Path
) -> None:
    """Found by attack: the iteration's own connection opened the path as the storage
    first had, which creates a file: an empty database appeared where the store had
    been, and the iteration warned that its journal was not WAL."""
    await stored(sqlite_storage, "s1")
    for name in (sqlite_path, Path(f"{sqlite_path}-wal"), Path(f"{sqlite_path}-shm")):
        name.unlink(missing_ok=True)
    with pytest.raises(PersistenceError, match="replaced or removed"):
        await ids(sqlite_storage.iter_sessions(1))
    assert sqlite_path.name not in os.listdir(sqlite_path.parent)


async def test_the_wal_an_iteration_let_grow_is_cut_back_once_it_ends(
    sqlite_storage: SQLiteSessionStorage, sqlite_path: Path
) -> None:
    """While an iteration lasts, every commit grows the -wal; SQLite kept it at that size
    for as long as a connection was open. The first checkpoint after the iteration cuts
    it back to WAL_SIZE_LIMIT."""
    session = ChatSession.create("m")
    await sqlite_storage.save_session(session)
    async with aclosing(sqlite_storage.iter_sessions(1)) as batches:
        await anext(batches)
        for _ in range(60):
            session.add_message("user", "x" * 500_000)
            await sqlite_storage.save_session(session)
        grown = _wal_size(sqlite_path)
    assert grown > 2 * WAL_SIZE_LIMIT
    for _ in range(20):  # past wal_autocheckpoint's 1,000 pages: a checkpoint runs
        session.add_message("user", "x" * 500_000)
        await sqlite_storage.save_session(session)
    assert _wal_size(sqlite_path) <= WAL_SIZE_LIMIT
    loaded = await sqlite_storage.load_session(session.session_id)
    assert loaded is not None and loaded.message_count == 80


@pytest.mark.parametrize("loop", ["running", "blocked"])
async def test_short_space_ends_a_paused_iteration_s_read(
    sqlite_storage: SQLiteSessionStorage,
    sqlite_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    loop: str,
) -> None:
    """Found by attack: on a nearly full filesystem, the -wal that a paused iteration let
    grow took the last free space; the checkpoint could then not grow the database, and
    every save failed, after the iteration and after a reopen too. Where the filesystem
    runs short, the iteration's own thread ends its read, while the iteration is paused
    and its loop blocked too (a command's output waiting on a full pipe); the batches
    after it are read apart, and a warning says so."""
    await stored(sqlite_storage, "s1", "s2", "s3")
    caplog.set_level(logging.WARNING, logger="persistence.sql")
    async with aclosing(sqlite_storage.iter_sessions(1)) as batches:
        assert [s.session_id for s in await anext(batches)] == ["s1"]
        await stored(sqlite_storage, "s4")
        assert _reader_holds_the_wal(sqlite_path)
        monkeypatch.setattr(sqlite_one_state, "_space", lambda directory: (2**20, 2**40))
        if loop == "blocked":
            time.sleep(10 * WATCH_SECONDS)  # noqa: ASYNC251  # the loop blocked, on purpose
        else:
            await asyncio.sleep(10 * WATCH_SECONDS)
        assert not _reader_holds_the_wal(sqlite_path)
        assert [s.session_id for s in await anext(batches)] == ["s2"]
        # Read apart from here on: the batch before left no reader behind.
        assert not _reader_holds_the_wal(sqlite_path)
        await stored(sqlite_storage, "s5")
        rest = [s.session_id async for batch in batches for s in batch]
    assert rest == ["s3", "s4", "s5"]
    warnings = [r.getMessage() for r in caplog.records if "let go" in r.getMessage()]
    assert len(warnings) == 1 and "1 MiB free" in warnings[0]


@pytest.mark.parametrize(("page_size", "limit"), [(4096, WAL_SIZE_LIMIT), (65536, 131_120_000)])
async def test_the_wal_size_limit_is_never_below_a_checkpoint_s_cycle(
    sqlite_path: Path, page_size: int, limit: int
) -> None:
    """Found by attack: with 64 KiB pages a checkpoint's cycle grows the -wal to 65 MB,
    which a limit of 16 MiB cut at every cycle, to be grown again (appends 22% slower).
    Every connection of the storage, its own and its units of work's, sets twice that."""
    storage = SQLiteSessionStorage(sqlite_path)
    await storage.initialize()
    await storage.close()
    with closing(sqlite3.connect(sqlite_path, isolation_level=None)) as connection:
        connection.execute("PRAGMA journal_mode=DELETE")
        connection.execute(f"PRAGMA page_size={page_size}")
        connection.execute("VACUUM")
        connection.execute("PRAGMA journal_mode=WAL")
    storage = SQLiteSessionStorage(sqlite_path)
    await storage.initialize()
    try:
        own = await run_in_thread(
            storage._opened_connection(),
            lambda c: c.execute("PRAGMA journal_size_limit").fetchone()[0],
        )
        async with storage.engine.connect() as connection:
            found = await connection.exec_driver_sql("PRAGMA journal_size_limit")
            units = found.scalar_one()
        assert own == units == limit
    finally:
        await storage.close()


# Run as a script of its own: under pytest the abandoned iteration stays referenced (by
# the test's frames), where the command's was finalised at once, as here.
_EXPORT_TO_A_READER_THAT_GOES = """
import asyncio, io, os, sys, threading
from persistence import SQLiteSessionStorage
from persistence.transfer.exchange import export_to_stream

def take_100_bytes_and_go(descriptor):
    os.read(descriptor, 100)
    os.close(descriptor)

async def export_once(path):
    storage = SQLiteSessionStorage(path)
    await storage.open_for_reading()
    read, write = os.pipe()
    reader = threading.Thread(target=take_100_bytes_and_go, args=(read,))
    reader.start()
    stream = io.TextIOWrapper(io.FileIO(write, "w"), write_through=True)
    try:
        await export_to_stream(storage, stream, batch_size=500)
    except BrokenPipeError:
        print("broken pipe")
    finally:
        await storage.close()
        try:
            stream.close()
        except BrokenPipeError:
            pass
        reader.join()

for _ in range(5):
    asyncio.run(export_once(sys.argv[1]))
print("done")
"""


async def test_an_export_whose_reader_went_away_closes(sqlite_path: Path) -> None:
    """Found by attack: `export-all - | head -c 100` waited for good. The export, its
    reader gone, left the read-ahead's batch cancelled mid-read; the iteration's clean-up
    and the storage's close() then both closed its connection, and aiosqlite queued the
    second close's stop behind the first's, on a thread that had ended."""
    storage = SQLiteSessionStorage(sqlite_path)
    await storage.initialize()
    async with storage.unit_of_work() as uow:
        for n in range(3000):  # an export some times larger than a pipe's buffer
            session = ChatSession.create("m", session_id=f"s{n:04d}")
            session.add_message("user", "x" * 300)
            await uow.sessions.add(session)
        await uow.commit()
    await storage.close()
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", _EXPORT_TO_A_READER_THAT_GOES, str(sqlite_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["broken", "pipe"] * 5 + ["done"]


async def test_a_half_read_iteration_s_watch_ends_with_the_storage(sqlite_path: Path) -> None:
    """Found by attack: the watch threads of iterations left half-read, and still
    referenced, looked on after the storage's close() for the process's life."""
    storage = SQLiteSessionStorage(sqlite_path)
    await storage.initialize()
    await stored(storage, "s1", "s2")
    before = threading.active_count()
    half_read = [storage.iter_sessions(1) for _ in range(5)]
    for batches in half_read:
        await anext(batches)
    assert threading.active_count() >= before + 10  # a connection's thread and a watch
    await storage.close()
    deadline = time.monotonic() + 10 * WATCH_SECONDS
    while threading.active_count() > before - 1:  # the storage's own thread ended too
        assert time.monotonic() < deadline, [t.name for t in threading.enumerate()]
        await asyncio.sleep(WATCH_SECONDS / 5)
    assert half_read  # still referenced
