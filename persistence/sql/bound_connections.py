"""asyncpg connections that a fork's child never closes (persistence.sql.forks), and
whose polite close gives up on a server that does not answer.

Given to `asyncpg.connect` as its documented `connection_class`; imported only where
PostgreSQL is used (asyncpg is the `postgresql` extra).
"""

from __future__ import annotations

import os
from contextlib import suppress

import asyncpg

# How long a polite close waits for the server. Found by attack: on a server that
# stopped answering (a partition, a host gone without a reset), a connection closed
# past the pool's size, and `close()` of the storage itself, never returned.
CLOSE_WAIT = 2.0


class ProcessBoundConnection(asyncpg.Connection):  # type: ignore[misc]  # asyncpg is untyped
    """An asyncpg connection that only the process that opened it ever closes."""

    __slots__ = ("_opened_in",)

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self._opened_in = os.getpid()

    # asyncpg's own signature, `timeout` included.
    async def close(self, *, timeout: float | None = None) -> None:  # noqa: ASYNC109
        """asyncpg's polite close, for CLOSE_WAIT seconds at most (asyncpg's waits without
        end), the socket then closed at once (asyncpg aborts the connection). Nothing in
        a fork's child: found by attack, a child that let go of an iteration the parent
        had begun sent the server a Terminate on the parent's socket (SQLAlchemy closes a
        dropped connection so), and the parent's next batch waited for good."""
        if self._opened_in != os.getpid():
            return
        with suppress(TimeoutError):
            await super().close(timeout=CLOSE_WAIT if timeout is None else timeout)

    def terminate(self) -> None:
        # Also what asyncpg's __del__ and SQLAlchemy's finaliser of a lost connection call.
        if self._opened_in == os.getpid():
            super().terminate()

    def __del__(self) -> None:
        if self._opened_in == os.getpid():
            super().__del__()
