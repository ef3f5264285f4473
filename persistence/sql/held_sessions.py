"""Sessions an open unit of work wrote and has not committed: other tasks' saves of
the same object wait for it to end.

A unit of work's `add` moves the object's base to what the unit wrote before it
commits, and its rollback puts the old base back. Found by attack: another task's
save of the same object, planned from that uncommitted base, returned True with
nothing written (the base said the store held everything), or wrote only the newer
message; after the rollback the older one was appended after it, out of order. A save
of an object held so, from any task but the unit's own, now waits until the unit has
committed or rolled back, as a writer waits for a lock. A task that awaits, inside
its unit of work, another task saving the same object therefore waits for good.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from persistence.models import ChatSession


@dataclass
class _Hold:
    owner: asyncio.Task[Any] | None
    ended: asyncio.Event = field(default_factory=asyncio.Event)


# By (storage token, id of the object): the unit holding it. The unit keeps the object
# alive until it releases it, so the id is not reused meanwhile.
_HELD: dict[tuple[str, int], _Hold] = {}


def hold(token: str, session: ChatSession, owner: asyncio.Task[Any] | None) -> tuple[str, int]:
    """Records that a unit of work of storage `token`, run by `owner`, wrote `session`."""
    key = (token, id(session))
    _HELD.setdefault(key, _Hold(owner))
    return key


def release(keys: list[tuple[str, int]]) -> None:
    """The unit that held these has ended: waiting saves go on."""
    for key in keys:
        held = _HELD.pop(key, None)
        if held is not None:
            held.ended.set()


def any_held() -> bool:
    """Whether any unit of work holds an object now (a save's fast path asks first)."""
    return bool(_HELD)


async def wait_for_units(token: str, session: ChatSession) -> None:
    """Returns once no other task's unit of work of storage `token` holds `session`."""
    while _HELD:
        held = _HELD.get((token, id(session)))
        if held is None or held.owner is asyncio.current_task():
            return
        await held.ended.wait()
