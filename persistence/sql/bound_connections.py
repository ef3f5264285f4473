"""asyncpg connections that a fork's child never closes (persistence.sql.forks).

Given to `asyncpg.connect` as its documented `connection_class`; imported only where
PostgreSQL is used (asyncpg is the `postgresql` extra).
"""

from __future__ import annotations

import os

import asyncpg


class ProcessBoundConnection(asyncpg.Connection):  # type: ignore[misc]  # asyncpg is untyped
    """An asyncpg connection that only the process that opened it ever closes."""

    __slots__ = ("_opened_in",)

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self._opened_in = os.getpid()

    def terminate(self) -> None:
        # Also what asyncpg's __del__ and SQLAlchemy's finaliser of a lost connection call.
        if self._opened_in == os.getpid():
            super().terminate()

    def __del__(self) -> None:
        if self._opened_in == os.getpid():
            super().__del__()
