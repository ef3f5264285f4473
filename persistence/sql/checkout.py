"""Lends a PostgreSQL storage's asyncpg connections from SQLAlchemy's pool, cheaply.

`engine.connect()`, `get_raw_connection()` and the close cost one greenlet hop each:
130 us for every call, more than reading a page of sessions. The pool's own checkout
and checkin in one hop each cost about 35 us. Errors of the checkout are wrapped as
SQLAlchemy wraps them, so the backend's translator sees the same exceptions.

A connection the server ended while it sat idle (a restart, a failover,
`pg_terminate_backend`, an idle timeout) fails no call, and no round trip per
checkout proves it alive (SQLAlchemy's `pool_pre_ping` costs three on asyncpg):

- at checkout, one the driver knows closed, or whose socket holds what the server
  sent unasked (its end, or the FATAL error before it), is dropped for another;
- a checkout's first call that finds its connection closed is sent again, once, on a
  fresh connection (Lent.first), where that call cannot have committed anything: a
  BEGIN, or a statement of a read. A later call, a COMMIT, or a write sent without
  BEGIN may have landed before the connection went: those fail as before, and the
  write model's checks make the next save safe (README "Several writers").
"""

from __future__ import annotations

import select
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import Pool
from sqlalchemy.util import greenlet_spawn

from persistence.sql.errors import connection_unusable

T = TypeVar("T")


class Lent:
    """A driver connection lent for one operation or unit of work.

    `driver` is the connection to use: `first` may replace it.
    """

    __slots__ = ("_fresh", "_replace", "driver")

    def __init__(
        self, driver: Any, replace: Callable[[Any, BaseException], Awaitable[Any]]
    ) -> None:
        self.driver = driver
        # Drops a connection the server ended (given with the error), returns a fresh one.
        self._replace = replace
        self._fresh = True

    async def first(self, call: Callable[[Any], Awaitable[T]]) -> T:
        """Runs `call(driver)`, the first call of the checkout; if the connection turns
        out closed, once more on a fresh one.

        Only for a call that commits nothing whether or not the server ran it: a BEGIN,
        or a statement of a read.
        """
        if not self._fresh:
            return await call(self.driver)
        self._fresh = False
        try:
            return await call(self.driver)
        except Exception as exc:
            if not closed(self.driver):
                raise
            # None until replaced: the ended one is dropped, never given back.
            ended, self.driver = self.driver, None
            self.driver = await self._replace(ended, exc)
        return await call(self.driver)

    @asynccontextmanager
    async def transaction(self, **options: Any) -> AsyncIterator[None]:
        """asyncpg's transaction (its options) on the lent connection, begun by `first`."""
        transaction = await self.first(lambda driver: begin(driver, **options))
        try:
            yield
        except BaseException:
            # On a closed connection the transaction is gone with it, and the error
            # that closed it is the one to tell.
            if not closed(self.driver):
                await transaction.rollback()
            raise
        await transaction.commit()


async def begin(driver: Any, **options: Any) -> Any:
    """Begins and returns asyncpg's transaction, to end by its `commit` or `rollback`."""
    transaction = driver.transaction(**options)
    await transaction.start()
    return transaction


def closed(driver: Any) -> bool:
    """Whether an asyncpg connection is closed, or its server ended it (known_closed);
    False for another driver's."""
    is_closed = getattr(driver, "is_closed", None)  # asyncpg's only
    return is_closed is not None and bool(is_closed())


def known_closed(driver: Any) -> bool:
    """Whether an idle asyncpg connection is closed or its server has spoken since its
    last call, without a round trip.

    Nothing is due on a connection at rest, so bytes waiting on its socket are the
    server's end of it: the FATAL error that asyncpg reads only at the next call,
    where the event loop has not polled the socket since (a busy loop, a call right
    after the end). Found by attack: each such connection failed one call.
    """
    if closed(driver):
        return True
    transport = getattr(driver, "_transport", None)  # asyncpg's; no public accessor
    sock = None if transport is None else transport.get_extra_info("socket")
    if sock is None:
        return False
    # poll, not select: select refuses descriptors past FD_SETSIZE.
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    return bool(poller.poll(0))


@asynccontextmanager
async def driver_connection(engine: AsyncEngine) -> AsyncIterator[Any]:
    """Lends a pooled driver connection, as lent_connection does, never replaced."""
    async with lent_connection(engine) as lent:
        yield lent.driver


@asynccontextmanager
async def lent_connection(engine: AsyncEngine) -> AsyncIterator[Lent]:
    """Lends a pooled driver connection; one that was cut off or cancelled is dropped."""
    pool = engine.sync_engine.pool
    pooled = await _live_connection(engine, pool)

    async def replace(_ended: Any, exc: BaseException) -> Any:
        nonlocal pooled
        ended, pooled = pooled, None
        # The server ended it, and likely its siblings in the pool (a restart, a
        # failover): the pool replaces every connection older than now at its next
        # checkout, as SQLAlchemy does on a disconnect ("Dealing with Disconnects").
        await greenlet_spawn(_drop_every_older, pool, ended, exc)
        pooled = await _live_connection(engine, pool)
        return pooled.driver_connection

    lent = Lent(pooled.driver_connection, replace)
    try:
        yield lent
    except BaseException as exc:
        if pooled is not None and connection_unusable(exc):
            # Cancelled mid-query or cut off: never lend this connection again.
            if closed(pooled.driver_connection):
                await greenlet_spawn(_drop_every_older, pool, pooled, exc)
            else:
                await greenlet_spawn(pooled.invalidate)
        raise
    finally:
        if pooled is not None:
            if engine.sync_engine.pool is not pool and pooled.is_valid:
                # The storage closed meanwhile (its engine disposed of this pool): given
                # back, the connection would never be closed. Found by attack: a unit of
                # work running through close() kept a thread and its descriptors (SQLite)
                # or a server connection (PostgreSQL) for the process's life.
                await greenlet_spawn(pooled.invalidate)
            if pooled.is_valid and _checkin_closes(pool):
                # Checkin would close the connection (overflow) politely, with no time
                # limit, and SQLAlchemy's pool logged a cancel arriving there at ERROR
                # ("Exception closing connection", found by attack). Invalidated, it is
                # closed as a dropped one is: politely within 2 s, else at once, and a
                # cancel cuts that short quietly (found by attack: waiting for the polite
                # close, a cancel hung for good on a server that stopped answering).
                await greenlet_spawn(_drop, pooled)
            else:
                await greenlet_spawn(pooled.close)


async def _live_connection(engine: AsyncEngine, pool: Pool) -> Any:
    """A pooled connection not already known to be closed (known_closed).

    Such a one is dropped for another, at no round trip. Found by attack: after a
    restart, a failover or an idle timeout, each of them failed one call as "database
    unreachable".
    """
    dbapi_error = engine.dialect.loaded_dbapi.Error
    pooled = await _connect(pool, dbapi_error)
    if not known_closed(pooled.driver_connection):
        return pooled
    # Past as many as the pool holds, the next is a new connection.
    for _ in range(_pool_size(pool)):
        await greenlet_spawn(_drop, pooled)
        pooled = await _connect(pool, dbapi_error)
        if not known_closed(pooled.driver_connection):
            break
    return pooled


async def _connect(pool: Pool, dbapi_error: type[Exception]) -> Any:
    try:
        return await greenlet_spawn(pool.connect)
    except dbapi_error as exc:
        raise DBAPIError.instance(None, None, exc, dbapi_error) from exc


def _checkin_closes(pool: Pool) -> bool:
    """Whether a connection given back now is closed: the pool holds as many idle ones
    as it keeps (QueuePool), or keeps none."""
    checked_in, size = getattr(pool, "checkedin", None), getattr(pool, "size", None)
    if not callable(checked_in) or not callable(size):
        return True
    return int(checked_in()) >= int(size())


def _pool_size(pool: Pool) -> int:
    size = getattr(pool, "size", None)
    return int(size()) if callable(size) else 1


def _drop(pooled: Any) -> None:
    pooled.invalidate()
    pooled.close()


def _drop_every_older(pool: Pool, pooled: Any, exc: BaseException) -> None:
    """Drops `pooled`, and has the pool replace every connection made before now."""
    pool._invalidate(pooled, exc)
    pooled.close()
