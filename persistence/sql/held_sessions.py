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

Found by attack: two units of work adding the same two objects in opposite order
waited for each other for good (on PostgreSQL, whose deadlock detector never saw it:
they locked different rows). A wait that would close such a circle raises instead,
as a database's deadlock detection does.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from persistence.errors import PersistenceError
from persistence.models import ChatSession
from persistence.turns import Turn, save_turn


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


# By task: the hold it waits for to end.
_WAITING: dict[asyncio.Task[Any], _Hold] = {}


def held_by_another(token: str, session: ChatSession) -> bool:
    """Whether another task's unit of work of storage `token` holds `session` now."""
    held = _HELD.get((token, id(session))) if _HELD else None
    return held is not None and held.owner is not asyncio.current_task()


def held_by_this_task(token: str, session: ChatSession) -> bool:
    """Whether a unit of work of storage `token` that this task runs holds `session`."""
    held = _HELD.get((token, id(session))) if _HELD else None
    return held is not None and held.owner is asyncio.current_task()


# How long a unit of work waits for another one's object before it gives up: the other
# may be waiting for this unit's rows in the database, a circle no one detector sees.
UNIT_WAIT_SECONDS = 30.0


async def wait_for_units(token: str, session: ChatSession, *, in_unit: bool = False) -> None:
    """Returns once no other task's unit of work of storage `token` holds `session`.
    `in_unit`: the caller is a unit of work, whose transaction may hold rows the
    holder waits for; it waits UNIT_WAIT_SECONDS at most.

    Raises:
        PersistenceError: the unit holding it waits, itself or through others, for one
            this task's unit holds (a deadlock), or (`in_unit`) it held the session
            past UNIT_WAIT_SECONDS; nothing waited for is changed.
    """
    current = asyncio.current_task()
    while _HELD:
        held = _HELD.get((token, id(session)))
        if held is None or held.owner is current:
            return
        _refuse_circle(held, current, session)
        if current is not None:
            _WAITING[current] = held
        try:
            if in_unit:
                await asyncio.wait_for(held.ended.wait(), UNIT_WAIT_SECONDS)
            else:
                await held.ended.wait()
        except TimeoutError:
            # Found by attack: a unit waiting here for a session another unit held,
            # while that unit waited in the database for a row this one had written,
            # waited for good.
            raise PersistenceError(
                f"session {session.session_id!r} is held by another task's unit of work,"
                f" still after {UNIT_WAIT_SECONDS:g} s; it may be waiting for rows this"
                " unit of work wrote (a deadlock through the database): roll this unit"
                " of work back and run it again"
            ) from None
        finally:
            if current is not None:
                del _WAITING[current]


def _refuse_circle(held: _Hold, current: asyncio.Task[Any] | None, session: ChatSession) -> None:
    """Raises if waiting for `held` would wait, through other waits, for `current`."""
    owner, seen = held.owner, set()
    while owner is not None and owner not in seen:
        if owner is current:
            raise PersistenceError(
                f"session {session.session_id!r} is held by another task's unit of work,"
                " which waits for a session this task's unit of work holds (a deadlock):"
                " roll this unit of work back and run it again (units that add their"
                " sessions in one order, say sorted by id, never meet so)"
            )
        seen.add(owner)
        waited = _WAITING.get(owner)
        # A hold that has ended no longer holds its waiter back, though the waiter may
        # not have run since (found by attack: a false deadlock was reported so).
        owner = None if waited is None or waited.ended.is_set() else waited.owner


class UnheldTurn:
    """`async with UnheldTurn(token, session):` the object's save turn, taken once no
    other task's unit of work holds it. The wait for units comes first, outside the
    turn: a unit holding the object takes the turn again to add it again. What a plain
    save and a unit's `add` both take. A class, not a generator-based context manager:
    it is on every save's path (persistence.turns.Turn).
    """

    __slots__ = ("_in_unit", "_session", "_token", "_turn")

    def __init__(self, token: str, session: ChatSession, *, in_unit: bool = False) -> None:
        self._token = token
        self._session = session
        self._in_unit = in_unit
        self._turn: Turn | None = None

    async def __aenter__(self) -> None:
        token, session = self._token, self._session
        while True:
            if _HELD:
                await wait_for_units(token, session, in_unit=self._in_unit)
            turn = save_turn(token, session)
            await turn.__aenter__()
            if not held_by_another(token, session):
                self._turn = turn
                return
            # A unit of work took it while this one waited for the turn.
            await turn.__aexit__(None, None, None)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._turn is not None, "entered"
        await self._turn.__aexit__(exc_type, exc, tb)
