"""A SQLite storage's engines of units of work, one per event loop it is used from.

A SQLite storage works from any event loop: its own connection answers each call on
the loop that made it. The engine of units of work does not: its pool's queue of
connections belongs to the loop that first waited on it. Found by attack: once units
of work had queued for a connection in one `asyncio.run`, each that queued in the next
failed with a raw RuntimeError ("bound to a different event loop").

So each loop other than the one that opened the storage gets an engine of its own,
kept while the loop runs (two loops in two threads at once keep theirs). When a new
loop comes, the engines of loops that are not running are disposed of: closed, or
dropped without closing (found by attack: each such loop kept its pool's threads
and descriptors, and itself, for the storage's life; its engine refers to it, so it
is never collected), or only between two runs (it gets a new engine if it runs
again). They are disposed of in a thread of their own, in its own loop
(aiosqlite's connection threads close from any loop): found by attack, a disposal run
as a task of the new loop was cancelled when that loop ended at once, and SQLAlchemy
logged each connection it was closing at ERROR. `close()` waits for those threads.
Found by attack on the first version, which made a new engine at each change of loop:
two threads' loops made one for nearly every unit of work, two of them at once left
one orphaned. The lookup takes the lock (found by review: unlocked, a loop starting
again could get the engine another thread was retiring as not running).
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
        self._disposers: list[threading.Thread] = []

    def of(self, loop: asyncio.AbstractEventLoop) -> AsyncEngine:
        """The engine of `loop`, made on its first use there."""
        with self._lock:
            engine = self._engines.get(loop)
            if engine is not None:
                return engine
            engine = self._engines[loop] = self._make()
            retired = [
                self._engines.pop(other) for other in list(self._engines) if not other.is_running()
            ]
            if retired:
                disposer = threading.Thread(
                    target=asyncio.run,
                    args=(_dispose_all(retired),),
                    name="persistence-sqlite-engine-disposal",
                    daemon=True,
                )
                disposer.start()
                self._disposers = [*(t for t in self._disposers if t.is_alive()), disposer]
        return engine

    async def close(self) -> None:
        """Disposes of every engine made, from the loop of the call, once the disposals
        under way have ended."""
        with self._lock:
            engines = list(self._engines.values())
            self._engines.clear()
            disposers, self._disposers = self._disposers, []
        await _dispose_all(engines)
        for disposer in disposers:
            await asyncio.to_thread(disposer.join)


async def _dispose_all(engines: list[AsyncEngine]) -> None:
    await asyncio.gather(*(_dispose(engine) for engine in engines))


async def _dispose(engine: AsyncEngine) -> None:
    """Closes the pooled connections of an engine no longer used."""
    try:
        await engine.dispose()
    except Exception:  # its connections then go with the garbage
        logger.warning("closing the connections of a SQLite engine failed", exc_info=True)
