"""Turns: work on one key waits until no other work on that key is running.

Saves of one object to one store take turns, whichever storage object sends them
(`save_turn`): each save plans from the base the previous one left
(persistence.bookkeeping), and storages opened on one store share its token
(SessionStorage.token), so the turns are kept per token and object. A SessionManager
keeps its own turns the same way: its saves per object, its loads per session id.
"""

from __future__ import annotations

import asyncio
from collections.abc import Hashable
from types import TracebackType


class Turns:
    """Locks by key, made when first needed and dropped once nothing holds or awaits them.

    `async with turns(key):` waits until no other holder of `key` is inside.
    """

    __slots__ = ("_locks",)

    def __init__(self) -> None:
        # key -> its lock and how many hold or wait for it.
        self._locks: dict[Hashable, tuple[asyncio.Lock, int]] = {}

    def __call__(self, key: Hashable) -> Turn:
        return Turn(self._locks, key)

    def busy(self) -> set[Hashable]:
        """The keys some work holds or waits for now."""
        return set(self._locks)


class Turn:
    """One wait for one key of a Turns. A class, not a generator-based context manager:
    it is on every save's path (2 us against 7)."""

    __slots__ = ("_key", "_locks")

    def __init__(self, locks: dict[Hashable, tuple[asyncio.Lock, int]], key: Hashable) -> None:
        self._locks = locks
        self._key = key

    async def __aenter__(self) -> None:
        locks, key = self._locks, self._key
        lock, users = locks.get(key) or (asyncio.Lock(), 0)
        locks[key] = (lock, users + 1)
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
        self._locks[self._key][0].release()
        self._leave()

    def _leave(self) -> None:
        locks, key = self._locks, self._key
        lock, users = locks[key]
        if users == 1:
            del locks[key]
        else:
            locks[key] = (lock, users - 1)


_SAVES = Turns()


def save_turn(token: str, holder: object) -> Turn:
    """`async with save_turn(token, holder)`: waits until no other save of `holder` to
    the store `token` names is running."""
    return _SAVES((token, id(holder)))
