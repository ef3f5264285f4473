"""PostgreSQL read replicas: which reads go where, and read-your-writes.

A `ReplicaSet` runs the reads that may be slightly stale (listing, search, counts,
exports) on a hot standby (standby.py: health and lag) and reports a miss whenever
none can serve one, so that the caller reads from the primary instead: no replica
trouble ever reaches the caller.

Read-your-writes: the storage counts its own writes (which costs no round trip).
A replica read after new writes goes to the primary, and starts, in the background,
one question to the primary for its WAL insert position, which lies at or after the
commit of every write counted so far, and one to each replica for its replay
position; reads go to a replica again once its replay position has passed it.
No read ever waits for these questions.

Identity: a replica serves reads only through connections that showed it to be a
copy of the primary's database (the same system identifier, the same database oid;
see standby.py); the primary's is the one its storage learnt when it opened.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from sqlalchemy import URL, text
from sqlalchemy.ext.asyncio import AsyncEngine

from persistence.errors import InvalidDataError
from persistence.sql.engines import postgresql_url, replica_connect_args
from persistence.sql.errors import connection_unusable
from persistence.sql.identity import Identity
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
from persistence.urls import mask_url

T = TypeVar("T")
logger = logging.getLogger(__name__)

# At or after the end of every commit so far, also of one not yet flushed to disk.
# Where the WAL ends on a page boundary, the insert position stands past the next
# page's header (24 bytes; 40 on a segment's first page), which a standby that has
# replayed everything never reports: it replays to the boundary. Found by attack: a
# storage whose last write ended on one read from the primary until someone wrote.
PRIMARY_POSITION_SQL = """
SELECT p - CASE WHEN p % pg_size_bytes(current_setting('wal_segment_size')) = 40 THEN 40
                WHEN p % current_setting('wal_block_size')::bigint = 24 THEN 24
                ELSE 0 END
FROM (SELECT (pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::bigint AS p) AS wal
"""
PRIMARY_POSITION = Statement(text(PRIMARY_POSITION_SQL))


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

    @property
    def known_position(self) -> int:
        """The position that covers every write counted when it was last asked."""
        return self._position

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

    def __init__(
        self, urls: Sequence[URL], settings: ReplicaSettings, shown: Sequence[str]
    ) -> None:
        self.urls = tuple(urls)
        # The URLs as given, passwords masked (see postgresql_storage's `_shown`).
        self.displayed = list(shown)
        self.settings = settings
        self.clock = WriteClock()
        self._replicas: list[Replica] = []
        self._primary: AsyncEngine | None = None
        self._settling: asyncio.Task[None] | None = None
        self._next = 0
        self._closed = False

    def states(self) -> list[ReplicaState]:
        position = self.clock.known_position if self.clock.settled() else None
        return [replica.state(position) for replica in self._replicas]

    async def start(
        self, primary: AsyncEngine, statement_timeout: float | None, expected: Identity
    ) -> None:
        """Binds the replicas to the primary (just migrated), whose database every replica
        must show it copies (`expected`), and checks each of them once."""
        self.clock.note_write()
        if self._primary is None:
            self._primary = primary
            dialect = primary.dialect
            self._replicas = [
                Replica(
                    shown,
                    replica_connect_args(
                        url,
                        dialect,
                        statement_timeout=statement_timeout,
                        connect_timeout=self.settings.timeout,
                    ),
                    dialect,
                    self.settings,
                    expected,
                )
                for url, shown in zip(self.urls, self.displayed, strict=True)
            ]
        await asyncio.gather(*(replica.check() for replica in self._replicas))

    def note_write(self) -> None:
        self.clock.note_write()

    def unit_of_work(
        self, engine: AsyncEngine, token: str, refuse_closed: Callable[[], None]
    ) -> SqlUnitOfWork:
        return _NotedUnitOfWork(engine, token, refuse_closed, self.clock.note_write)

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
                if connection_unusable(exc):
                    await pooled.invalidate()
                raise
        return int(position)

    def _in_turn(self) -> list[Replica]:
        count = len(self._replicas)
        start, self._next = self._next, (self._next + 1) % max(count, 1)
        return [self._replicas[(start + i) % count] for i in range(count)]

    async def read(self, make_work: Callable[[], Work[T]], snapshot: bool) -> tuple[T] | None:
        """Runs the work on a replica that is up, current enough and holds this storage's
        writes; None when there is none (the caller reads from the primary then).

        Never waits for a check: what it needs to know and does not (the primary's
        position after new writes, a replica's progress) is asked in the background,
        and the read goes to the primary meanwhile.
        """
        in_turn = self._in_turn()
        for replica in in_turn:
            replica.refresh_if_old()
        candidates = [replica for replica in in_turn if replica.serves()]
        if not candidates:
            return None
        if not self.clock.settled():
            self._settle()
            return None
        position = self.clock.known_position
        for replica in candidates:
            if self._closed:
                return None  # closed while one was tried: none is tried after
            if not replica.caught_up_with(position):
                replica.check_soon()
                continue
            try:
                return (await replica.run(make_work(), snapshot, position),)
            except Unavailable:
                continue
        return None

    def _settle(self) -> None:
        """Asks, in the background, where the primary stands and how far each replica is."""
        if self._closed:
            return
        if self._settling is None or self._settling.done():
            self._settling = asyncio.get_running_loop().create_task(self._settle_now())

    async def _settle_now(self) -> None:
        try:
            position = await self.clock.position(self._primary_position)
        except Exception as exc:
            # The primary's own failures reach callers through their reads.
            logger.debug("read replicas: the primary's WAL position is unknown (%r)", exc)
            return
        behind = [r for r in self._replicas if r.usable() and not r.caught_up_with(position)]
        await asyncio.gather(*(replica.check() for replica in behind))

    def let_go(self) -> None:
        """close() from another event loop than the one that opened the storage: the
        replicas' connections and tasks belong to that loop, so they are only dropped
        (they go with their loop), and none starts afterwards. Found by attack: they
        stayed, and replica_states() reported the replicas up, after such a close()."""
        self._closed = True
        self._settling = None
        self._replicas = []

    async def close(self) -> None:
        """Stops every background task; none starts afterwards (a read still running
        reads from the primary, or fails as the primary's reads do once closed)."""
        self._closed = True
        settling, self._settling = self._settling, None
        if settling is not None and not settling.done():
            settling.cancel()
            await asyncio.wait({settling})
        replicas, self._replicas = self._replicas, []
        await asyncio.gather(*(replica.close() for replica in replicas))


class _NotedUnitOfWork(SqlUnitOfWork):
    """A unit of work whose commit counts as a write of its storage."""

    def __init__(
        self,
        engine: AsyncEngine,
        token: str,
        refuse_closed: Callable[[], None],
        note: Callable[[], None],
    ) -> None:
        super().__init__(engine, token, refuse_closed)
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
    return ReplicaSet(parsed, settings, [mask_url(url) for url in urls])
