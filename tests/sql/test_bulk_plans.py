"""PostgreSQL: a bulk insert plans its triggers' queries once (persistence.sql.plans)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
from sqlalchemy import text

from persistence import ChatSession, InvalidDataError, PostgreSQLSessionStorage
from persistence.sql.bulk import MIN_COPIED_ROWS
from persistence.sql.runner import Fetch, Work, traced
from persistence.sql.statements import Statement

pytestmark = pytest.mark.postgresql

SETTINGS = Statement(
    text("SELECT current_setting('plan_cache_mode'), current_setting('enable_seqscan')")
)
SEQUENTIAL_SCANS = Statement(
    text("SELECT seq_scan FROM pg_stat_xact_user_tables WHERE relname = 'chat_sessions'")
)


def _fetch(statement: Statement) -> Work[Sequence[Any]]:
    rows = yield Fetch(statement, {})
    return tuple(rows[0])


def _add(session: ChatSession, count: int) -> None:
    for index in range(count):
        session.add_message("user", f"message {index}")


async def test_the_rest_of_a_unit_of_work_plans_as_before(
    postgresql_storage: PostgreSQLSessionStorage,
) -> None:
    session = ChatSession.create("m")
    _add(session, MIN_COPIED_ROWS)
    sent: list[str] = []
    async with postgresql_storage.unit_of_work() as uow:
        assert await uow.run(_fetch(SETTINGS), "read") == ("force_custom_plan", "on")
        with traced(sent.append):
            await uow.sessions.add(session)
        assert await uow.run(_fetch(SETTINGS), "read") == ("force_custom_plan", "on")
        await uow.commit()
    # The insert ran between the change and the restore.
    insert = next(index for index, sql in enumerate(sent) if sql.startswith("COPY chat_messages"))
    assert "set_config('plan_cache_mode', 'auto', true)" in sent[insert - 1]
    assert sent[insert + 1].startswith("SELECT set_config('plan_cache_mode', $1")
    loaded = await postgresql_storage.load_session(session.session_id)
    assert loaded is not None and len(loaded.messages) == MIN_COPIED_ROWS


async def test_a_failed_bulk_insert_leaves_the_next_transaction_planning_as_before(
    postgresql_storage: PostgreSQLSessionStorage,
) -> None:
    stored = ChatSession.create("m")
    _add(stored, 1)
    assert await postgresql_storage.save_session(stored)
    session = ChatSession.create("m")
    _add(session, MIN_COPIED_ROWS)
    # The last message collides with a stored one: the insert fails after the change.
    session.messages[-1] = stored.messages[0].model_copy(update={"session_id": session.session_id})
    sent: list[str] = []
    with pytest.raises(InvalidDataError, match="already stored"), traced(sent.append):
        async with postgresql_storage.unit_of_work() as uow:
            await uow.sessions.add(session)
            await uow.commit()
    # The insert failed after the change, and its error is the one raised: the
    # aborted transaction undid the change, and no restore was sent into it.
    assert sent[-1].startswith("COPY chat_messages")
    assert "set_config('plan_cache_mode', 'auto', true)" in sent[-2]
    async with postgresql_storage.unit_of_work() as uow:
        assert await uow.run(_fetch(SETTINGS), "read") == ("force_custom_plan", "on")


async def test_a_plan_kept_while_the_sessions_were_few_never_scans_them_all(
    one_connection: PostgreSQLSessionStorage, analysed_alone: ChatSession
) -> None:
    storage = one_connection
    # The foreign-key check of every message is planned now, with the statistics of
    # one session, and kept for the later bulk inserts of this server process.
    await _bulk_insert(storage)
    # The sessions grow, and nothing analyses them (autovacuum is off for the table).
    others = [ChatSession.create("m") for _ in range(3_000)]
    assert await storage.insert_sessions(others)
    # Without sequential scans disabled, the kept plan read all 3,00x sessions for each
    # message.
    assert await _bulk_insert(storage) == 0


async def _bulk_insert(storage: PostgreSQLSessionStorage) -> int:
    """Bulk-inserts a new session's messages (a COPY; appends to a stored session are one
    statement of their own); the sequential scans of chat_sessions it took.

    The server's per-transaction counters also hold earlier transactions' counts until
    it flushes them (at most once a second), so the insert's own are a difference.
    """
    session = ChatSession.create("m")
    _add(session, 2 * MIN_COPIED_ROWS)
    async with storage.unit_of_work() as uow:
        (before,) = await uow.run(_fetch(SEQUENTIAL_SCANS), "read")
        await uow.sessions.add(session)
        (after,) = await uow.run(_fetch(SEQUENTIAL_SCANS), "read")
        await uow.commit()
    return int(after) - int(before)
