"""A canary password in the connection string never appears in any output.

Checked: reprs, str/repr and full tracebacks of the errors of every failure path
(unreachable server, wrong password, missing database, connection killed, pool
exhausted, server cut off), log records of every logger at DEBUG, and SQLAlchemy's
echo (parameters hidden). The local server trusts 127.0.0.1, so it accepts the
canary as a password; the wrong-password path runs against a private server
started with scram-sha-256 authentication.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import traceback
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import asyncpg
import pytest
from sqlalchemy import make_url

from persistence import (
    ChatSession,
    InvalidDataError,
    PersistenceError,
    PostgreSQLSessionStorage,
    StorageConnectionError,
)
from tests.reliability.conftest import Figures
from tests.reliability.support import TcpProxy
from tests.servers import plain_postgresql_url

pytestmark = pytest.mark.postgresql

CANARY = "Canary-pw-7e3f9a1c"
# A password that needs quoting in a URL: both spellings must stay hidden.
ODD_CANARY = "c@n:ary/7e3f%9a?1c"
CONTENT_CANARY = "content-canary-51d2"


def spellings(password: str) -> list[str]:
    return [password, quote(password, safe=""), quote(password)]


def assert_hidden(text: str, password: str = CANARY) -> None:
    for spelling in spellings(password):
        assert spelling not in text, f"password leaked: ...{text[:300]}"


def error_text(exc: BaseException) -> str:
    """str, repr and the full traceback, chained causes and their reprs included."""
    parts = [str(exc), repr(exc), "".join(traceback.format_exception(exc))]
    cause: BaseException | None = exc
    while cause is not None:
        parts += [str(cause), repr(cause), repr(getattr(cause, "args", ""))]
        cause = cause.__cause__ or cause.__context__
    return "\n".join(parts)


def with_password(url: str, password: str, **changes: object) -> str:
    return (
        make_url(url)
        .set(password=password, **changes)  # type: ignore[arg-type]
        .render_as_string(hide_password=False)
    )


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def every_log(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """Captures every logger at DEBUG, SQLAlchemy's and the drivers' included."""
    for name in (
        "",
        "sqlalchemy",
        "sqlalchemy.engine",
        "sqlalchemy.pool",
        "asyncpg",
        "persistence",
    ):
        caplog.set_level(logging.DEBUG, logger=name)
    yield caplog


def assert_logs_hidden(caplog: pytest.LogCaptureFixture, password: str = CANARY) -> int:
    text = caplog.text + "\n".join(
        f"{record.getMessage()} {record.args!r} {record.exc_text or ''}"
        for record in caplog.records
    )
    assert_hidden(text, password)
    return len(caplog.records)


@pytest.mark.parametrize("password", [CANARY, ODD_CANARY])
async def test_reprs_never_show_the_password(postgresql_url: str, password: str) -> None:
    url = with_password(postgresql_url, password)
    storage = PostgreSQLSessionStorage(url, min_pool_size=1, max_pool_size=2)
    await storage.initialize()
    try:
        texts = [repr(storage), str(storage), repr(storage.url), str(storage.url)]
        texts += [repr(storage.engine), repr(storage.engine.url), repr(vars(storage))]
        texts += [repr(storage.engine.pool), storage.engine.pool.status()]
        for text in texts:
            assert_hidden(text, password)
    finally:
        await storage.close()


@pytest.mark.parametrize(
    "connection_string",
    [
        f"mysql://user:{CANARY}@127.0.0.1/db",
        f"postgresql://user:{CANARY}@[not-a-host/db",
        f"postgresql://user:{CANARY}@127.0.0.1:notaport/db",
        f"{CANARY}",
    ],
)
async def test_a_malformed_connection_string_is_refused_without_repeating_it(
    connection_string: str,
) -> None:
    with pytest.raises((InvalidDataError, PersistenceError)) as caught:
        storage = PostgreSQLSessionStorage(connection_string, connect_timeout=2)
        try:
            await storage.initialize()
        finally:
            await storage.close()
    assert_hidden(error_text(caught.value))


async def test_unreachable_server_errors_and_logs_never_show_the_password(
    every_log: pytest.LogCaptureFixture, figures: Figures
) -> None:
    url = f"postgresql://postgres:{CANARY}@127.0.0.1:{closed_port()}/postgres"
    storage = PostgreSQLSessionStorage(url, min_pool_size=1, max_pool_size=2, connect_timeout=2)
    with pytest.raises(StorageConnectionError) as caught:
        await storage.initialize()
    assert "unreachable" in str(caught.value)
    assert_hidden(error_text(caught.value))
    await storage.close()
    figures["log_records_checked"] = assert_logs_hidden(every_log)


async def test_missing_database_errors_never_show_the_password(
    postgresql_url: str, every_log: pytest.LogCaptureFixture
) -> None:
    url = with_password(postgresql_url, CANARY, database="no_such_database_7e3f")
    storage = PostgreSQLSessionStorage(url, min_pool_size=1, max_pool_size=2)
    with pytest.raises(PersistenceError) as caught:
        await storage.initialize()
    assert_hidden(error_text(caught.value))
    await storage.close()
    assert_logs_hidden(every_log)


async def test_killed_connection_and_exhausted_pool_errors_never_show_the_password(
    postgresql_url: str, every_log: pytest.LogCaptureFixture, figures: Figures
) -> None:
    url = with_password(postgresql_url, CANARY)
    storage = PostgreSQLSessionStorage(url, min_pool_size=1, max_pool_size=1, pool_timeout=0.2)
    await storage.initialize()
    errors: list[BaseException] = []
    try:
        session = ChatSession.create("secrets")
        await storage.save_session(session)
        session.add_message("user", CONTENT_CANARY)
        # Killed while a unit of work holds it: a connection that died idle in the pool
        # is dropped for another at checkout, so no call would fail.
        with pytest.raises(StorageConnectionError) as killed:
            async with storage.unit_of_work() as uow:
                await uow.sessions.get(session.session_id)
                admin = await asyncpg.connect(plain_postgresql_url(postgresql_url))
                try:
                    await admin.execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                        " WHERE datname = $1 AND pid <> pg_backend_pid()",
                        make_url(postgresql_url).database,
                    )
                finally:
                    await admin.close()
                await uow.sessions.add(session)
        errors.append(killed.value)
        async with storage.unit_of_work() as uow:
            await uow.sessions.get(session.session_id)
            with pytest.raises(StorageConnectionError, match="pool exhausted") as exhausted:
                # From another task: this one's own call would be refused at once.
                await asyncio.create_task(storage.load_session(session.session_id))
            errors.append(exhausted.value)
    finally:
        await storage.close()
    for error in errors:
        assert_hidden(error_text(error))
        assert CONTENT_CANARY not in error_text(error)
    figures["failure_paths"] = len(errors)
    figures["log_records_checked"] = assert_logs_hidden(every_log)


async def test_server_cut_off_errors_never_show_the_password(
    postgresql_url: str, every_log: pytest.LogCaptureFixture
) -> None:
    target = make_url(postgresql_url)
    proxy = TcpProxy(target.host or "127.0.0.1", target.port or 5432)
    await proxy.start()
    url = with_password(postgresql_url, CANARY, host="127.0.0.1", port=proxy.port)
    storage = PostgreSQLSessionStorage(url, min_pool_size=1, max_pool_size=2, connect_timeout=2)
    try:
        await storage.initialize()
        await proxy.cut()
        errors = []
        for _ in range(2):  # the dropped pooled connection, then a refused new one
            with pytest.raises(StorageConnectionError) as caught:
                await storage.save_session(ChatSession.create("secrets"))
            errors.append(caught.value)
    finally:
        await proxy.close()
        await storage.close()
    for error in errors:
        assert_hidden(error_text(error))
    assert_logs_hidden(every_log)


async def test_sqlalchemy_echo_hides_parameters_and_the_password(
    postgresql_url: str, every_log: pytest.LogCaptureFixture, figures: Figures
) -> None:
    storage = PostgreSQLSessionStorage(with_password(postgresql_url, CANARY), 1, 2)
    await storage.initialize()
    try:
        storage.engine.echo = True
        session = ChatSession.create("secrets", metadata={"note": CONTENT_CANARY})
        session.add_message("user", CONTENT_CANARY)
        await storage.save_session(session)
        await storage.search_messages(CONTENT_CANARY)
    finally:
        await storage.close()
    statements = [r for r in every_log.records if r.name.startswith("sqlalchemy.engine")]
    assert statements, "echo logged nothing"
    assert any("parameters hidden" in r.getMessage() for r in statements)
    assert CONTENT_CANARY not in every_log.text
    figures["log_records_checked"] = assert_logs_hidden(every_log)


@pytest.fixture(scope="module")
def password_server() -> Iterator[str]:
    """A private PostgreSQL that checks passwords (scram-sha-256); yields its URL."""
    binaries = Path("/usr/lib/postgresql")
    found = sorted(binaries.glob("*/bin/initdb")) if binaries.exists() else []
    initdb = shutil.which("initdb") or (str(found[-1]) if found else None)
    if initdb is None or os.geteuid() != 0 or shutil.which("runuser") is None:
        pytest.skip("needs initdb and root (runuser) to start a password-checking server")
    bin_dir = Path(initdb).parent
    root = Path(tempfile.mkdtemp(prefix="pgpw-"))
    shutil.chown(root, "postgres")
    (root / "pw").write_text("right-password\n")
    shutil.chown(root / "pw", "postgres")
    port = closed_port()
    run = ["runuser", "-u", "postgres", "--"]
    subprocess.run(
        [
            *run,
            str(bin_dir / "initdb"),
            *("-D", str(root / "data"), "--auth=scram-sha-256", f"--pwfile={root / 'pw'}"),
            *("-U", "postgres", "--no-sync"),
        ],
        check=True,
        capture_output=True,
    )
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
    ctl = [*run, str(bin_dir / "pg_ctl"), "-D", str(root / "data")]
    subprocess.run([*ctl, "-o", options, "-w", "-l", str(root / "log"), "start"], check=True)
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*ctl, "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


async def test_the_password_server_accepts_the_right_password(password_server: str) -> None:
    storage = PostgreSQLSessionStorage(with_password(password_server, "right-password"), 1, 1)
    await storage.initialize()
    await storage.close()


@pytest.mark.parametrize("password", [CANARY, ODD_CANARY])
async def test_wrong_password_errors_and_logs_never_show_the_password(
    password_server: str, password: str, every_log: pytest.LogCaptureFixture
) -> None:
    storage = PostgreSQLSessionStorage(with_password(password_server, password), 1, 1)
    with pytest.raises(PersistenceError) as caught:
        await storage.initialize()
    assert "password authentication failed" in str(caught.value)
    assert_hidden(error_text(caught.value), password)
    await storage.close()
    assert_logs_hidden(every_log, password)
    # And nothing is left behind in the event loop that would print it later.
    await asyncio.sleep(0)
