"""Read replicas that cannot help: unreachable, silent, misnamed; masking; PgBouncer mode.

These need no standby: the replica URLs point at nothing, at a socket that never
answers, or are refused before any I/O. The primary is the tests' PostgreSQL.
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import socket
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager

import pytest
from sqlalchemy import make_url

from persistence import ChatSession, InvalidDataError, PostgreSQLSessionStorage
from tests import servers

pytestmark = pytest.mark.postgresql

LOGGER = "persistence.sql.replicas"
PASSWORD = "p@ss/w?rd#x:y"
ENCODED = "p%40ss%2Fw%3Frd%23x%3Ay"


@contextmanager
def silent_listener() -> Iterator[int]:
    """A port whose kernel completes TCP handshakes that nothing ever answers (a partition)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        yield int(listener.getsockname()[1])


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
async def emptied(postgresql_url: str) -> AsyncIterator[str]:
    async with servers.emptied_postgresql(postgresql_url):
        pass
    yield postgresql_url


def replica_url(port: int) -> str:
    return f"postgresql://reader:{ENCODED}@127.0.0.1:{port}/replica"


async def _check_no_penalty(storage: PostgreSQLSessionStorage) -> None:
    session = ChatSession.create("model")
    session.add_message("user", "still served")
    await storage.save_session(session)
    started = time.monotonic()
    for _ in range(20):
        assert [s.session_id for s in await storage.list_sessions()] == [session.session_id]
    assert len(await storage.search_messages("served")) == 1
    assert (await storage.count()).total_sessions == 1
    assert time.monotonic() - started < 2.0


async def test_a_silent_replica_costs_one_timeout_at_start_and_none_per_call(
    emptied: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    with silent_listener() as port:
        storage = PostgreSQLSessionStorage(
            emptied, 1, 5, read_replicas=[replica_url(port)], replica_retry_interval=0.2
        )
        try:
            started = time.monotonic()
            await storage.initialize()
            assert time.monotonic() - started < 3.0
            await _check_no_penalty(storage)
            assert not storage.replica_states()[0].up
        finally:
            await storage.close()
    warnings = [r for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING


async def test_a_refused_replica_is_skipped_with_one_log_line(
    emptied: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    storage = PostgreSQLSessionStorage(
        emptied, 1, 5, read_replicas=[replica_url(closed_port())], replica_retry_interval=0.05
    )
    async with storage:
        await _check_no_penalty(storage)
    assert sum("unreachable" in r.getMessage() for r in caplog.records) == 1


async def test_replica_passwords_never_appear_in_repr_logs_or_errors(
    emptied: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    primary = make_url(emptied).set(password=PASSWORD).render_as_string(hide_password=False)
    storage = PostgreSQLSessionStorage(
        primary, 1, 2, read_replicas=[replica_url(closed_port()), replica_url(closed_port())]
    )
    shown = repr(storage)
    assert shown.count("***") == 3
    with pytest.raises(InvalidDataError) as refused:
        PostgreSQLSessionStorage(
            emptied, read_replicas=[replica_url(1), f"mysql://reader:{ENCODED}@host/db"]
        )
    assert "read_replicas[1]" in str(refused.value)
    logged = "\n".join(record.getMessage() for record in caplog.records)
    for text in (shown, logged, str(refused.value)):
        assert PASSWORD not in text and ENCODED not in text and "p@ss" not in text


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"read_replicas": "postgresql://h/db"}, "a list of URLs"),
        ({"read_replicas": ["postgresql://h/db"], "replica_timeout": 0}, "replica_timeout"),
        ({"read_replicas": ["postgresql://h/db"], "max_replica_lag": -1}, "max_replica_lag"),
        (
            {"read_replicas": ["postgresql://h/db"], "replica_retry_interval": float("inf")},
            "replica_retry_interval",
        ),
        ({"read_replicas": ["sqlite:///x.db"]}, "read_replicas[0]"),
    ],
)
def test_bad_replica_settings_are_refused_before_any_io(options: dict, named: str) -> None:
    with pytest.raises(InvalidDataError, match=named.replace("[", r"\[")):
        PostgreSQLSessionStorage("postgresql://u@127.0.0.1:1/db", **options)


async def _prepared_statement_names(storage: PostgreSQLSessionStorage) -> list[str]:
    session = ChatSession.create("model")
    session.add_message("user", "behind a pooler")
    await storage.save_session(session)
    session.add_message("assistant", "reply")
    await storage.save_session(session)
    assert (await storage.load_session(session.session_id)) is not None
    await storage.list_sessions()
    await storage.search_messages("pooler")
    async with storage.unit_of_work() as uow:
        await uow.sessions.get(session.session_id)
        await uow.commit()
    async with storage.engine.connect() as pooled:
        driver = (await pooled.get_raw_connection()).driver_connection
        assert driver is not None
        rows = await driver.fetch("SELECT name FROM pg_prepared_statements")
    return [row["name"] for row in rows]


async def test_without_statement_caches_no_named_statement_outlives_a_call(
    emptied: str,
) -> None:
    # What PgBouncer before 1.21 needs in transaction mode (see the README).
    cached = PostgreSQLSessionStorage(emptied, 1, 1)
    async with cached:
        assert await _prepared_statement_names(cached)
    uncached = PostgreSQLSessionStorage(
        emptied + "?statement_cache_size=0&prepared_statement_cache_size=0", 1, 1
    )
    async with uncached:
        assert await _prepared_statement_names(uncached) == []


async def test_a_statement_cache_size_that_is_not_a_number_is_refused() -> None:
    storage = PostgreSQLSessionStorage("postgresql://u@127.0.0.1:1/db?statement_cache_size=x")
    with pytest.raises(InvalidDataError, match="statement_cache_size"):
        await storage.initialize()
    await storage.close()


async def test_a_password_given_as_a_query_parameter_is_masked_everywhere(
    emptied: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    secret = "S3cretPassw0rd"
    replica = f"postgresql://reader@127.0.0.1:{closed_port()}/replica?password={secret}"
    storage = PostgreSQLSessionStorage(
        emptied, 1, 2, read_replicas=[replica], replica_retry_interval=0.05
    )
    async with storage:
        await _check_no_penalty(storage)
        (state,) = storage.replica_states()
        assert not state.up
        assert state.url.endswith("/replica?password=***")
        shown = [repr(storage), repr(storage.replica_states()), str(state)]
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "unreachable" in logged
    for text in (*shown, logged, caplog.text):
        assert secret not in text


async def test_the_retry_interval_is_logged_as_given(
    emptied: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    storage = PostgreSQLSessionStorage(
        emptied, 1, 2, read_replicas=[replica_url(closed_port())], replica_retry_interval=0.5
    )
    async with storage:
        await storage.list_sessions()
    (warning,) = [r for r in caplog.records if "unreachable" in r.getMessage()]
    assert "retrying every 0.5 s" in warning.getMessage()


async def test_a_read_that_fails_after_close_logs_nothing(
    emptied: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Found by attack: a read blocked on a standby, refused after close() returned,
    # logged "refused a read ... read from the primary", a primary already closed.
    storage = PostgreSQLSessionStorage(emptied, 1, 2, read_replicas=[replica_url(closed_port())])
    async with storage:
        await storage.list_sessions()
        replicas = storage._replicas
        assert replicas is not None
    caplog.clear()
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    for replica in replicas._replicas:
        replica._note_refusal(RuntimeError("canceling statement due to statement timeout"))
    assert [r.getMessage() for r in caplog.records if r.name == LOGGER] == []


async def test_this_processs_own_shortage_on_a_connect_leaves_the_replicas_reads_running(
    emptied: str,
) -> None:
    """Found by attack: once a connect failing at the network ended every read on a
    replica, an EMFILE (this process out of file descriptors) on one read's connect
    ended a slow read running on a healthy replica. The primary serves as the replica
    here: it answers reads that need none of this storage's writes."""
    from sqlalchemy import text

    from persistence.sql.runner import Fetch, Work
    from persistence.sql.standby import Unavailable
    from persistence.sql.statements import Statement

    def slow() -> Work[int]:
        rows = yield Fetch(Statement(text("SELECT pg_sleep(1.5), 42")), {})
        return int(rows[0][1])

    url = emptied.replace("+asyncpg", "")
    storage = PostgreSQLSessionStorage(emptied, 1, 5, read_replicas=[url], replica_timeout=0.5)
    await storage.initialize()
    (replica,) = storage._replicas._replicas  # type: ignore[attr-defined]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    held: list[int] = []
    try:
        running = asyncio.ensure_future(replica.run(slow(), snapshot=False))
        await asyncio.sleep(0.2)
        resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 2, hard))
        try:
            while True:
                held.append(os.open(os.devnull, os.O_RDONLY))
        except OSError:
            pass
        with pytest.raises((Unavailable, OSError)):
            await replica.run(slow(), snapshot=False)  # its connect: EMFILE
        for fd in held:
            os.close(fd)
        held = []
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        assert await running == 42
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        await storage.close()
