"""One PostgreSQL hot standby used for reads: its connections, health and lag.

- Lag: the standby reports how far behind it is at most every `check_interval`
  seconds (checked in the background, when reads come); one beyond `max_lag` serves
  no reads until it catches up, nor does one whose last report, grown by the time
  since, could be beyond it (after an idle spell: its first read goes to the primary).
- Progress: how far it has replayed, as its last report says (a new connection asks
  again: a standby restarted after a crash can reopen behind where it was).
- Health: a standby that refuses, cannot be reached or hangs (a partition, a frozen
  server) is marked down and serves no reads; a background task checks it again
  every `retry_interval` seconds. Connecting gives up after `timeout` seconds. A
  query that runs longer than `timeout` makes the standby prove it is alive on
  another connection: one proof at a time, which every read that runs past the
  timeout meanwhile awaits, and reads that start meanwhile go to the primary. If it
  cannot, or a connection to it times out, every connection lent out is dropped (its
  socket closed: the server is never asked to cancel), and the reads on them go
  elsewhere at once.
- Identity: every connection made to a standby is first asked which cluster (the
  system identifier) and which database (its oid, which physical replication keeps)
  it serves; one that is not a copy of the primary's database (another database on
  the same standby, a standby of another cluster, a server that will not tell) is
  closed, the replica serves no reads and is asked again every `retry_interval`
  seconds (its URL may come to name the right server). Connections are pooled, so
  this costs one query per new connection, never one per read.
- Each change of state is logged once, the URL's password masked (also in
  `?password=`).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import math
import socket
import ssl
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import Dialect, text

from persistence.sql.checkout import Lent
from persistence.sql.connects import Connects
from persistence.sql.errors import connection_lost
from persistence.sql.identity import Identity, NotThisDatabase, identity_of
from persistence.sql.replica_connections import ReplicaConnections
from persistence.sql.runner import Fetch, Work, read_on_asyncpg, run_on_asyncpg
from persistence.sql.statements import Statement
from persistence.urls import mask_secrets

T = TypeVar("T")
logger = logging.getLogger("persistence.sql.replicas")

# A standby whose WAL receiver runs is current if it has replayed all it received, or
# all the primary last said it has (`latest_end_lsn`, shown to superusers and
# pg_read_all_stats): after a restart it receives again from the start of a segment,
# below what it replayed (found by attack: with the primary quiet it counted as behind
# by the age of the last transaction, and served nothing until the primary wrote; and
# taking received < replayed for current passed a standby far behind for current).
# Otherwise its lag is the age of the last transaction it replayed (NULL: unknown).
# Positions are byte offsets in the WAL (pg_lsn as a number).
STATUS = Statement(
    text(
        """
SELECT pg_is_in_recovery(),
       (pg_last_wal_replay_lsn() - '0/0'::pg_lsn)::bigint,
       CASE
         WHEN NOT pg_is_in_recovery() THEN 0.0
         WHEN EXISTS (SELECT FROM pg_stat_wal_receiver
                      WHERE pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn()
                         OR latest_end_lsn <= pg_last_wal_replay_lsn()) THEN 0.0
         ELSE extract(epoch FROM clock_timestamp() - pg_last_xact_replay_timestamp())::float8
       END
"""
    )
)


def seconds(value: float) -> str:
    """A duration for a log line: 0.5 s stays 0.5 s, 5.0 s is 5 s."""
    return f"{value:.3g} s"


def fetch_one(statement: Statement) -> Work[Any]:
    """The work of a statement that returns one row."""
    rows = yield Fetch(statement, {})
    return rows[0]


@dataclass(frozen=True, slots=True)
class ReplicaSettings:
    """How replicas are used; every time is in seconds."""

    timeout: float = 1.0
    max_lag: float = 10.0
    retry_interval: float = 5.0
    max_connections: int = 20

    @property
    def check_interval(self) -> float:
        return min(1.0, self.max_lag / 2)


@dataclass(frozen=True, slots=True)
class ReplicaState:
    """What the storage last learnt about one replica (for operators and tests)."""

    url: str
    up: bool
    lagging: bool
    lag_seconds: float | None
    replayed: int | None
    # Known to hold every write of this storage (else its reads go to the primary).
    holds_own_writes: bool = False
    reads_served: int = 0
    # Why it is not known to be a copy of the primary's database (None: it is, or it
    # has not been reached yet); such a replica serves no reads.
    mismatch: str | None = None


class Unavailable(Exception):
    """This replica cannot serve this read: the caller reads from the primary."""


class _Adapted:
    """What SQLAlchemy's asyncpg codec set-up expects of a connection."""

    def __init__(self, connection: Any) -> None:
        self._connection = connection


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = mask_secrets(text)[:200]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class Replica:
    """One hot standby: its connections, what it last reported, whether it is up."""

    def __init__(
        self,
        url: str,
        connect_args: dict[str, Any],
        dialect: Dialect,
        settings: ReplicaSettings,
        expected: Identity,
    ) -> None:
        self.url = url  # as given, password masked
        self._expected = expected
        self._settings = settings
        self._dialect = dialect
        self._connects = Connects()
        self._pool = ReplicaConnections(
            lambda: self._connect(connect_args), settings.max_connections
        )
        self.up = True
        self.lagging = False
        self.lag: float | None = None
        self.replayed: int | None = None
        self.checked_at = -math.inf
        self.served = 0
        self.mismatch: str | None = None
        self._task: asyncio.Task[None] | None = None
        # The check a read that ran past the timeout asked for (_proof_of_life).
        self._proof: asyncio.Task[bool] | None = None
        # Marked down because it did not answer in time (not for a lost connection).
        self._unanswered = False
        self._refused: set[str] = set()
        self._closed = False

    async def _connect(self, connect_args: dict[str, Any]) -> Any:
        connection = await self._connects(**connect_args)
        try:
            # The primary's engine decodes JSON this way: rows must not differ by server.
            dialect: Any = self._dialect
            await dialect.setup_asyncpg_json_codec(_Adapted(connection))
            await dialect.setup_asyncpg_jsonb_codec(_Adapted(connection))
            # Checked on every new connection: the URL may name another server by now.
            mismatch = self._expected.mismatch(await identity_of(connection))
            if mismatch is None:
                # And how far it has replayed: a new connection may follow a restart,
                # after which a standby can reopen behind where it was (found by attack:
                # reads went on to it as if it held this storage's writes).
                status = await run_on_asyncpg(connection, self._dialect, fetch_one(STATUS))
        except BaseException:
            connection.terminate()
            raise
        if mismatch is not None:
            connection.terminate()
            raise NotThisDatabase(mismatch)
        if not self._closed:
            self._learn(bool(status[0]), status[1], status[2], new_connection=True)
        return connection

    def state(self, position: int | None) -> ReplicaState:
        """What is known of the replica; `position`: of this storage's writes, if known."""
        holds = position is not None and self.mismatch is None and self.caught_up_with(position)
        return ReplicaState(
            self.url,
            self.up,
            self.lagging,
            self.lag,
            self.replayed,
            holds,
            self.served,
            self.mismatch,
        )

    def serves(self) -> bool:
        """Up, a copy of the primary's database, and known to be within `max_lag` now.

        The lag it last reported grows, at most, by the time since: after that long
        without a check it may be too far behind (found by attack: the first read after
        a storage sat idle was served by a standby 8 s behind, `max_lag` 2 s). Reads
        start a check once the last is older than `check_interval`. While a read that
        ran past the timeout has the replica prove it lives, none starts here.
        """
        lag = self.lag
        if lag is None or self.lagging or not self.usable() or self._closed:
            return False
        if self._proof is not None and not self._proof.done():
            return False
        return time.monotonic() - self.checked_at + lag <= self._settings.max_lag

    def caught_up_with(self, position: int) -> bool:
        return position == 0 or (self.replayed is not None and self.replayed >= position)

    def refresh_if_old(self) -> None:
        """Starts a background check when the last one is older than the check interval."""
        if self.usable() and time.monotonic() - self.checked_at > self._settings.check_interval:
            self._tend(check_first=True)

    def check_soon(self) -> None:
        """Starts a background check now (unless one runs): the replica is behind."""
        if self.usable():
            self._tend(check_first=True)

    def usable(self) -> bool:
        """Up, and not known to be another database (lag aside)."""
        return self.up and self.mismatch is None

    def _tend(self, *, check_first: bool) -> None:
        """Runs the one background task of this replica, unless it runs already.

        It checks the replica (if asked), then, as long as the replica is down,
        checks again every retry interval. Once the replica is closed, none starts.
        """
        if self._closed or (self._task is not None and not self._task.done()):
            return
        self._task = asyncio.get_running_loop().create_task(self._background(check_first))

    async def _background(self, check_first: bool) -> None:
        if check_first:
            await self.check()
        while not self._closed and not self.usable():
            await asyncio.sleep(self._settings.retry_interval)
            if not self._closed:
                await self.check()

    async def check(self) -> bool:
        """Asks the replica how far it has replayed and how far behind it is.

        Returns whether it answered; one that does not is marked down, one that is
        not a copy of the primary's database is marked so. A closed replica is not asked.
        """
        if self._closed:
            return False
        try:
            connection = await self._pool.take(self._settings.timeout)
        except Exception as exc:
            return self._not_connected(exc)
        try:
            async with asyncio.timeout(self._settings.timeout):
                standby, replayed, lag = await run_on_asyncpg(
                    connection, self._dialect, fetch_one(STATUS)
                )
        except BaseException as exc:
            self._pool.drop(connection)
            if isinstance(exc, Exception):
                self._mark_down(exc)
                return False
            raise
        self._pool.give_back(connection)
        if not self._closed:
            self._learn(bool(standby), replayed, lag)
        return True

    def _learn(
        self, standby: bool, replayed: int | None, lag: float | None, new_connection: bool = False
    ) -> None:
        """Records a report. Replay never goes back while the server runs, so the highest
        position reported stands, unless the report came on a new connection: the
        server may have restarted since the others were made."""
        self.checked_at = time.monotonic()
        self._unanswered = False
        # A server out of recovery (promoted, or the primary itself) cannot show that
        # it holds this storage's writes: it serves only reads that need none of them.
        # A standby restarted after a crash can reopen behind where it was (found by
        # attack: the highest position ever reported was kept, and it served reads as
        # if it held this storage's writes). Within one run of the server, answers that
        # arrive out of order must not set it back: reads would leave it for nothing.
        if standby and replayed is not None:
            self.replayed = replayed if new_connection else max(replayed, self.replayed or 0)
        else:
            self.replayed = None
        self.lag = lag
        lagging = lag is None or lag > self._settings.max_lag
        if lagging and not self.lagging:
            behind = "an unknown time" if lag is None else f"{lag:.1f} s"
            logger.warning(
                "read replica %s is %s behind (more than %s): reads go to the primary"
                " until it catches up",
                self.url,
                behind,
                seconds(self._settings.max_lag),
            )
        elif self.lagging and not lagging:
            logger.info("read replica %s has caught up: reads go to it again", self.url)
        self.lagging = lagging
        if self.mismatch is not None:
            self.mismatch = None
            logger.info(
                "read replica %s is now a copy of the primary's database: reads go to it",
                self.url,
            )
        if not self.up:
            self.up = True
            logger.info("read replica %s answers again: reads go to it again", self.url)

    def _mark_down(self, exc: BaseException, *, connecting: bool = False) -> None:
        self._pool.drop_idle()
        silent = isinstance(exc, TimeoutError) or (connecting and _unreachable(exc))
        if silent and not self._closed:
            # It does not answer (a timeout), or a new connection's host refuses or
            # cannot be reached (found by attack: a read on a standby gone silent, whose
            # new connections were refused, waited for good): the reads still on it
            # would wait in vain. Not for a server that answered (a backend ended on a
            # live standby, "too many clients": their slow reads were aborted), nor at
            # close (the reads on a live replica may still finish).
            self._unanswered = True
            self._pool.end_lent()
        if not self.up or self._closed:
            return
        self.up = False
        logger.warning(
            "read replica %s is unreachable (%s): reads go to the primary; retrying every %s",
            self.url,
            _describe(exc),
            seconds(self._settings.retry_interval),
        )
        self._tend(check_first=False)

    def _not_connected(self, exc: Exception) -> bool:
        """Marks the replica after a connection failed: not a copy of the primary's
        database, or down. Returns whether the server answered."""
        if isinstance(exc, NotThisDatabase):
            self._mark_foreign(exc)
            return True
        self._mark_down(exc, connecting=True)
        return False

    def _mark_foreign(self, exc: NotThisDatabase) -> None:
        """The server answers but is not a copy of the primary's database: no reads."""
        self._pool.drop_idle()
        self.up = True
        self.replayed = None
        self.lag = None
        self.checked_at = -math.inf
        if self._closed or self.mismatch == str(exc):
            return
        self.mismatch = str(exc)
        logger.warning(
            "read replica %s is not a copy of the primary's database: %s; reads go to the"
            " primary; checking again every %s",
            self.url,
            self.mismatch,
            seconds(self._settings.retry_interval),
        )
        self._tend(check_first=False)

    async def run(self, work: Work[T], snapshot: bool, position: int = 0) -> T:
        """Runs `work` here, if the replica has replayed `position` (this storage's writes).

        Raises:
            Unavailable: the replica cannot serve it (the caller reads from the primary).
        """
        if self._pool.full():
            work.close()
            raise Unavailable("every connection to the replica is busy")
        try:
            connection = await self._pool.take(self._settings.timeout)
        except Exception as exc:
            work.close()
            self._not_connected(exc)
            raise Unavailable(_describe(exc)) from exc
        try:
            self._still_serves(connection, position)
        except Unavailable:
            work.close()
            raise
        # Its first call, if the replica had ended this connection, is sent again on a
        # fresh one (checkout.Lent) rather than the replica taken for down.
        lent = Lent(connection, lambda ended, exc: self._replace(ended, exc, position))
        try:
            result = await self._watch(lent, self._execute(lent, work, snapshot))
        except BaseException as exc:
            connection = lent.driver
            lost = not isinstance(exc, Exception) or connection_lost(exc)
            if connection is None:
                pass  # dropped by _replace, which made no other
            elif lost or connection.is_closed():
                self._pool.drop(connection)
            else:
                self._pool.give_back(connection)
            if isinstance(exc, TimeoutError) or (
                isinstance(exc, Exception) and connection_lost(exc)
            ):
                self._mark_down(exc)
                raise Unavailable(_describe(exc)) from exc
            if _refused_by_server(exc):
                self._note_refusal(exc)
                raise Unavailable(_describe(exc)) from exc
            raise
        self.served += 1
        if self.up:
            self._pool.give_back(lent.driver)
        else:
            # Marked down meanwhile: its idle connections were dropped, and so is this one.
            self._pool.drop(lent.driver)
        return result

    async def _replace(self, ended: Any, exc: BaseException, position: int) -> Any:
        """A fresh connection for a read whose first call found `ended` closed by the
        replica, which likely ended its other idle ones too (a restart): all dropped.

        Raises:
            Unavailable: no new connection (the replica is marked down or foreign), or
                the replica reopened behind `position` or `max_lag`.
        """
        self._pool.drop(ended)
        self._pool.drop_idle()
        if not self.up:
            # Found down meanwhile (its lent connections were ended so): not asked again.
            raise Unavailable("the replica stopped answering")
        try:
            connection = await self._pool.take(self._settings.timeout)
        except Exception as failed:
            self._not_connected(failed)
            raise Unavailable(_describe(failed)) from failed
        self._still_serves(connection, position)
        return connection

    def _still_serves(self, connection: Any, position: int) -> None:
        """Gives `connection` back and raises Unavailable unless the replica still
        serves reads that need `position`: a new connection has just asked how far the
        replica has replayed (`_connect`), which a restart can have set back.
        """
        if not (self.serves() and self.caught_up_with(position)):
            self._pool.give_back(connection)
            self.check_soon()
            raise Unavailable("behind this storage's writes, or too far behind")

    async def _execute(self, lent: Lent, work: Work[T], snapshot: bool) -> T:
        if snapshot:
            async with lent.transaction(isolation="repeatable_read", readonly=True):
                return await run_on_asyncpg(lent.driver, self._dialect, work)
        return await read_on_asyncpg(lent, self._dialect, work)

    async def _watch(self, lent: Lent, query: Coroutine[Any, Any, T]) -> T:
        """Awaits `query`; while it runs past the timeout, the replica must prove it lives.

        A slow query on a live replica goes on; one on a replica that no longer
        answers (frozen, cut off) is abandoned with asyncio.TimeoutError. An abandoned
        query's connection is closed first: a polite cancel or ROLLBACK would wait
        for a server that does not answer.
        """
        task = asyncio.ensure_future(query)
        closing = False
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=self._settings.timeout)
                if done:
                    return task.result()
                proof = self._proof_of_life()
                if proof is not None:
                    # The query may end first: its connection ended by a failed check.
                    either: set[asyncio.Task[Any]] = {task, proof}
                    done, _ = await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
                    if task in done:
                        return task.result()
                    if proof.cancelled():
                        proof = None  # by close()
                if proof is None and self._closed and not closing:
                    # Closed meanwhile: nothing checks, and the primary takes no reads
                    # now; the query has one more timeout to finish (found by attack:
                    # a check cancelled by close() failed a read on a live standby).
                    closing = True
                    continue
                # Only a replica found not answering (a check or connect that timed
                # out) abandons the query: one that refused the check's connection
                # ("too many clients") or lost it still runs it (found by attack).
                if proof is None or (not proof.result() and self._unanswered):
                    raise TimeoutError("the replica stopped answering")
        finally:
            if not task.done():
                if lent.driver is not None:
                    lent.driver.terminate()
                task.cancel()
                await asyncio.wait({task})

    def _proof_of_life(self) -> asyncio.Task[bool] | None:
        """The check that the replica answers on another connection; None once it was
        found not answering (or closed). One marked down for another reason (a lost
        connection) is checked as well: it may answer.

        Found by attack: each read that ran past the timeout checked on its own, paying
        a second timeout, and reads went on starting on a frozen standby until one such
        check failed: with a read every 0.1 s, 14 of 25 paid 1-2 s. One check now
        serves every read waiting meanwhile, reads that start meanwhile go to the
        primary (`serves`), and a check or connect that times out ends every read
        still on the replica (`_mark_down`).
        """
        if self._unanswered or self._closed:
            return None
        if self._proof is None or self._proof.done():
            self._proof = asyncio.get_running_loop().create_task(self.check())
        return self._proof

    def _note_refusal(self, exc: BaseException) -> None:
        if self._closed:
            return
        state = str(getattr(exc, "sqlstate", "") or type(exc).__name__)
        log = logger.debug if state in self._refused else logger.warning
        self._refused.add(state)
        log("read replica %s refused a read (%s): read from the primary", self.url, _describe(exc))

    async def close(self) -> None:
        """Stops the background task; none starts afterwards, not even when a read that
        was running meanwhile finds the replica gone."""
        self._closed = True
        for task in (self._task, self._proof):
            if task is not None and not task.done():
                task.cancel()
                await asyncio.wait({task})
        self._task = self._proof = None
        await self._pool.close(self._settings.timeout)
        await self._connects.settled()


# What a connect fails with that says nothing of the server: this process's own
# shortage, a name that did not resolve (it may next time), TLS (the server answered).
# Found by attack: an EMFILE on one connect ended every read running on a healthy
# standby. Any other OSError (refused, reset, unreachable; asyncio's "Multiple
# exceptions" of a name with several addresses) says the server's end is gone.
_OWN_SHORTAGE = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


def _unreachable(exc: BaseException) -> bool:
    return (
        isinstance(exc, OSError)
        and not isinstance(exc, (ssl.SSLError, socket.gaierror))
        and exc.errno not in _OWN_SHORTAGE
    )


def _refused_by_server(exc: BaseException) -> bool:
    """A server error on this read only (a recovery conflict, a schema not replayed)."""
    try:
        from asyncpg import PostgresError
    except ImportError:  # pragma: no cover - asyncpg is the postgresql extra
        return False
    return isinstance(exc, PostgresError)
