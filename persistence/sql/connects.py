"""asyncpg connects that a cancel of their caller does not cut short.

Found by attack: a cancel during asyncpg's connect (its TLS negotiation, sslmode
`prefer` by default) left a future holding "unexpected connection_lost() call" that
nothing read, which asyncio logged at ERROR as "Future exception was never
retrieved". A server cancelling requests logged one for about every seventh
cancelled read: a connection cancelled mid-query is dropped, and the next checkout
connects.

So a connect runs as a task of its own: the caller's cancel is raised at once, and
the connection the task then makes is closed. Such connects still count against the
pool they were made for (found by attack: callers timing out on a slow server had
9 connections open at once for a pool of 2): a new connect first waits for them to
end. And `settled()` waits for them, so that a storage's `close()` leaves no
connection behind.
"""

from __future__ import annotations

import asyncio
from typing import Any


class Connects:
    """The connects of one pool (SQLAlchemy's `async_creator_fn`, a replica's own)."""

    __slots__ = ("_discarded",)

    def __init__(self) -> None:
        # Connects whose callers were cancelled, each closed once made.
        self._discarded: set[asyncio.Task[Any]] = set()

    async def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """asyncpg's `connect(*args, **kwargs)`, once the discarded ones have ended."""
        import asyncpg

        await self.settled()
        connecting = asyncio.ensure_future(asyncpg.connect(*args, **kwargs))
        try:
            return await asyncio.shield(connecting)
        except asyncio.CancelledError:
            self._discarded.add(connecting)
            connecting.add_done_callback(self._close)
            raise

    async def settled(self) -> None:
        """Returns once every discarded connect has ended, its connection closed."""
        while self._discarded:
            await asyncio.wait(set(self._discarded))

    def _close(self, connecting: asyncio.Task[Any]) -> None:
        self._discarded.discard(connecting)
        if not connecting.cancelled() and connecting.exception() is None:
            connecting.result().terminate()
