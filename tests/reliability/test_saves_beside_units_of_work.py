"""A save of an object that another task's open unit of work wrote waits for the unit.

Found by attack: the unit's `add` moves the object's base before it commits. A save
from another task, planned from that base, returned True with nothing written, or
wrote only the newer message; after the unit's rollback the older message was
appended after it, out of order.
"""

from __future__ import annotations

import asyncio

import pytest

from persistence import ChatSession, SessionStorage
from tests.servers import second_holder


async def _contents(storage: SessionStorage, session_id: str) -> list[str]:
    stored = await storage.load_session(session_id)
    assert stored is not None
    assert stored.message_count == len(stored.messages)
    return [message.content for message in stored.messages]


@pytest.mark.parametrize("ending", ["rollback", "commit"])
@pytest.mark.parametrize("added_beside", [False, True])
async def test_a_save_beside_an_open_unit_of_work_waits_for_it(
    sql_storage: SessionStorage, ending: str, added_beside: bool
) -> None:
    session = ChatSession.create("m")
    session.add_message("user", "q")
    await sql_storage.save_session(session)
    session.add_message("assistant", "m1")
    added = asyncio.Event()
    acknowledged: list[list[str]] = []

    async def unit() -> None:
        async with sql_storage.unit_of_work() as uow:
            await uow.sessions.add(session)
            added.set()
            await asyncio.sleep(0.3)
            assert not acknowledged, "the save beside did not wait for the unit"
            if ending == "commit":
                await uow.commit()

    async with second_holder(sql_storage) as other:

        async def beside() -> None:
            await added.wait()
            if added_beside:
                session.add_message("user", "m2")
            assert await other.save_session(session) is True
            acknowledged.append(await _contents(other, session.session_id))

        await asyncio.gather(unit(), beside())

    held = [message.content for message in session.messages]
    assert acknowledged == [held]
    assert await _contents(sql_storage, session.session_id) == held
