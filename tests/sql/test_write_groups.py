"""SQLite writes queued together share one transaction, each as if alone (write_groups.py).

The storage's connection thread is held busy while the writes are made, so they queue
up and the next drain takes them as one group; what reaches the file is watched with
sqlite3's own trace callback, and the store is read back through another storage.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.dialects import sqlite

from persistence import (
    ChatSession,
    InvalidDataError,
    PersistenceError,
    SQLiteSessionStorage,
)
from persistence.sql.runner import Execute, Work, run_in_thread
from persistence.sql.statements import Statement
from persistence.sql.write_groups import run_write_group

pytestmark = pytest.mark.sqlite


@asynccontextmanager
async def held_thread(storage: SQLiteSessionStorage) -> AsyncIterator[None]:
    """Keeps the storage's connection thread busy until the block ends."""
    release = threading.Event()
    started = threading.Event()

    def hold(_connection: Any) -> None:
        started.set()
        release.wait(10)

    holder = asyncio.ensure_future(run_in_thread(storage._opened_connection(), hold))
    await asyncio.to_thread(started.wait, 10)
    try:
        yield
    finally:
        release.set()
        await holder


@asynccontextmanager
async def sql_seen(storage: SQLiteSessionStorage) -> AsyncIterator[list[str]]:
    """Every statement the storage's connection runs inside the block, as SQLite saw it."""
    seen: list[str] = []
    connection = storage._opened_connection()
    await run_in_thread(connection, lambda db: db.set_trace_callback(seen.append))
    try:
        yield seen
    finally:
        await run_in_thread(connection, lambda db: db.set_trace_callback(None))


async def queued(*calls: Awaitable[Any]) -> list[asyncio.Task[Any]]:
    """Starts each call as a task and lets every one of them queue its work."""
    tasks = [asyncio.ensure_future(call) for call in calls]
    for _ in range(3):
        await asyncio.sleep(0)
    return tasks


def transactions(seen: list[str]) -> list[str]:
    return [sql for sql in seen if sql.startswith(("BEGIN", "COMMIT")) or sql == "ROLLBACK"]


async def stored(path: Path, session_id: str) -> ChatSession:
    async with SQLiteSessionStorage(path) as other:
        session = await other.load_session(session_id)
    assert session is not None
    assert session.message_count == len(session.messages)
    return session


async def saved_sessions(storage: SQLiteSessionStorage, count: int) -> list[ChatSession]:
    sessions = [ChatSession.create("m", session_id=f"s{index}") for index in range(count)]
    for session in sessions:
        session.add_message("user", "first")
        await storage.save_session(session)
    return sessions


async def test_writes_queued_together_share_one_commit_and_all_land(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    async with SQLiteSessionStorage(path) as storage:
        sessions = await saved_sessions(storage, 5)
        for session in sessions:
            session.add_message("assistant", f"reply to {session.session_id}")
        async with sql_seen(storage) as seen:
            async with held_thread(storage):
                tasks = await queued(*(storage.save_session(s) for s in sessions))
            assert await asyncio.gather(*tasks) == [True] * 5

        assert transactions(seen) == ["BEGIN IMMEDIATE", "COMMIT"]
        assert seen.count("SAVEPOINT grouped_write") == 5
        # A write alone runs as before: no savepoint.
        sessions[0].add_message("user", "alone")
        async with sql_seen(storage) as alone:
            await storage.save_session(sessions[0])
        assert transactions(alone) == ["BEGIN IMMEDIATE", "COMMIT"]
        assert not [sql for sql in alone if "SAVEPOINT" in sql]

    for session in sessions:
        again = await stored(path, session.session_id)
        assert [m.content for m in again.messages][:2] == [
            "first",
            f"reply to {session.session_id}",
        ]


async def test_a_write_that_fails_in_a_group_is_undone_alone(tmp_path: Path) -> None:
    """A save whose session row was already updated when its insert failed: without its
    own savepoint, the row's count and revision would land without the message."""
    path = tmp_path / "store.db"
    async with SQLiteSessionStorage(path) as storage:
        first, thief, last = await saved_sessions(storage, 3)
        first.add_message("user", "kept 1")
        last.add_message("user", "kept 2")
        thief.add_message("user", "would be lost")
        taken = first.messages[0].model_copy(update={"session_id": thief.session_id})
        thief.messages.append(taken)
        async with sql_seen(storage) as seen:
            async with held_thread(storage):
                tasks = await queued(*(storage.save_session(s) for s in (first, thief, last)))
            outcomes = await asyncio.gather(*tasks, return_exceptions=True)

        assert outcomes[0] is True and outcomes[2] is True
        assert isinstance(outcomes[1], InvalidDataError)
        assert "already stored in another session ('s0')" in str(outcomes[1])
        assert "ROLLBACK TO grouped_write" in seen
        assert transactions(seen)[:2] == ["BEGIN IMMEDIATE", "COMMIT"]

    assert [m.content for m in (await stored(path, "s0")).messages] == ["first", "kept 1"]
    assert [m.content for m in (await stored(path, "s2")).messages] == ["first", "kept 2"]
    robbed = await stored(path, "s1")
    assert [m.content for m in robbed.messages] == ["first"]
    assert robbed.message_count == 1


async def test_a_group_that_cannot_begin_fails_every_write_in_it(tmp_path: Path) -> None:
    """The file replaced while the writes waited: all of them are refused, none runs."""
    path = tmp_path / "store.db"
    async with SQLiteSessionStorage(path) as storage:
        sessions = await saved_sessions(storage, 3)
        for session in sessions:
            session.add_message("assistant", "never")
        async with sql_seen(storage) as seen:
            async with held_thread(storage):
                tasks = await queued(*(storage.save_session(s) for s in sessions))
                os.rename(path, tmp_path / "moved.db")
                path.write_bytes(b"")
            outcomes = await asyncio.gather(*tasks, return_exceptions=True)

    assert all(isinstance(outcome, PersistenceError) for outcome in outcomes), outcomes
    assert all("replaced or removed while open" in str(outcome) for outcome in outcomes)
    assert seen == ["BEGIN IMMEDIATE", "ROLLBACK"]


async def test_a_write_cancelled_while_queued_never_runs_and_the_rest_land(
    tmp_path: Path,
) -> None:
    path = tmp_path / "store.db"
    async with SQLiteSessionStorage(path) as storage:
        sessions = await saved_sessions(storage, 3)
        for session in sessions:
            session.add_message("assistant", "second")
        async with held_thread(storage):
            tasks = await queued(*(storage.save_session(s) for s in sessions))
            tasks[1].cancel()
            # Its canceller waits for the thread, so the cancel ends after the release.
            for _ in range(3):
                await asyncio.sleep(0)
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        assert outcomes[0] is True and outcomes[2] is True
        assert isinstance(outcomes[1], asyncio.CancelledError)
        # The cancelled save's outcome is unknown to its holder, so the next save checks.
        assert await storage.save_session(sessions[1])

    for session in sessions:
        assert [m.content for m in (await stored(path, session.session_id)).messages] == [
            "first",
            "second",
        ]


async def test_a_write_cancelled_while_its_group_waits_for_the_lock_never_runs(
    tmp_path: Path,
) -> None:
    """Found by attack: another connection held the write lock, two saves waited for
    it as one group, and the one cancelled meanwhile ran when the lock came."""
    path = tmp_path / "store.db"
    async with SQLiteSessionStorage(path) as storage:
        first, second = await saved_sessions(storage, 2)
        first.add_message("user", "lands")
        second.add_message("user", "cancelled")
        other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        other.execute("BEGIN IMMEDIATE")
        async with held_thread(storage):
            tasks = await queued(storage.save_session(first), storage.save_session(second))
        await asyncio.sleep(0.2)  # the group waits for the lock now
        tasks[1].cancel()
        await asyncio.sleep(0.1)
        other.execute("COMMIT")
        other.close()
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)

    assert outcomes[0] is True
    assert isinstance(outcomes[1], asyncio.CancelledError)
    assert [m.content for m in (await stored(path, "s0")).messages] == ["first", "lands"]
    assert [m.content for m in (await stored(path, "s1")).messages] == ["first"]


async def test_writes_waiting_when_a_close_is_cancelled_still_land(tmp_path: Path) -> None:
    """Found by attack: `wait_for(storage.close(), ...)` timing out let go of the
    connection before the waiting writes ran; they failed with a bare ValueError."""
    path = tmp_path / "store.db"
    storage = SQLiteSessionStorage(path)
    await storage.initialize()
    sessions = await saved_sessions(storage, 2)
    for session in sessions:
        session.add_message("user", "second")
    async with held_thread(storage):
        tasks = await queued(*(storage.save_session(s) for s in sessions))
        closing = asyncio.ensure_future(storage.close())
        await asyncio.sleep(0.05)
        closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing
    assert await asyncio.gather(*tasks) == [True, True]
    await storage.close()

    for session in sessions:
        assert [m.content for m in (await stored(path, session.session_id)).messages] == [
            "first",
            "second",
        ]


async def test_a_group_whose_disk_fills_reports_only_what_landed(tmp_path: Path) -> None:
    """SQLITE_FULL in the middle of a group (a page limit set on the connection): each
    write either lands and says so, or raises and leaves nothing, whatever SQLite rolls
    back (the statement, or the whole transaction)."""
    path = tmp_path / "store.db"
    async with SQLiteSessionStorage(path) as storage:
        sessions = await saved_sessions(storage, 4)
        connection = storage._opened_connection()
        pages = await run_in_thread(
            connection, lambda db: db.execute("PRAGMA page_count").fetchone()[0]
        )
        await run_in_thread(connection, lambda db: db.execute(f"PRAGMA max_page_count={pages}"))
        sessions[0].add_message("assistant", "small")
        for session in sessions[1:]:
            session.add_message("assistant", "big " * 20_000)
        async with held_thread(storage):
            tasks = await queued(*(storage.save_session(s) for s in sessions))
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        await run_in_thread(connection, lambda db: db.execute("PRAGMA max_page_count=1073741823"))

    assert any(isinstance(outcome, PersistenceError) for outcome in outcomes), outcomes
    for session, outcome in zip(sessions, outcomes, strict=True):
        contents = [m.content for m in (await stored(path, session.session_id)).messages]
        if outcome is True:
            assert contents == ["first", session.messages[1].content]
        else:
            assert isinstance(outcome, PersistenceError), outcome
            assert contents == ["first"]


def _insert(value: int, then: str | None = None, fail: bool = False) -> Work[int]:
    """Inserts `value`; then runs `then` (a statement that ends the transaction, as
    SQLite does on an I/O error) and raises if `fail`."""
    yield Execute(Statement(text("INSERT INTO t (x) VALUES (:x)")), {"x": value})
    if then is not None:
        yield Execute(Statement(text(then)), {})
    if fail:
        raise sqlite3.OperationalError("disk I/O error")
    return value


def _never() -> Work[None]:
    raise AssertionError("a work after the group failed ran")
    yield  # a generator


@pytest.mark.parametrize("fail", [True, False], ids=["raised", "silent"])
def test_a_transaction_sqlite_rolled_back_fails_the_whole_group(tmp_path: Path, fail: bool) -> None:
    """SQLite rolls the whole transaction back on some errors (an I/O error, a full
    disk, an interrupt): the writes before the failing one are gone with it, so none of
    them may be reported written, and the ones after never run. `silent`: the rollback
    shows only when the next savepoint cannot be released."""
    connection = sqlite3.connect(tmp_path / "plain.db", isolation_level=None)
    connection.execute("CREATE TABLE t (x INTEGER)")
    works = [_insert(1), _insert(2, then="ROLLBACK", fail=fail), _never()]

    outcomes = run_write_group(connection, sqlite.dialect(), works, None)

    assert [succeeded for succeeded, _ in outcomes] == [False, False, False]
    assert not connection.in_transaction
    assert connection.execute("SELECT count(*) FROM t").fetchone()[0] == 0
    # The connection is usable again.
    assert run_write_group(connection, sqlite.dialect(), [_insert(3), _insert(4)], None) == [
        (True, 3),
        (True, 4),
    ]
    assert connection.execute("SELECT x FROM t ORDER BY x").fetchall() == [(3,), (4,)]
