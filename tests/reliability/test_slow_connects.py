"""PostgreSQL connects cut short by their callers' cancels, behind a slow network.

A connect whose caller is cancelled goes on as a task of its own (persistence.sql.
connects), so that asyncpg is never cut off in its TLS negotiation; these tests put a
proxy that delays the server's answers in front of the server, so that connects take
longer than the callers wait, and check what such connects must not do: open more
connections than the pool allows, or outlive `close()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Iterator

import asyncpg
import pytest

from persistence import PostgreSQLSessionStorage
from tests import servers

pytestmark = pytest.mark.postgresql

# Each answer of the server reaches the client this much later, once the storage is
# open (before, its opening's round trips would take seconds).
DELAY = 0.3


# The message a client ends a connection with (PostgreSQL's Terminate).
TERMINATE = b"X\x00\x00\x00\x04"


@contextlib.contextmanager
def _delaying_proxy(
    host: str, port: int, delay: list[float], *, stall_at_terminate: bool = False
) -> Iterator[int]:
    """A TCP proxy to host:port, in a thread of its own, that holds every chunk the
    server sends for `delay[0]` seconds (as it is when the chunk comes); yields its
    port. With `stall_at_terminate`, a connection whose client says Terminate gets no
    further byte either way, its sockets left open: a server that stopped answering."""
    loop = asyncio.new_event_loop()

    async def pipe(
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        delayed: bool,
        stalled: asyncio.Event,
    ) -> None:
        try:
            while data := await reader.read(65536):
                if stall_at_terminate and (stalled.is_set() or data.endswith(TERMINATE)):
                    stalled.set()
                    await asyncio.Event().wait()  # until the proxy shuts down
                if delayed and delay[0]:
                    await asyncio.sleep(delay[0])
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    async def handle(
        client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
    ) -> None:
        server_reader, server_writer = await asyncio.open_connection(host, port)
        stalled = asyncio.Event()
        await asyncio.gather(
            pipe(client_reader, server_writer, False, stalled),
            pipe(server_reader, client_writer, True, stalled),
        )

    async def serve() -> int:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        await server.start_serving()
        servers_started.append(server)
        return int(server.sockets[0].getsockname()[1])

    async def shut_down() -> None:
        servers_started[0].close()
        others = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)

    servers_started: list[asyncio.Server] = []
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield asyncio.run_coroutine_threadsafe(serve(), loop).result(5)
    finally:
        asyncio.run_coroutine_threadsafe(shut_down(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


@contextlib.asynccontextmanager
async def _behind_the_proxy(
    storage: PostgreSQLSessionStorage, *, stall_at_terminate: bool = False, **options: float
) -> AsyncIterator[tuple[PostgreSQLSessionStorage, asyncpg.Connection, str]]:
    """A storage on `storage`'s database through the delaying proxy, a direct connection
    to the server (to count its connections), and the database's name."""
    url = storage.url
    delay = [0.0]
    with _delaying_proxy(
        url.host or "127.0.0.1", url.port or 5432, delay, stall_at_terminate=stall_at_terminate
    ) as port:
        slow = PostgreSQLSessionStorage(
            url.set(host="127.0.0.1", port=port).render_as_string(hide_password=False),
            **options,  # type: ignore[arg-type]
        )
        direct = await asyncpg.connect(
            servers.plain_postgresql_url(
                url.set(database="postgres").render_as_string(hide_password=False)
            )
        )
        try:
            await slow.initialize()
            delay[0] = DELAY
            yield slow, direct, str(url.database)
        finally:
            await slow.close()
            await direct.close()


async def _connections(direct: asyncpg.Connection, database: str) -> int:
    return int(
        await direct.fetchval("SELECT count(*) FROM pg_stat_activity WHERE datname = $1", database)
    )


async def test_callers_that_time_out_on_slow_connects_stay_within_the_pool(
    postgresql_storage: PostgreSQLSessionStorage,
) -> None:
    """Found by attack: each cancelled caller's connect went on, uncounted by the pool,
    which started another for the next caller: 9 server connections for a pool of 2."""
    await postgresql_storage.close()  # the fixture's own connections: none left
    most = 0
    async with _behind_the_proxy(
        postgresql_storage, min_pool_size=1, max_pool_size=2, pool_timeout=0.5
    ) as (slow, direct, database):
        stop = time.monotonic() + 3

        async def caller() -> None:
            while time.monotonic() < stop:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(slow.list_sessions(), 0.25)

        callers = [asyncio.ensure_future(caller()) for _ in range(10)]
        while time.monotonic() < stop:
            most = max(most, await _connections(direct, database))
            await asyncio.sleep(0.05)
        await asyncio.gather(*callers)
    assert most <= 2


async def test_a_connect_its_caller_gave_up_on_ends_before_close_returns(
    postgresql_storage: PostgreSQLSessionStorage,
) -> None:
    """Found by attack: the connect went on after `close()` had returned, and a server
    connection appeared for a database the program had closed."""
    await postgresql_storage.close()  # the fixture's own connections: none left
    async with _behind_the_proxy(postgresql_storage, min_pool_size=0, max_pool_size=1) as (
        slow,
        direct,
        database,
    ):
        # Cancelled mid-query: the connection is dropped, so the next call connects.
        for _ in range(2):
            reading = asyncio.ensure_future(slow.list_sessions())
            await asyncio.sleep(0.1)
            reading.cancel()
            await asyncio.gather(reading, return_exceptions=True)
        await slow.close()
        seen = 0
        for _ in range(10):
            seen = max(seen, await _connections(direct, database))
            await asyncio.sleep(0.05)
    assert seen == 0


async def test_a_cancel_is_not_held_up_by_a_connection_closing_on_a_server_that_stopped(
    postgresql_storage: PostgreSQLSessionStorage,
) -> None:
    """Found by attack: a connection given back past the pool's size is closed, and a
    cancel arriving then waited for the polite close, which on a server that stopped
    answering never ends: `wait_for(..., 1.0)` never returned; so did `close()`. A
    polite close now gives up after 2 s, and a cancel cuts it short."""
    async with _behind_the_proxy(
        postgresql_storage, stall_at_terminate=True, min_pool_size=1, max_pool_size=3
    ) as (slow, _, _):
        started = time.monotonic()
        reads = [asyncio.wait_for(slow.list_sessions(), 1.0) for _ in range(3)]
        done = await asyncio.wait_for(asyncio.gather(*reads, return_exceptions=True), 10)
        # The timeout, and at most the 2 s a dropped connection's polite close is given.
        assert time.monotonic() - started < 4.5
        assert all(r == [] or isinstance(r, TimeoutError) for r in done)

        started = time.monotonic()
        reads = [slow.list_sessions() for _ in range(3)]
        assert await asyncio.wait_for(asyncio.gather(*reads), 10) == [[], [], []]
        assert time.monotonic() - started < 4.5

        started = time.monotonic()
        await asyncio.wait_for(slow.close(), 10)
        assert time.monotonic() - started < 4.5
