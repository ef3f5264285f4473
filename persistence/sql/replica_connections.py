"""A read replica's own small pool of raw asyncpg connections (persistence.sql.standby)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from persistence.sql.checkout import known_closed


class ReplicaConnections:
    """A replica's own small pool of raw asyncpg connections.

    Its own, not SQLAlchemy's: a connection to a replica that hangs must be closed
    without a word to the server, and every idle one dropped when the replica goes
    down, neither of which a pool that closes connections politely can do.
    """

    def __init__(self, connect: Callable[[], Awaitable[Any]], size: int) -> None:
        self._connect = connect
        self._size = size
        self._idle: list[Any] = []
        self._lent: set[Any] = set()
        self._connecting = 0
        self._closed = False

    def full(self) -> bool:
        return len(self._lent) + self._connecting >= self._size

    async def take(self, within: float) -> Any:
        """An idle connection, or a new one within `within` seconds.

        Raises:
            ConnectionError: the pool is closed (none is made for it).
        """
        if self._closed:
            raise ConnectionError("the replica's connections are closed")
        while self._idle:
            connection = self._idle.pop()
            if not known_closed(connection):
                self._lent.add(connection)
                return connection
            connection.terminate()
        self._connecting += 1
        try:
            async with asyncio.timeout(within):
                connection = await self._connect()
        finally:
            self._connecting -= 1
        self._lent.add(connection)
        return connection

    def give_back(self, connection: Any) -> None:
        self._lent.discard(connection)
        # Beyond the size (a check made one while every other was lent out): closed.
        kept = len(self._idle) + len(self._lent) + self._connecting
        if self._closed or connection.is_closed() or kept >= self._size:
            connection.terminate()
        else:
            self._idle.append(connection)

    def drop(self, connection: Any) -> None:
        """Closes the socket at once: nothing is sent, nothing awaited."""
        self._lent.discard(connection)
        connection.terminate()

    def drop_idle(self) -> None:
        idle, self._idle = self._idle, []
        for connection in idle:
            connection.terminate()

    def end_lent(self) -> None:
        """Closes the socket of every connection lent out: each read on one fails at
        once as a lost connection (its holder then drops or gives it back)."""
        for connection in list(self._lent):
            connection.terminate()

    async def close(self, within: float) -> None:
        self._closed = True
        idle, self._idle = self._idle, []

        async def close_one(connection: Any) -> None:
            try:
                await connection.close(timeout=within)
            except (Exception, asyncio.CancelledError):
                connection.terminate()

        await asyncio.gather(*(close_one(connection) for connection in idle))
