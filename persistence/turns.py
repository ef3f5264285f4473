"""Saves of one object to one store take turns, whichever storage object sends them.

Each save plans from the base the previous one left (persistence.bookkeeping). Storages
opened on one store share its token (SessionStorage.token), so the turns are kept per
token and object, not per storage object.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

# (token, id of the object) -> its lock and how many saves hold or wait for it.
_TURNS: dict[tuple[str, int], tuple[asyncio.Lock, int]] = {}


@asynccontextmanager
async def save_turn(token: str, holder: object) -> AsyncIterator[None]:
    """Waits until no other save of `holder` to the store `token` names is running."""
    key = (token, id(holder))
    lock, users = _TURNS.get(key) or (asyncio.Lock(), 0)
    _TURNS[key] = (lock, users + 1)
    try:
        async with lock:
            yield
    finally:
        lock, users = _TURNS[key]
        if users == 1:
            del _TURNS[key]
        else:
            _TURNS[key] = (lock, users - 1)
