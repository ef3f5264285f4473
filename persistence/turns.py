"""Saves of one object to one store take turns, whichever storage object sends them.

Each save plans from the base the previous one left (persistence.bookkeeping). Storages
opened on one store share its token (SessionStorage.token), so the turns are kept per
token and object, not per storage object.
"""

from __future__ import annotations

import asyncio
from types import TracebackType

# (token, id of the object) -> its lock and how many saves hold or wait for it.
_TURNS: dict[tuple[str, int], tuple[asyncio.Lock, int]] = {}


class SaveTurn:
    """`async with SaveTurn(token, holder)`: waits until no other save of `holder` to the
    store `token` names is running. A class, not a generator-based context manager: it
    is on every save's path (2 us against 7)."""

    __slots__ = ("_key",)

    def __init__(self, token: str, holder: object) -> None:
        self._key = (token, id(holder))

    async def __aenter__(self) -> None:
        key = self._key
        lock, users = _TURNS.get(key) or (asyncio.Lock(), 0)
        _TURNS[key] = (lock, users + 1)
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
        _TURNS[self._key][0].release()
        self._leave()

    def _leave(self) -> None:
        key = self._key
        lock, users = _TURNS[key]
        if users == 1:
            del _TURNS[key]
        else:
            _TURNS[key] = (lock, users - 1)
