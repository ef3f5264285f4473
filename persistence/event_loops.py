"""The event loop a storage's connections belong to.

asyncpg's connections and PyMongo's client (4.12+) work only in the loop that made
them or first used them; a SQLite storage's own connection answers any loop. Both
backends bound to a loop refuse calls from another one with the same error.
"""

from __future__ import annotations

import asyncio

from persistence.errors import PersistenceError


def running_loop() -> asyncio.AbstractEventLoop | None:
    """The running event loop, or None outside any (a tool looking at the storage)."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def refuse_another_loop(bound: asyncio.AbstractEventLoop | None, storage: str, held: str) -> None:
    """Raises unless this call runs in `bound` (or outside any loop, or `bound` is None).

    Raises:
        PersistenceError: naming `storage` and what of it (`held`) belongs to that loop.
    """
    loop = running_loop()
    if loop is not None and bound is not None and loop is not bound:
        raise PersistenceError(
            f"{storage} was opened in another event loop: {held} to that loop; open a new"
            " storage in this one (or use one event loop for the storage's life)"
        )
