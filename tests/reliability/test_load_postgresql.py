"""PostgreSQL under load: more tasks than connections wait for one, or fail clearly."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from persistence import (
    ChatSession,
    PostgreSQLSessionStorage,
    StorageConnectionError,
    UnitOfWork,
)
from tests.reliability.conftest import Figures, Scale
from tests.reliability.support import postgresql_state

pytestmark = pytest.mark.postgresql

MakeStorage = Callable[..., Awaitable[PostgreSQLSessionStorage]]


@contextlib.asynccontextmanager
async def holding_connections(
    storage: PostgreSQLSessionStorage, count: int
) -> AsyncIterator[list[UnitOfWork]]:
    """Opens `count` units of work that each hold a pooled connection until exit."""
    async with contextlib.AsyncExitStack() as stack:
        held = []
        for _ in range(count):
            uow = await stack.enter_async_context(storage.unit_of_work())
            await uow.sessions.get("held")
            held.append(uow)
        yield held


async def test_tasks_beyond_the_pool_wait_for_a_connection_and_all_succeed(
    make_postgresql: MakeStorage, scale: Scale, figures: Figures
) -> None:
    pool = 4
    tasks, saves_each = scale.n(40, 200), scale.n(15, 100)
    storage = await make_postgresql(min_pool_size=1, max_pool_size=pool, pool_timeout=60)
    shared = ChatSession.create("load", session_id="shared")
    await storage.save_session(shared)
    peak = 0
    running = True

    async def monitor() -> None:
        nonlocal peak
        while running:
            peak = max(peak, storage.engine.pool.checkedout())
            await asyncio.sleep(0)

    async def writer(index: int) -> list[str]:
        own = ChatSession.create("load", session_id=f"task-{index}")
        mine = await storage.load_session("shared")
        assert mine is not None
        for seq in range(saves_each):
            target = own if seq % 2 else mine
            target.add_message("user", f"task-{index} {seq}")
            await storage.save_session(target)
        return [m.message_id for m in own.messages + mine.messages]

    watcher = asyncio.ensure_future(monitor())
    try:
        results = await asyncio.gather(*(writer(i) for i in range(tasks)))
    finally:
        running = False
        await watcher
    state = await postgresql_state(storage.url.render_as_string(hide_password=False))
    assert state.problems == []
    acked = {message_id for ids in results for message_id in ids}
    assert state.rows == len(acked) == tasks * saves_each
    assert not acked - {m for ids in state.messages.values() for m in ids}
    assert 0 < peak <= pool
    assert storage.engine.pool.checkedout() == 0
    figures["tasks"] = tasks
    figures["max_pool_size"] = pool
    figures["peak_checked_out"] = peak
    figures["saves"] = tasks * saves_each
    figures["failed"] = 0
    figures["lost"] = 0


async def test_a_save_waits_while_every_connection_is_taken(make_postgresql: MakeStorage) -> None:
    storage = await make_postgresql(min_pool_size=1, max_pool_size=2, pool_timeout=60)
    session = ChatSession.create("load")
    session.add_message("user", "waited")
    async with holding_connections(storage, 2) as held:
        save = asyncio.ensure_future(storage.save_session(session))
        for _ in range(50):
            await asyncio.sleep(0)
        assert not save.done()
        await held[0].rollback()
        await held[0].__aexit__(None, None, None)
        assert await save is True
    loaded = await storage.load_session(session.session_id)
    assert loaded is not None and [m.content for m in loaded.messages] == ["waited"]
    assert storage.engine.pool.checkedout() == 0


async def test_pool_exhausted_past_the_timeout_is_a_clear_error_and_writes_nothing(
    make_postgresql: MakeStorage,
) -> None:
    storage = await make_postgresql(min_pool_size=1, max_pool_size=2, pool_timeout=0.2)
    session = ChatSession.create("load")
    session.add_message("user", "refused")
    async with holding_connections(storage, 2):
        with pytest.raises(StorageConnectionError, match="pool exhausted") as caught:
            await storage.save_session(session)
        assert "save session" in str(caught.value)
    assert storage.engine.pool.checkedout() == 0
    assert await storage.load_session(session.session_id) is None
    assert await storage.save_session(session) is True
    loaded = await storage.load_session(session.session_id)
    assert loaded is not None and loaded.message_count == 1
