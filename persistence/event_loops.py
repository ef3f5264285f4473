"""The event loop a storage's connections belong to.

asyncpg's connections and PyMongo's client (4.12+) work only in the loop that made
them or first used them; a SQLite storage's own connection answers any loop. Both
backends bound to a loop refuse calls from another one with the same error.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from contextlib import suppress
from typing import Any, TypeVar

from persistence.errors import PersistenceError

T = TypeVar("T")


def running_loop() -> asyncio.AbstractEventLoop | None:
    """The running event loop, or None outside any (a tool looking at the storage)."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def refuse_another_loop(
    bound: asyncio.AbstractEventLoop | None, storage: Callable[[], str], held: str
) -> None:
    """Raises unless this call runs in `bound` (or outside any loop, or `bound` is None).

    `storage()` names the storage, called only to refuse: every call of a storage
    passes here, and naming a URL (masking its password) took about 10 us of a
    PostgreSQL listing's 700.

    Raises:
        PersistenceError: naming the storage and what of it (`held`) belongs to that loop.
    """
    loop = running_loop()
    if loop is not None and bound is not None and loop is not bound:
        raise PersistenceError(
            f"{storage()} was opened in another event loop: {held} to that loop; open a new"
            " storage in this one (or use one event loop for the storage's life)"
        )


async def to_the_end(work: Coroutine[Any, Any, T]) -> T:
    """Awaits `work` run as a task of its own; a cancel of the caller lets it end first
    (through any further cancels), then is raised.

    For work whose own cleanup a cancel would cut short: found by attack, a SQLite
    `initialize()` cancelled mid-migration left its connection, cancelled while it
    closed, holding the file's write lock past `close()` until garbage collection.
    """
    task = asyncio.ensure_future(work)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        while not task.done():
            with suppress(asyncio.CancelledError):
                await asyncio.wait([task])
        if not task.cancelled():
            task.exception()  # retrieved: the cancel is what the caller asked for
        raise


async def in_thread_to_the_end(fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """`fn(*args, **kwargs)` in a thread (`asyncio.to_thread`), which a cancel cannot
    stop: the cancel waits for it (`to_the_end`), so nothing it does comes after."""
    return await to_the_end(asyncio.to_thread(fn, *args, **kwargs))
