"""Turns: work on one key waits until no other work on that key is running.

Saves of one object to one store take turns, whichever storage object sends them
(`save_turn`): each save plans from the base the previous one left
(persistence.bookkeeping), and storages opened on one store share its token
(SessionStorage.token), so the turns are kept per token and object. A SessionManager
keeps its own turns the same way: its saves per object, its loads per session id.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Hashable
from types import TracebackType

from persistence.errors import PersistenceError


class Turns:
    """Locks by key, made when first needed and dropped once nothing holds or awaits them.

    `async with turns(key):` waits until no other holder of `key` is inside. A key is
    waited for in one event loop at a time: an asyncio lock belongs to one loop and one
    thread. Found by attack: saves of one object (or a SessionManager's work on one
    session) from loops in several threads failed with a raw RuntimeError ("bound to a
    different event loop"), and one of them then waited for good, woken from another
    thread. Work on a key in another loop now raises `refusal`.
    """

    __slots__ = ("_locks", "_refusal")

    def __init__(self, refusal: str) -> None:
        # key -> its lock, how many hold or wait for it, and the loop they run in.
        self._locks: dict[Hashable, _Entry] = {}
        self._refusal = refusal

    def __call__(self, key: Hashable) -> Turn:
        return Turn(self, key)

    def busy(self) -> set[Hashable]:
        """The keys some work holds or waits for now."""
        return set(self._locks)


_Entry = tuple[asyncio.Lock, int, asyncio.AbstractEventLoop]
# Loops in several threads may share one Turns: each change of its dict takes this.
_GUARD = threading.Lock()


class Turn:
    """One wait for one key of a Turns. A class, not a generator-based context manager:
    it is on every save's path (2 us against 7)."""

    __slots__ = ("_key", "_lock", "_turns")

    def __init__(self, turns: Turns, key: Hashable) -> None:
        self._turns = turns
        self._key = key

    async def __aenter__(self) -> None:
        loop = asyncio.get_running_loop()
        locks, key = self._turns._locks, self._key
        with _GUARD:
            entry = locks.get(key)
            if entry is not None and entry[2] is not loop:
                if not entry[2].is_closed():
                    raise PersistenceError(self._turns._refusal.format(key=key))
                # Found by attack: a loop closed in the middle of its work (its task
                # never ended) kept the key for good; nothing there will release it.
                entry = None
            lock, users, owner = entry or (asyncio.Lock(), 0, loop)
            locks[key] = (lock, users + 1, owner)
        self._lock = lock
        try:
            await lock.acquire()
        except BaseException:
            self._leave()
            raise

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._lock.release()
        self._leave()

    def _leave(self) -> None:
        locks, key = self._turns._locks, self._key
        with _GUARD:
            entry = locks.get(key)
            if entry is None or entry[0] is not self._lock:
                return  # its closed loop's entry, taken over since
            lock, users, owner = entry
            if users == 1:
                del locks[key]
            else:
                locks[key] = (lock, users - 1, owner)


_SAVES = Turns(
    "this session object is being saved in another event loop (another thread): an"
    " object is saved from one loop at a time; load a copy of the session in each loop"
)


def save_turn(token: str, holder: object) -> Turn:
    """`async with save_turn(token, holder)`: waits until no other save of `holder` to
    the store `token` names is running."""
    return _SAVES((token, id(holder)))
