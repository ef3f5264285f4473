"""SessionManager.shutdown() while saves are in flight: every acknowledged save lands."""

from __future__ import annotations

import asyncio

from persistence import ChatSession, SessionManager, SessionStorage
from tests.reliability.conftest import Figures, Scale
from tests.reliability.support import state_of


async def test_shutdown_while_saves_are_in_flight_keeps_every_acknowledged_save(
    sql_storage: SessionStorage, scale: Scale, figures: Figures
) -> None:
    manager = SessionManager(sql_storage)
    sessions = [await manager.create_session("shutdown") for _ in range(scale.n(12, 50))]
    acked: set[str] = set()
    stop, warmed_up = asyncio.Event(), asyncio.Event()
    saves = 0

    async def writer(session: ChatSession) -> None:
        nonlocal saves
        turn = 0
        while not stop.is_set():
            session.add_message("user", f"{session.session_id} {turn}")
            turn += 1
            if await manager.auto_save(session):
                saves += 1
                acked.update(m.message_id for m in session.messages)
                if saves >= len(sessions) * scale.n(5, 50):
                    warmed_up.set()

    writers = [asyncio.ensure_future(writer(s)) for s in sessions]
    await warmed_up.wait()
    # Everything the sessions hold when shutdown() is called must be stored after it.
    held_at_shutdown = {m.message_id for s in sessions for m in s.messages}
    shutdown = asyncio.ensure_future(manager.shutdown())
    for _ in range(20):
        await asyncio.sleep(0)
    stop.set()
    await asyncio.gather(*writers)
    await shutdown
    state = await state_of(sql_storage)
    stored = {m for ids in state.messages.values() for m in ids}
    assert state.problems == []
    assert acked <= stored
    assert held_at_shutdown <= stored
    figures["sessions"] = len(sessions)
    figures["saves_acknowledged"] = saves
    figures["messages_held_at_shutdown"] = len(held_at_shutdown)
    figures["lost"] = 0
