"""A SQLite storage's engines of units of work, one per event loop it is used from.

A SQLite storage works from any event loop: its own connection answers each call on
the loop that made it. The engine of units of work does not: its pool's queue of
connections belongs to the loop that first waited on it. Found by attack: once units
of work had queued for a connection in one `asyncio.run`, each that queued in the next
failed with a raw RuntimeError ("bound to a different event loop").

So each loop other than the one that opened the storage gets an engine of its own,
kept while the loop runs (two loops in two threads at once keep theirs). When a new
loop comes, the engines of loops that are not running are disposed of in it: closed,
or dropped without closing (found by attack: each such loop kept its pool's threads
and descriptors, and itself, for the storage's life; its engine refers to it, so it
is never collected), or only between two runs (it gets a new engine if it runs
again). Whatever was not disposed of by then (a disposal cancelled when its loop
ended) is disposed of by `close()`: aiosqlite's connection threads close from any
loop. Found by attack on the first version, which made a new engine at each change of
loop: two threads' loops made one for nearly every unit of work, two of them at once
left one orphaned, and a disposal cancelled with its loop left its connections open
after `close()`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable

from sqlalchemy.ext.asyncio import AsyncEngine

logger = logging.getLogger(__name__)


class LoopEngines:
    """The engines of loops other than the opening one (`of`), disposed of by `close`."""

    def __init__(self, make: Callable[[], AsyncEngine]) -> None:
        self._make = make
        self._lock = threading.Lock()  # loops in other threads share the storage
        self._engines: dict[asyncio.AbstractEventLoop, AsyncEngine] = {}
        # Engines of loops not running, until disposed of; those being disposed of.
        self._retired: list[AsyncEngine] = []
        self._disposing: set[AsyncEngine] = set()
        self._disposals: set[asyncio.Task[None]] = set()

    def of(self, loop: asyncio.AbstractEventLoop) -> AsyncEngine:
        """The engine of `loop`, made on its first use there."""
        engine = self._engines.get(loop)
        if engine is not None:
            return engine
        with self._lock:
            engine = self._engines.get(loop)
            if engine is not None:
                return engine
            engine = self._engines[loop] = self._make()
            for other in [other for other in self._engines if not other.is_running()]:
                self._retired.append(self._engines.pop(other))
            due = [old for old in self._retired if old not in self._disposing]
            self._disposing.update(due)
        for old in due:
            disposal = loop.create_task(self._retire(old))
            self._disposals.add(disposal)
            disposal.add_done_callback(self._disposals.discard)
        return engine

    async def _retire(self, engine: AsyncEngine) -> None:
        # Cancelled (its loop ended first), the engine stays retired: the next new loop
        # or close() disposes of it.
        try:
            await _dispose(engine)
        finally:
            with self._lock:
                self._disposing.discard(engine)
        with self._lock:
            while engine in self._retired:
                self._retired.remove(engine)

    async def close(self) -> None:
        """Disposes of every engine made, from the loop of the call."""
        with self._lock:
            engines = {*self._engines.values(), *self._retired}
            self._engines.clear()
            self._retired.clear()
        await asyncio.gather(*(_dispose(engine) for engine in engines))


async def _dispose(engine: AsyncEngine) -> None:
    """Closes the pooled connections of an engine no longer used."""
    try:
        await engine.dispose()
    except Exception:  # its connections then go with the garbage
        logger.warning("closing the connections of a SQLite engine failed", exc_info=True)
