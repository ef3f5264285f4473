"""Reading every session of a PostgreSQL store in one state of it, as pg_dump does.

Found by attack: `iter_sessions` read each batch in a transaction of its own, so a unit
of work that committed between two batches (a session moved from one id to another)
showed in one batch and not the other, and `migrate`, `backup` and `export-all` copied
both sessions, or neither. Every batch is now read in one read-only REPEATABLE READ
transaction, on a connection the iteration opens for itself:

- outside the storage's pool, which it leaves as it was: found by attack, a pooled
  connection held by each open iteration left the caller's own calls between two
  batches waiting for the pool (two iterations on a pool of two, each saving);
- the storage's `close()` ends the connections of iterations under way, and a resumed
  one then says the storage is closed;
- an iteration closed early (a `break`, an error of its caller) rolls back quietly,
  whatever became of its connection, which is closed;
- a connection the server ended between two batches (its
  `idle_in_transaction_session_timeout`, a restart) fails the next batch with a
  StorageConnectionError that says so: that state cannot be read again elsewhere.

Its costs are pg_dump's: the transaction holds back VACUUM while it lasts, and its
tables' ACCESS SHARE locks make an ALTER TABLE (a schema upgrade) wait, and every call
queued behind that, until the iteration ends. And each iteration under way is one
connection more than the pool's: where the server has no slot left for it, the caller
reads the batches apart (NoConnectionOfItsOwn).

Left, found by attack: close() does not cut short an iteration's connect (it ends once
the connect does, up to connect_timeout, saying the storage is closed), and an
iteration resumed from another event loop says so, but its connection is closed there,
which SQLAlchemy and asyncio log.
"""

from __future__ import annotations

import os
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing, suppress
from typing import Any, TypeVar

from sqlalchemy import Dialect
from sqlalchemy.ext.asyncio import AsyncEngine

from persistence.errors import StorageConnectionError
from persistence.sql.checkout import begin, closed, lent_connection
from persistence.sql.errors import ReadApart, connection_lost
from persistence.sql.runner import ReadAfter, run_on_asyncpg

T = TypeVar("T")


class OneStateReads:
    """The one-state iterations of a storage, on connections of their own."""

    def __init__(self, make_engine: Callable[[], AsyncEngine]) -> None:
        # An engine without a pool, with the storage's settings, made on first use.
        self._make_engine = make_engine
        self._engine: AsyncEngine | None = None
        self._under_way: set[Any] = set()  # the driver connections of open iterations

    async def batches(
        self, dialect: Dialect, read: ReadAfter[T], check: Callable[[], None]
    ) -> AsyncGenerator[list[T], None]:
        """Yields every batch `read` returns, after "" and then each batch's last key,
        until one is empty; `check` runs before each (the storage open, in its loop).

        Raises:
            NoConnectionOfItsOwn: before any batch, if the server refused the
                iteration's connection for want of a free slot.
        """
        check()
        if self._engine is None:
            self._engine = self._make_engine()
        connected = False
        try:
            async with lent_connection(self._engine) as lent:
                transaction = await lent.first(
                    lambda driver: begin(driver, isolation="repeatable_read", readonly=True)
                )
                connected = True
                reads = self._read_all(lent.driver, transaction, dialect, read, check)
                async with aclosing(reads) as batches:
                    async for batch in batches:
                        yield batch
        except Exception as exc:
            # Closed meanwhile, it says so. Found by attack: a close() during a batch
            # was reported as the server's end, one during the connect as unreachable.
            check()
            refusal = None if connected else _no_free_slot(exc)
            if refusal is not None:
                raise NoConnectionOfItsOwn(
                    "the server has no free connection slot for one of the iteration's own"
                    f" ({refusal})"
                ) from exc
            raise

    async def _read_all(
        self,
        driver: Any,
        transaction: Any,
        dialect: Dialect,
        read: ReadAfter[T],
        check: Callable[[], None],
    ) -> AsyncGenerator[list[T], None]:
        self._under_way.add(driver)
        opened_in = os.getpid()
        try:
            after = ""
            while True:
                check()
                try:
                    keys, batch = await run_on_asyncpg(driver, dialect, read(after))
                except Exception as exc:
                    if after and connection_lost(exc):
                        raise _ended_after(after) from exc
                    raise
                if not keys:
                    return
                yield batch
                after = keys[-1]
        finally:
            self._under_way.discard(driver)
            # Not in a fork's child: its ROLLBACK would go down the parent's socket.
            if not closed(driver) and os.getpid() == opened_in:
                # Read-only: nothing to keep, and the connection is closed after.
                with suppress(Exception):
                    await transaction.rollback()

    async def close(self) -> None:
        """Ends the connections of iterations under way, and the engine."""
        for driver in list(self._under_way):
            driver.terminate()
        engine, self._engine = self._engine, None
        if engine is not None:
            await engine.dispose()

    def let_go(self) -> None:
        """Drops everything without a word to the server (another loop's, a fork's)."""
        self._under_way.clear()
        engine, self._engine = self._engine, None
        if engine is not None:
            engine.sync_engine.dispose(close=False)


class NoConnectionOfItsOwn(StorageConnectionError, ReadApart):
    """The server had no free slot for an iteration's own connection."""


def _no_free_slot(exc: BaseException) -> BaseException | None:
    """The server's refusal of a connection for want of a free slot (SQLSTATE 53300: too
    many connections, or the slots left are reserved) behind `exc`, or None."""
    seen: set[int] = set()
    found: BaseException | None = exc
    while found is not None and id(found) not in seen:
        seen.add(id(found))
        if getattr(found, "sqlstate", None) == _TOO_MANY_CONNECTIONS:
            return found
        found = getattr(found, "orig", None) or found.__cause__ or found.__context__
    return None


_TOO_MANY_CONNECTIONS = "53300"


def _ended_after(after: str) -> StorageConnectionError:
    return StorageConnectionError(
        f"iterate sessions: the server ended this iteration's connection, and with it the"
        f" one state its batches are read in, after session {after!r} (a pause between two"
        " batches longer than the server's idle_in_transaction_session_timeout, or the"
        " server restarted); iterate again"
    )
