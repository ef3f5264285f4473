"""Pairs of real stores for the transfer tests: any backend to any other."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from persistence import PostgreSQLSessionStorage, SessionStorage, SQLiteSessionStorage
from tests import servers

# (source, destination); a backend paired with itself uses a second store of its kind.
PAIRS = [
    ("sqlite", "postgresql"),
    ("postgresql", "sqlite"),
    ("sqlite", "sqlite"),
    ("postgresql", "postgresql"),
    ("sqlite", "mongodb"),
    ("mongodb", "postgresql"),
]


@pytest.fixture(scope="session")
def other_postgresql_url(postgresql_admin_url: str) -> Iterator[str]:
    with servers.throwaway_postgresql_database(postgresql_admin_url) as url:
        yield url


@pytest.fixture
async def other_sqlite(tmp_path: Path) -> AsyncIterator[SQLiteSessionStorage]:
    storage = SQLiteSessionStorage(tmp_path / "other.db")
    await storage.initialize()
    yield storage
    await storage.close()


@pytest.fixture
async def other_postgresql(other_postgresql_url: str) -> AsyncIterator[PostgreSQLSessionStorage]:
    async with servers.emptied_postgresql(other_postgresql_url) as storage:
        yield storage


@pytest.fixture
async def other_mongodb(mongodb_url: str) -> AsyncIterator[SessionStorage]:
    async with servers.throwaway_mongodb(mongodb_url) as storage:
        yield storage


def _store(request: pytest.FixtureRequest, backend: str, *, other: bool) -> SessionStorage:
    request.applymarker(getattr(pytest.mark, backend))
    name = f"other_{backend}" if other else f"{backend}_storage"
    return request.getfixturevalue(name)  # type: ignore[no-any-return]


@pytest.fixture(params=PAIRS, ids=[f"{a}-to-{b}" for a, b in PAIRS])
def pair(request: pytest.FixtureRequest) -> tuple[SessionStorage, SessionStorage]:
    # Plain def: it only picks which async fixtures pytest should build.
    source_backend, destination_backend = request.param
    source = _store(request, source_backend, other=False)
    destination = _store(request, destination_backend, other=destination_backend == source_backend)
    return source, destination


@pytest.fixture(params=["sqlite", "postgresql"])
def sql_pair(request: pytest.FixtureRequest) -> tuple[SessionStorage, SessionStorage]:
    """A source and a SQL destination the tests may tamper with behind the API's back."""
    destination = _store(request, request.param, other=False)
    source_backend = "postgresql" if request.param == "sqlite" else "sqlite"
    return _store(request, source_backend, other=False), destination
