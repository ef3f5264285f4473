"""PostgreSQLSessionStorage: a pool of asyncpg connections, optional read replicas."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Callable, Sequence
from contextvars import ContextVar
from functools import partial
from typing import TypeVar

from sqlalchemy import Dialect
from sqlalchemy.ext.asyncio import AsyncEngine

from persistence.errors import (
    ConfigError,
    InvalidDataError,
    PersistenceError,
)
from persistence.event_loops import refuse_another_loop
from persistence.models import ChatSession
from persistence.sql import indexing
from persistence.sql.checkout import Lent, lent_connection
from persistence.sql.connects import Connects
from persistence.sql.engines import (
    WRITE_OPTIONS,
    postgresql_engine,
    postgresql_url,
)
from persistence.sql.errors import lock_not_available, sql_errors
from persistence.sql.held_sessions import UnheldTurn, held_by_another
from persistence.sql.identity import database_identity, server_started
from persistence.sql.one_state import OneStateReads
from persistence.sql.replicas import replica_set
from persistence.sql.runner import (
    ReadAfter,
    Work,
    one_statement,
    read_on_asyncpg,
    run_on_asyncpg,
)
from persistence.sql.schema import VERSION_TABLE
from persistence.sql.sql_storage import SqlSessionStorage
from persistence.sql.standby import ReplicaSettings, ReplicaState
from persistence.sql.statistics import BulkLoadStatistics, analyze_tables
from persistence.sql.uow import SqlUnitOfWork, lending_units_of_work
from persistence.storage import BackendName
from persistence.turns import save_turn
from persistence.urls import mask_url

T = TypeVar("T")
logger = logging.getLogger(__name__)

# The connection a plain save lent before its turn: its statements run on it.
_SAVING_ON: ContextVar[tuple[AsyncEngine, Lent] | None] = ContextVar("_SAVING_ON", default=None)


class PostgreSQLSessionStorage(SqlSessionStorage):
    """PostgreSQL through a pool of asyncpg connections (SQLAlchemy's pool).

    With `read_replicas` (hot standbys of the primary), listing, search, counts and
    exports read from a replica; writes, loads, units of work and migrations use the
    primary. The storage always sees its own writes; a replica that is down, cannot
    be reached, hangs, or lags more than `max_replica_lag` seconds is skipped (see
    persistence.sql.replicas).
    """

    backend_name: BackendName = "postgresql"
    _one_statement_saves = True
    _one_statement_loads = True

    def __init__(
        self,
        connection_string: str,
        min_pool_size: int = 5,
        max_pool_size: int = 20,
        *,
        read_replicas: Sequence[str] = (),
        statement_timeout: float | None = None,
        command_timeout: float | None = None,
        connect_timeout: float = 10.0,
        pool_timeout: float = 30.0,
        max_replica_lag: float = 10.0,
        replica_timeout: float = 1.0,
        replica_retry_interval: float = 5.0,
        version_table: str = VERSION_TABLE,
    ) -> None:
        super().__init__(version_table)
        try:
            import asyncpg  # noqa: F401  # the driver SQLAlchemy loads when the engine is made
        except ImportError:
            raise ConfigError(
                "PostgreSQLSessionStorage needs the asyncpg driver, which is not installed:"
                " pip install 'persistence[postgresql]'"
            ) from None
        if min_pool_size < 0 or max_pool_size < 1 or min_pool_size > max_pool_size:
            raise InvalidDataError(
                "pool sizes: need 0 <= min_pool_size <= max_pool_size and max_pool_size >= 1,"
                f" got {min_pool_size} and {max_pool_size}"
            )
        self.url = postgresql_url(connection_string)
        # The URL as given, for reprs and messages. Found by attack: the driver's URL
        # showed libpq's parameters rewritten (`options=` as `dsn=postgresql%3A...`).
        self._shown = mask_url(connection_string)
        self.min_pool_size = min_pool_size
        self.max_pool_size = max_pool_size
        self._statement_timeout = statement_timeout
        self._command_timeout = command_timeout
        self._connect_timeout = connect_timeout
        self._pool_timeout = pool_timeout
        # The pool's connects (connects.py).
        self._connects = Connects()
        self._one_state = OneStateReads(partial(self._create_engine, pooled=False))
        self._bulk_statistics = BulkLoadStatistics()
        # The event loop the storage was opened in: its connections belong to it.
        self._loop: asyncio.AbstractEventLoop | None = None
        # The store's identity (identity.py) as the first open read it.
        self._identity: str | None = None
        self._replicas = replica_set(
            read_replicas,
            ReplicaSettings(
                timeout=replica_timeout,
                max_lag=max_replica_lag,
                retry_interval=replica_retry_interval,
                max_connections=max_pool_size,
            ),
        )

    def __repr__(self) -> str:
        shown = repr(self._shown)
        if self._replicas is not None:
            shown += f", read_replicas={self._replicas.displayed!r}"
        return f"PostgreSQLSessionStorage({shown})"

    def replica_states(self) -> list[ReplicaState]:
        """What this storage last learnt of each replica: up, lagging, replay position."""
        return [] if self._replicas is None else self._replicas.states()

    @property
    def _where(self) -> str:
        return self._shown

    def _create_engine(self, *, pooled: bool = True) -> AsyncEngine:
        return postgresql_engine(
            self.url,
            self.min_pool_size,
            self.max_pool_size,
            statement_timeout=self._statement_timeout,
            command_timeout=self._command_timeout,
            connect_timeout=self._connect_timeout,
            pool_timeout=self._pool_timeout,
            connects=self._connects,
            pooled=pooled,
        )

    @property
    def engine(self) -> AsyncEngine:
        engine = super().engine
        self._refuse_another_loop()
        return engine

    def _refuse_another_loop(self) -> None:
        # Found by attack: asyncpg's connections, and the pool's queue, belong to the
        # loop that made them; from another one every call failed with a raw
        # RuntimeError, or as "database unreachable", for good.
        refuse_another_loop(
            self._loop, lambda: f"postgresql storage {self._where}", "its connections belong"
        )

    async def _open(self, *, read_only: bool) -> None:
        if self._engine is None:
            self._loop = asyncio.get_running_loop()
        else:
            # Found by attack: initialize() again from another loop failed with a raw
            # RuntimeError, and its failure let go of the first loop's connections.
            self._refuse_another_loop()
        opening = self._engine is None
        await super()._open(read_only=read_only)
        try:
            with sql_errors("open database"):
                identity = await database_identity(self.engine)
            token = identity.token()
            if token is None:
                # Found by attack: a token of the URL as displayed made two spellings of
                # one database two stores (persistence.sql.identity).
                raise PersistenceError(
                    f"{self._where}: the store's id cannot be read: {identity.unread};"
                    " without it, storages reaching this database by other URLs or roles"
                    " could not know it is one store"
                )
            if not opening and self._identity not in (None, token):
                # Found by attack: a store_id deleted and drawn again, then initialize()
                # again, moved this storage to another token than its sessions'.
                raise PersistenceError(
                    f"{self._where}: the store's identity changed since this storage"
                    f" opened ({self._identity} then, {token} now): open a new storage,"
                    " and reload the sessions loaded through this one"
                )
        except BaseException:
            if opening:
                # Unidentified, it would have kept a token of its own (found by attack).
                await self._unopen()
            raise
        self._identity = token
        self._identified_as(token)
        if self._replicas is not None:
            await self._replicas.start(self.engine, self._statement_timeout, identity)

    async def running_instance(self) -> str | None:
        """When the primary started: a physical copy of its cluster (a promoted standby,
        a clone) has its identity, so its token, but started at another moment."""
        with sql_errors("read when the server started"):
            return await server_started(self.engine)

    async def close(self) -> None:
        if self._carried_into_child():
            # Its connections close only in the process that opened them (forks.py).
            self._let_go()
            self._one_state.let_go()
            return
        if self._engine is not None and asyncio.get_running_loop() is not self._loop:
            # The connections cannot be closed from here: the pool lets go of them, and
            # they go with their loop.
            engine, self._engine, self._closed = self._engine, None, True
            engine.sync_engine.dispose(close=False)
            self._one_state.let_go()
            if self._replicas is not None:
                self._replicas.let_go()
            return
        try:
            if self._replicas is not None:
                await self._replicas.close()
        finally:
            try:
                await super().close()
            finally:
                await self._one_state.close()
            # Connects whose callers were cancelled: their connections closed too.
            await self._connects.settled()

    async def insert_sessions(self, sessions: Sequence[ChatSession]) -> bool:
        inserted = await super().insert_sessions(sessions)
        rows = len(sessions) + sum(len(session.messages) for session in sessions)
        if inserted and self._bulk_statistics.added(rows):
            await self._run(analyze_tables(), "analyse tables after bulk inserts", write=True)
        return inserted

    def unit_of_work(self) -> SqlUnitOfWork:
        self._refuse_writes("unit of work")
        if self._replicas is None:
            return super().unit_of_work()
        engine = self.engine.execution_options(**WRITE_OPTIONS)
        return self._replicas.unit_of_work(engine, self.token, self._refuse_closed)

    async def _run_stale(
        self, make_work: Callable[[], Work[T]], action: str, *, snapshot: bool = False
    ) -> T:
        replicas = self._replicas
        if replicas is not None:
            self.engine  # noqa: B018  # raises if closed or not initialized
            with sql_errors(action):
                found = await replicas.read(make_work, snapshot)
            if found is not None:
                return found[0]
        return await self._run(make_work(), action, write=False, snapshot=snapshot)

    def _one_state_pages(self, read: ReadAfter[T]) -> AsyncGenerator[list[T], None] | None:
        """On a connection of the iteration's own (one_state.py). With read replicas, each
        page apart: a standby cancels a long transaction that holds back its replay."""
        if self._replicas is not None:
            return None
        return self._one_state.batches(self.engine.dialect, read, self._check_open)

    def _check_open(self) -> None:
        self.engine  # noqa: B018  # raises if closed, not initialized, or of another loop

    async def _index_batch(self, *, wait: bool) -> indexing.Indexed | None:
        # Always with a short lock wait. Since revision 0013 an edit holds its row's
        # pending range, which a batch then skips, so a batch should never wait on a
        # transaction that waits for it (found by attack: a unit of work was aborted as
        # a deadlock). Should one wait all the same, it gives up first and tries again.
        while True:
            try:
                return await super()._index_batch(wait=wait)
            except PersistenceError as exc:
                if not lock_not_available(exc):
                    raise
            if not wait:
                # A search's catch-up: the search tests the pending rows itself.
                return None
            await asyncio.sleep(indexing.LOCKED_RETRY)

    async def _run(
        self,
        work: Work[T],
        action: str,
        *,
        write: bool,
        snapshot: bool = False,
        single: bool = False,
    ) -> T:
        if write:
            self._refuse_writes(action)
        if write and self._replicas is not None:
            try:
                return await self._run_on_primary(
                    work, action, write=True, snapshot=snapshot, single=single
                )
            finally:
                # Counted whatever the outcome: a write that failed may have committed.
                self._replicas.note_write()
        return await self._run_on_primary(
            work, action, write=write, snapshot=snapshot, single=single
        )

    async def _save_in_turn(self, session: ChatSession, force: bool) -> bool:
        """A plain save waits for the object's turn (and for units of work holding the
        object) holding no connection, and lends one only once the pool has one free.
        Where the pool has none free, it gives the turn back, waits for a connection,
        and takes the turn with it, the order a unit of work takes them in; if a unit
        of work took the object meanwhile, it gives the connection back and waits again.

        Found by attack: with max_pool_size=1, a unit of work holding the connection
        waited for the turn, held by a save waiting for a connection, until the pool
        timeout failed the save. Then, on the first fixes: saves queued on a busy
        object, or on an object a long unit of work held, each held a connection, and
        other work found the pool exhausted.
        """
        engine = self.engine
        while True:
            async with UnheldTurn(self.token, session):
                if _free_connections(engine) > 0:
                    # Its first call claims one before any other task runs.
                    return await self._save_session(session, force)
            saved = await self._save_with_a_connection(engine, session, force)
            if saved is not None:
                return saved
            # A unit of work took the object meanwhile: wait for it holding nothing.

    async def _save_with_a_connection(
        self, engine: AsyncEngine, session: ChatSession, force: bool
    ) -> bool | None:
        """Waits for a connection, then for the object's turn holding it, and saves on
        it; None, the connection given back, if a unit of work holds the object then."""
        with sql_errors("save session"):
            self._refuse_second_connection("save session")
            async with lent_connection(engine) as lent:
                turn = save_turn(self.token, session)
                try:
                    await turn.__aenter__()
                except BaseException as exc:
                    # Cancelled while it waited: nothing was sent on the connection,
                    # which goes back to the pool rather than being dropped.
                    waited = exc
                else:
                    try:
                        if held_by_another(self.token, session):
                            return None
                        pinned = _SAVING_ON.set((engine, lent))
                        try:
                            return await self._save_session(session, force)
                        finally:
                            _SAVING_ON.reset(pinned)
                    finally:
                        await turn.__aexit__(None, None, None)
        raise waited

    async def _run_on_primary(
        self, work: Work[T], action: str, *, write: bool, snapshot: bool, single: bool
    ) -> T:
        saving_on = _SAVING_ON.get()
        if saving_on is not None and saving_on[0] is self._engine:
            # A statement of a plain save (save_session): on the connection it lent.
            with sql_errors(action):
                return await _run_lent(
                    saving_on[1], self._engine.dialect, work, write, snapshot, single
                )
        engine = self.engine
        with sql_errors(action):
            self._refuse_second_connection(action)
            async with lent_connection(engine) as lent:
                return await _run_lent(lent, engine.dialect, work, write, snapshot, single)

    def _refuse_second_connection(self, action: str) -> None:
        """Refuses a call that would wait for the pool's only connection, held by this
        task's own unit of work. Found by attack: it waited the pool timeout, then
        failed as "pool exhausted"."""
        if self.max_pool_size == 1 and self.token in lending_units_of_work():
            raise PersistenceError(
                f"{action}: called while this task holds an open unit_of_work() of the same"
                " PostgreSQL storage, whose pool has one connection (max_pool_size=1), the"
                " unit's; do it through the unit of work (uow.sessions / uow.files) or after"
                " it, or allow the pool more connections"
            )


async def _run_lent(
    lent: Lent, dialect: Dialect, work: Work[T], write: bool, snapshot: bool, single: bool
) -> T:
    """Runs `work` on a lent connection: a transaction for a write of several statements,
    a snapshot's read-only one, else a read or a single statement as it is."""
    # Each transaction's BEGIN, and a read's first statement, are sent again on a fresh
    # connection if the server had ended the pooled one (checkout.py); never a write
    # sent without BEGIN: it may have landed.
    if write and not single:
        async with lent.transaction():
            return await run_on_asyncpg(lent.driver, dialect, work)
    if snapshot:
        async with lent.transaction(isolation="repeatable_read", readonly=True):
            return await run_on_asyncpg(lent.driver, dialect, work)
    if not write:
        return await read_on_asyncpg(lent, dialect, work)
    # A single statement needs no BEGIN / COMMIT round trips.
    return await run_on_asyncpg(lent.driver, dialect, one_statement(work))


def _free_connections(engine: AsyncEngine) -> int:
    """How many connections the engine's pool could lend now without waiting: idle
    ones, and new ones it may still open. A checkout that follows with no await between
    claims one (SQLAlchemy's queue pool counts it before it connects)."""
    pool = engine.sync_engine.pool
    size = getattr(pool, "size", None)
    overflow = getattr(pool, "_max_overflow", None)
    if not callable(size) or not isinstance(overflow, int):
        return 1  # not a queue pool: never waits
    return int(size()) + overflow - int(pool.checkedout())  # type: ignore[attr-defined]
