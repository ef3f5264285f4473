"""PostgreSQL read replicas: which reads go where, and read-your-writes.

A `ReplicaSet` runs the reads that may be slightly stale (listing, search, counts,
exports) on a hot standby (standby.py: health and lag) and reports a miss whenever
none can serve one, so that the caller reads from the primary instead: no replica
trouble ever reaches the caller.

Read-your-writes: the storage counts its own writes (which costs no round trip). At
the first replica read after new writes it asks the primary for its WAL insert
position, which lies at or after the commit of every write counted so far, and
reads from a replica only once that replica's replay position has passed it.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from sqlalchemy import URL, text
from sqlalchemy.ext.asyncio import AsyncEngine

from persistence.errors import InvalidDataError
from persistence.sql.engines import postgresql_url, replica_connect_args
from persistence.sql.errors import connection_lost
from persistence.sql.runner import Work, run_on_asyncpg
from persistence.sql.standby import (
    Replica,
    ReplicaSettings,
    ReplicaState,
    Unavailable,
    fetch_one,
)
from persistence.sql.statements import Statement
from persistence.sql.uow import SqlUnitOfWork

T = TypeVar("T")

# At or after the end of every commit so far, also of one not yet flushed to disk.
PRIMARY_POSITION = Statement(text("SELECT (pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::bigint"))


class WriteClock:
    """Which WAL position a replica must have replayed to show this storage's writes.

    Writes are counted, not timed: noting one costs nothing. The primary's position
    is asked only when a replica read follows new writes, and one answer covers every
    write counted before it was asked.
    """

    def __init__(self) -> None:
        self._writes = 0
        self._covered = 0
        self._position = 0
        self._lock = asyncio.Lock()

    def note_write(self) -> None:
        self._writes += 1

    def settled(self) -> bool:
        return self._covered >= self._writes

    async def position(self, ask_primary: Callable[[], Awaitable[int]]) -> int:
        """The position that covers every write noted before this call."""
        needed = self._writes
        if self._covered >= needed:
            return self._position
        async with self._lock:
            if self._covered >= needed:
                return self._position
            asked = self._writes
            position = await ask_primary()
            self._position = max(self._position, position)
            self._covered = max(self._covered, asked)
        return self._position


class ReplicaSet:
    """The read replicas of one storage, used in turn."""

    def __init__(self, urls: Sequence[URL], settings: ReplicaSettings) -> None:
        self.urls = tuple(urls)
        self.settings = settings
        self.clock = WriteClock()
        self._replicas: list[Replica] = []
        self._primary: AsyncEngine | None = None
        self._next = 0

    @property
    def displayed(self) -> list[str]:
        return [url.render_as_string(hide_password=True) for url in self.urls]

    def states(self) -> list[ReplicaState]:
        return [replica.state() for replica in self._replicas]

    async def start(self, primary: AsyncEngine, statement_timeout: float | None) -> None:
        """Binds the replicas to the primary (just migrated) and checks each of them once."""
        self.clock.note_write()
        if self._primary is None:
            self._primary = primary
            dialect = primary.dialect
            self._replicas = [
                Replica(
                    url,
                    replica_connect_args(
                        url,
                        dialect,
                        statement_timeout=statement_timeout,
                        connect_timeout=self.settings.timeout,
                    ),
                    dialect,
                    self.settings,
                )
                for url in self.urls
            ]
        await asyncio.gather(*(replica.check() for replica in self._replicas))

    def note_write(self) -> None:
        self.clock.note_write()

    def unit_of_work(self, engine: AsyncEngine, token: str) -> SqlUnitOfWork:
        return _NotedUnitOfWork(engine, token, self.clock.note_write)

    async def _primary_position(self) -> int:
        assert self._primary is not None
        async with self._primary.connect() as pooled:
            driver = (await pooled.get_raw_connection()).driver_connection
            assert driver is not None
            try:
                (position,) = await run_on_asyncpg(
                    driver, self._primary.dialect, fetch_one(PRIMARY_POSITION)
                )
            except BaseException as exc:
                if connection_lost(exc) or not isinstance(exc, Exception):
                    await pooled.invalidate()
                raise
        return int(position)

    def _in_turn(self) -> list[Replica]:
        count = len(self._replicas)
        start, self._next = self._next, (self._next + 1) % max(count, 1)
        return [self._replicas[(start + i) % count] for i in range(count)]

    async def read(self, make_work: Callable[[], Work[T]], snapshot: bool) -> tuple[T] | None:
        """Runs the work on a replica that is up, current enough and has this storage's
        writes; None when there is none (read from the primary then).

        Raises:
            Whatever the primary raises when asked for its WAL position.
        """
        in_turn = self._in_turn()
        for replica in in_turn:
            replica.refresh_if_old()
        candidates = [replica for replica in in_turn if replica.serves()]
        if not candidates:
            return None
        checked: set[int] = set()
        if self.clock.settled():
            position = await self.clock.position(self._primary_position)
        else:
            # New writes: ask the primary for its position and the first replica for
            # its own at once, so that the two questions cost one round trip's wait.
            checking = asyncio.ensure_future(candidates[0].check())
            checked.add(id(candidates[0]))
            try:
                position = await self.clock.position(self._primary_position)
            except BaseException:
                checking.cancel()
                await asyncio.wait({checking})
                raise
            await checking
        for replica in candidates:
            if not replica.caught_up_with(position) and id(replica) not in checked:
                await replica.check()
            if not (replica.serves() and replica.caught_up_with(position)):
                continue
            try:
                return (await replica.run(make_work(), snapshot),)
            except Unavailable:
                continue
        return None

    async def close(self) -> None:
        replicas, self._replicas = self._replicas, []
        await asyncio.gather(*(replica.close() for replica in replicas))


class _NotedUnitOfWork(SqlUnitOfWork):
    """A unit of work whose commit counts as a write of its storage."""

    def __init__(self, engine: AsyncEngine, token: str, note: Callable[[], None]) -> None:
        super().__init__(engine, token)
        self._note = note

    async def commit(self) -> None:
        try:
            await super().commit()
        finally:
            self._note()


def replica_set(urls: Sequence[str], settings: ReplicaSettings) -> ReplicaSet | None:
    """The replicas at `urls`, or None without any.

    Raises:
        InvalidDataError: for a URL that is not PostgreSQL's or a setting out of range.
    """
    if isinstance(urls, str):
        raise InvalidDataError("read_replicas: a list of URLs, not one string")
    if not urls:
        return None
    for name, value in (
        ("replica_timeout", settings.timeout),
        ("max_replica_lag", settings.max_lag),
        ("replica_retry_interval", settings.retry_interval),
    ):
        if not 0 < value < math.inf:
            raise InvalidDataError(f"{name}: must be a number of seconds > 0, got {value!r}")
    parsed = []
    for index, url in enumerate(urls):
        try:
            parsed.append(postgresql_url(url))
        except InvalidDataError as exc:
            problem = str(exc).removeprefix("connection_string: ")
            raise InvalidDataError(f"read_replicas[{index}]: {problem}") from None
    return ReplicaSet(parsed, settings)
