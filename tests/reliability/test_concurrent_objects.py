"""One session object used by several tasks at once: nothing it acknowledged is lost."""

from __future__ import annotations

import asyncio

from persistence import ChatSession, SessionStorage
from tests.reliability.conftest import Figures


async def test_a_message_appended_while_a_save_is_in_flight_is_saved_by_the_next_save(
    sql_storage: SessionStorage, figures: Figures
) -> None:
    lost = []
    for steps in range(0, 40):
        mine = ChatSession.create("race", session_id=f"race-{steps}")
        mine.add_message("user", "mine 1")
        await sql_storage.save_session(mine)
        theirs = await sql_storage.load_session(mine.session_id)
        assert theirs is not None
        theirs.add_message("user", "theirs 1")
        await sql_storage.save_session(theirs)
        mine.add_message("user", "mine 2")
        in_flight = asyncio.ensure_future(sql_storage.save_session(mine))
        for _ in range(steps):
            await asyncio.sleep(0)
        late = mine.add_message("user", "mine 3, appended during the save")
        await in_flight
        assert await sql_storage.save_session(mine) is True
        loaded = await sql_storage.load_session(mine.session_id)
        assert loaded is not None
        if late.message_id not in {m.message_id for m in loaded.messages}:
            lost.append(steps)
    figures["interleavings_tried"] = 40
    assert lost == [], f"acknowledged but not stored after {lost} loop steps"


async def test_two_tasks_saving_one_object_at_once_both_succeed(
    sql_storage: SessionStorage, figures: Figures
) -> None:
    session = ChatSession.create("race")
    await sql_storage.save_session(session)
    failures = []
    for turn in range(30):
        session.add_message("user", f"turn {turn}")
        results = await asyncio.gather(
            sql_storage.save_session(session),
            sql_storage.save_session(session),
            return_exceptions=True,
        )
        failures += [r for r in results if isinstance(r, BaseException)]
    loaded = await sql_storage.load_session(session.session_id)
    assert loaded is not None and [m.content for m in loaded.messages] == [
        f"turn {turn}" for turn in range(30)
    ]
    figures["concurrent_pairs"] = 30
    assert failures == [], failures[:2]
