"""Backend fixtures on real servers: a SQLite temp file, PostgreSQL, MongoDB."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from persistence import PostgreSQLSessionStorage, SessionStorage, SQLiteSessionStorage
from tests import servers
from tests.filesystems import mounted_tmpfs

BACKENDS = ["sqlite", "postgresql", "mongodb"]


@pytest.fixture(scope="session")
def postgresql_admin_url() -> Iterator[str]:
    """A PostgreSQL server on which the tests may create databases."""
    url = os.environ.get("PERSISTENCE_TEST_POSTGRES_URL")
    if url:
        yield url
        return
    with servers.container_url("postgresql") as started:
        if started is None:
            servers.unavailable(
                "postgresql",
                "no PERSISTENCE_TEST_POSTGRES_URL and no Docker engine for testcontainers",
            )
        assert started is not None
        yield started


@pytest.fixture(scope="session")
def postgresql_url(postgresql_admin_url: str) -> Iterator[str]:
    """One throwaway database for the session, emptied before every test that uses it."""
    with servers.throwaway_postgresql_database(postgresql_admin_url) as url:
        yield url


@pytest.fixture(scope="session")
def mongodb_url() -> Iterator[str]:
    url = os.environ.get("PERSISTENCE_TEST_MONGODB_URL")
    if url:
        yield url
        return
    with servers.container_url("mongodb") as started:
        if started is None:
            servers.unavailable(
                "mongodb",
                "no MongoDB server: set PERSISTENCE_TEST_MONGODB_URL (no Docker engine"
                " answers for testcontainers, and no MongoDB can run on this machine)",
            )
        assert started is not None
        yield started


@pytest.fixture
def workdir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """An empty current directory, and no STORAGE_* variable or config file leaking in."""
    for name in list(os.environ):
        if name.upper().startswith("STORAGE_") or name == "PERSISTENCE_CONFIG":
            monkeypatch.delenv(name)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    yield work


@pytest.fixture
def full_filesystem(tmp_path: Path) -> Iterator[Path]:
    """A directory on a tmpfs of 64 KiB that a file fills but for 8 KiB (root only;
    skipped where it cannot be mounted): writing more there fails with "No space left
    on device". Not all of it: `tempfile` passes over a directory it cannot write a
    test file in, for /tmp."""
    with mounted_tmpfs(tmp_path / "full", "size=64k") as mount:
        with contextlib.suppress(OSError), open(mount / "filler", "wb") as filler:
            filler.write(b"\0" * 56 * 1024)
        yield mount


@pytest.fixture
def sqlite_path(tmp_path: Path) -> Path:
    return tmp_path / "sessions.db"


@pytest.fixture
async def sqlite_storage(sqlite_path: Path) -> AsyncIterator[SQLiteSessionStorage]:
    storage = SQLiteSessionStorage(sqlite_path)
    await storage.initialize()
    yield storage
    await storage.close()


@pytest.fixture
async def postgresql_storage(postgresql_url: str) -> AsyncIterator[PostgreSQLSessionStorage]:
    async with servers.emptied_postgresql(postgresql_url) as storage:
        yield storage


@pytest.fixture
async def mongodb_storage(mongodb_url: str) -> AsyncIterator[SessionStorage]:
    async with servers.throwaway_mongodb(mongodb_url) as storage:
        yield storage


@pytest.fixture(params=BACKENDS)
def storage(request: pytest.FixtureRequest) -> SessionStorage:
    # Plain def: it only picks which async fixture pytest should build.
    request.applymarker(getattr(pytest.mark, request.param))
    return request.getfixturevalue(f"{request.param}_storage")  # type: ignore[no-any-return]


@pytest.fixture(params=["sqlite", "postgresql"])
def sql_storage(request: pytest.FixtureRequest) -> SessionStorage:
    request.applymarker(getattr(pytest.mark, request.param))
    return request.getfixturevalue(f"{request.param}_storage")  # type: ignore[no-any-return]
