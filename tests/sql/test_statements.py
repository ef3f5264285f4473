"""Structural cost: statements per call do not grow with history or store size."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import aiosqlite
import asyncpg
import pytest
from sqlalchemy import text

from persistence import ChatSession, PostgreSQLSessionStorage, SessionStorage, SQLiteSessionStorage
from persistence.sql import uow as uow_module
from persistence.sql.backend import SqlSessionStorage
from persistence.sql.checkout import driver_connection
from persistence.sql.repositories import DELETE_SESSION, SELECT_SESSIONS_IN
from persistence.sql.runner import Execute, WhichDialect, Work, one_statement, run_in_thread, traced
from persistence.sql.statements import Statement
from persistence.sql.write_statements import DELETE_MESSAGES, SESSION_MESSAGES
from tests.factories import file_record


@contextmanager
def statements(storage: SessionStorage) -> Iterator[list[str]]:
    """Records every SQL statement the storage sends (transaction control aside)."""
    assert isinstance(storage, SqlSessionStorage)
    seen: list[str] = []
    with traced(seen.append):
        yield seen


async def _session_with(storage: SessionStorage, count: int) -> ChatSession:
    session = ChatSession.create("m")
    for index in range(count):
        session.add_message("user", f"message {index}")
    async with storage.unit_of_work() as uow:
        await uow.sessions.add(session)
        await uow.commit()
    return session


async def _statements_of_one_append(storage: SessionStorage, session: ChatSession) -> list[str]:
    session.add_message("assistant", "one more")
    with statements(storage) as seen:
        await storage.save_session(session)
    return seen


async def test_save_after_one_message_costs_the_same_at_10_and_10000_messages(
    sql_storage: SessionStorage,
) -> None:
    short = await _session_with(sql_storage, 10)
    long = await _session_with(sql_storage, 10_000)

    at_10 = await _statements_of_one_append(sql_storage, short)
    at_10000 = await _statements_of_one_append(sql_storage, long)

    assert at_10 == at_10000
    # One guarded update of the session row and one insert of the new message: on
    # PostgreSQL one statement (revision 0007's function), so one round trip.
    if sql_storage.backend_name == "postgresql":
        assert len(at_10) == 1 and "FROM persistence_append(" in at_10[0]
    else:
        touching = [s.split()[0:3] for s in at_10 if "chat_" in s]
        assert touching == [
            ["UPDATE", "chat_sessions", "SET"],
            ["INSERT", "INTO", "chat_messages"],
        ]
    loaded = await sql_storage.load_session(long.session_id)
    assert loaded is not None and loaded.message_count == 10_001


async def test_a_load_is_one_statement_on_postgresql(sql_storage: SessionStorage) -> None:
    session = await _session_with(sql_storage, 30)

    for last in (None, 5):
        with statements(sql_storage) as seen:
            loaded = await sql_storage.load_session(session.session_id, last=last)
        assert loaded is not None and loaded.message_count == 30
        assert len(loaded.messages) == (last or 30)
        touching = [s for s in seen if "chat_" in s]
        if sql_storage.backend_name == "postgresql":
            # Its own snapshot: the row and the history in one UNION, no transaction.
            assert len(seen) == 1 and "UNION ALL" in seen[0]
        else:
            # Two reads in one transaction, in the one hop to the connection's thread.
            assert len(touching) == 2


async def test_list_sessions_is_one_statement_whatever_the_store_size(
    sql_storage: SessionStorage,
) -> None:
    for _ in range(3):
        await _session_with(sql_storage, 1)
    with statements(sql_storage) as small:
        await sql_storage.list_sessions(limit=2)
    for _ in range(50):
        await _session_with(sql_storage, 1)
    with statements(sql_storage) as large:
        page = await sql_storage.list_sessions(limit=2)

    assert len(page) == 2
    assert len([s for s in small if "chat_sessions" in s]) == 1
    assert small == large


async def test_load_sessions_of_many_ids_is_two_statements(sql_storage: SessionStorage) -> None:
    """The ids go as one parameter, not one each in chunks of 500: the sessions' rows
    and their messages are a statement each, however many ids are asked for."""
    stored = [await _session_with(sql_storage, 2) for _ in range(3)]
    ids = [f"missing-{index}" for index in range(1200)]
    ids[0], ids[700], ids[1199] = (session.session_id for session in stored)

    with statements(sql_storage) as seen:
        loaded = await sql_storage.load_sessions(ids)

    assert [session.session_id for session in loaded] == [ids[0], ids[700], ids[1199]]
    assert [s.split("FROM", 1)[0].count("chat_messages.") > 0 for s in seen] == [False, True]


async def test_load_sessions_looks_each_id_up_on_postgresql(
    postgresql_storage: PostgreSQLSessionStorage,
) -> None:
    """1,000 of 3,000 sessions (analysed): each through the primary key, where
    `session_id = ANY(...)` and an IN list were planned as a scan of the whole table."""
    storage = postgresql_storage
    batch = [ChatSession.create("m") for _ in range(3000)]
    assert await storage.insert_sessions(batch)
    async with storage.engine.begin() as connection:
        await connection.execute(text("ANALYZE chat_sessions"))
    wanted = {"ids": [session.session_id for session in batch[::3]]}
    sql, values = SELECT_SESSIONS_IN.compile(storage.engine.dialect).bind(wanted)
    async with driver_connection(storage.engine) as driver:
        plan = await driver.fetchval("EXPLAIN (ANALYZE, FORMAT JSON) " + sql, *values)

    def rows_examined(node: dict[str, Any]) -> int:
        own = 0
        if node.get("Relation Name") == "chat_sessions":
            own = (node["Actual Rows"] + node.get("Rows Removed by Filter", 0)) * node[
                "Actual Loops"
            ]
        return own + sum(rows_examined(child) for child in node.get("Plans", ()))

    assert rows_examined(plan[0]["Plan"]) == 1000


@pytest.mark.parametrize("statement", [DELETE_MESSAGES, SESSION_MESSAGES], ids=["delete", "select"])
async def test_messages_listed_by_id_are_found_by_the_id_on_sqlite(
    sqlite_storage: SQLiteSessionStorage, statement: Statement
) -> None:
    """Found by attack: with three ids or more, SQLite's planner walked every message
    of the session (its index) once a chunk, so a rewind of 10 messages took 45 ms in a
    session of 200,000 and one of 100,000 of them 9.7 s, the write lock held."""
    session = await _session_with(sqlite_storage, 300)
    ids = [message.message_id for message in session.messages[-3:]]
    sql, values = statement.compile(sqlite_storage.engine.dialect).bind(
        {"session_id": session.session_id, "ids": ids}
    )
    async with sqlite_storage.engine.connect() as connection:
        raw = await connection.get_raw_connection()
        driver = raw.driver_connection
        assert isinstance(driver, aiosqlite.Connection)
        async with driver.execute("EXPLAIN QUERY PLAN " + sql, values) as cursor:
            plan = " ".join(str(row[-1]) for row in await cursor.fetchall())
    assert "(message_id=?)" in plan and "session_position" not in plan, plan


async def test_search_uses_the_full_text_index(sql_storage: SessionStorage) -> None:
    await _session_with(sql_storage, 20)
    assert isinstance(sql_storage, SqlSessionStorage)
    async with sql_storage.engine.connect() as connection:
        if connection.dialect.name == "sqlite":
            plan = await connection.execute(
                text(
                    "EXPLAIN QUERY PLAN SELECT m.id FROM chat_messages_fts JOIN chat_messages m"
                    " ON m.id = chat_messages_fts.rowid WHERE chat_messages_fts MATCH '\"mess\"*'"
                    " ORDER BY chat_messages_fts.rowid DESC"
                )
            )
            steps = " ".join(str(row[-1]) for row in plan)
            assert "VIRTUAL TABLE INDEX" in steps and "TEMP B-TREE" not in steps
        else:
            await connection.execute(text("SET enable_seqscan = off"))
            plan = await connection.execute(
                text("EXPLAIN SELECT id FROM chat_message_terms WHERE terms @@ 'mess:*'")
            )
            assert "ix_chat_message_terms_terms" in " ".join(row[0] for row in plan)


@pytest.mark.parametrize("count", [0, 1, 25])
async def test_message_count_always_equals_rows_stored(
    sql_storage: SessionStorage, count: int
) -> None:
    session = await _session_with(sql_storage, count)
    assert isinstance(sql_storage, SqlSessionStorage)
    async with sql_storage.engine.connect() as connection:
        rows = (
            await connection.execute(
                text("SELECT count(*) FROM chat_messages WHERE session_id = :id"),
                {"id": session.session_id},
            )
        ).scalar_one()
    counts = await sql_storage.count()
    assert rows == count == counts.messages


async def test_a_sqlite_unit_of_work_of_one_save_is_three_hops_to_the_thread(
    sqlite_storage: SQLiteSessionStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """BEGIN IMMEDIATE before the save is planned (found by attack: a save planned
    before the unit held the write lock could land stale), the save, then the COMMIT;
    the pool takes the connection back without a rollback of its own
    (test_sqlite_pool_reset.py)."""
    session = ChatSession.create("m")
    await sqlite_storage.save_session(session)
    async with sqlite_storage.unit_of_work() as uow:  # the pool's connection is opened
        await uow.commit()
    hops: list[object] = []
    execute = aiosqlite.Connection._execute

    async def counted(self: aiosqlite.Connection, fn: Any, *args: Any, **kwargs: Any) -> Any:
        hops.append(fn)
        return await execute(self, fn, *args, **kwargs)

    async def counted_here(connection: aiosqlite.Connection, fn: Any, *args: Any) -> Any:
        # The library queues its own calls (runner.run_in_thread), not through _execute.
        hops.append(fn)
        return await run_in_thread(connection, fn, *args)

    monkeypatch.setattr(aiosqlite.Connection, "_execute", counted)
    monkeypatch.setattr(uow_module, "run_in_thread", counted_here)
    session.add_message("user", "one")
    async with sqlite_storage.unit_of_work() as uow:
        await uow.sessions.add(session)
        await uow.commit()
    monkeypatch.undo()

    assert len(hops) == 3
    loaded = await sqlite_storage.load_session(session.session_id)
    assert loaded is not None and [m.content for m in loaded.messages] == ["one"]


async def test_one_statement_writes_run_without_begin_or_commit_on_postgresql(
    postgresql_storage: PostgreSQLSessionStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new session's save while its id is free, a file record's save, a session's
    delete (its messages by cascade, their terms by a trigger), the expiry of files and
    of sessions: one statement each, atomic without a transaction around it, so one
    round trip instead of three."""
    storage = postgresql_storage
    session = await _session_with(storage, 3)
    now = datetime.now(UTC)
    record = file_record(expires_in=-timedelta(hours=1))
    begun: list[object] = []
    start = asyncpg.transaction.Transaction.start

    async def counted(self: Any) -> None:
        begun.append(self)
        await start(self)

    monkeypatch.setattr(asyncpg.transaction.Transaction, "start", counted)
    created = ChatSession.create("m", metadata={"title": "new"})
    with statements(storage) as seen:
        assert await storage.save_session(created)
        assert await storage.save_file_record(record)
        assert await storage.delete_expired_files() >= 1
        assert await storage.expire_sessions(now - timedelta(days=365)) >= 0
        assert await storage.delete_session(session.session_id)
    monkeypatch.undo()

    assert begun == []
    assert len(seen) == 5
    stored = await storage.load_session(created.session_id)
    assert stored is not None and stored.metadata == {"title": "new"}
    assert await storage.load_file_record(record.file_id) is None
    assert await storage.load_session(session.session_id) is None
    async with storage.engine.connect() as connection:
        left = await connection.execute(
            text("SELECT count(*) FROM chat_messages WHERE session_id = :id"),
            {"id": session.session_id},
        )
        assert left.scalar_one() == 0


def test_a_write_run_as_one_statement_is_stopped_before_a_second() -> None:
    closed: list[bool] = []

    def two_writes() -> Work[int]:
        try:
            yield Execute(DELETE_SESSION, {"session_id": "a"})
            yield Execute(DELETE_SESSION, {"session_id": "b"})
            return 2
        finally:
            closed.append(True)

    work = one_statement(two_writes())
    assert isinstance(next(work), Execute)
    with pytest.raises(RuntimeError, match="needs a transaction"):
        work.send(1)
    assert closed == [True]

    def one_write() -> Work[int]:
        assert (yield WhichDialect()) == "postgresql"
        return int((yield Execute(DELETE_SESSION, {"session_id": "a"})))

    work = one_statement(one_write())
    assert isinstance(next(work), WhichDialect)
    assert isinstance(work.send("postgresql"), Execute)
    with pytest.raises(StopIteration) as stopped:
        work.send(1)
    assert stopped.value.value == 1
