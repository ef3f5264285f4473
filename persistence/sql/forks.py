"""A storage carried into a forked child: refused there, and never closed from there.

A child of `fork()` gets copies of the parent's objects but not its threads, and its
sockets and its event loop's epoll set are the parent's own. Found by attack:

- SQLite: the connection's thread does not exist in the child, so every call waited
  for good, and `close()` and units of work could not even be cancelled.
- PostgreSQL: a child on the parent's event loop object sent its statements on the
  parent's connections (the parent then failed, or read None for a stored session).
  A child that let go of the storage made asyncpg terminate the connections: it sent
  PostgreSQL's Terminate message on the parent's socket and took that socket out of the
  parent's epoll set, so the parent's next call waited for good.

So a storage records the process that opened it (`Opener`); in any other process every
call raises and `close()` only marks it closed. Its asyncpg connections are
`ProcessBoundConnection`s (bound_connections.py), which neither `terminate()` nor the
garbage collector closes outside the process that opened them. The process id is asked
each time, not learnt from `os.register_at_fork`, whose hooks a fork made in C (uWSGI's
workers by default) skips.
"""

from __future__ import annotations

import os

from persistence.errors import PersistenceError
from persistence.identifiers import forget_inherited_ids


class Opener:
    """The process that opened a storage."""

    __slots__ = ("pid",)

    def __init__(self) -> None:
        self.pid = os.getpid()
        forget_inherited_ids()

    def here(self) -> bool:
        return self.pid == os.getpid()

    def refusal(self, backend: str, where: str) -> PersistenceError:
        """The error for a call made in another process than the opener (a fork's
        child), naming both."""
        return PersistenceError(
            f"{backend} storage {where} was opened in process {self.pid} and is used in"
            f" process {os.getpid()}, a fork of it: its connections belong to that process;"
            " open a new storage in this one (this one is left to the parent)"
        )
