"""Stores of every backend on one event loop, for sync (hypothesis) and corpus tests."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from persistence import PostgreSQLSessionStorage, SessionStorage, SQLiteSessionStorage
from persistence.sql.sql_storage import SqlSessionStorage
from tests import servers


def same_store(storage: SessionStorage) -> SessionStorage:
    """Another storage object, with connections of its own, on the SQL store `storage`
    opened (not opened yet)."""
    if isinstance(storage, SQLiteSessionStorage):
        return SQLiteSessionStorage(storage.database_path)
    assert isinstance(storage, PostgreSQLSessionStorage)
    url = storage.url.render_as_string(hide_password=False)
    return PostgreSQLSessionStorage(url, min_pool_size=1, max_pool_size=2)


class Stores:
    """SQLite, PostgreSQL (a database of its own) and, with a URL, MongoDB."""

    def __init__(self, sqlite_path: Path, postgresql_url: str, mongodb_url: str | None) -> None:
        self.runner = asyncio.Runner()
        self.storages: list[SessionStorage] = [
            SQLiteSessionStorage(sqlite_path, synchronous="NORMAL"),
            PostgreSQLSessionStorage(postgresql_url, min_pool_size=1, max_pool_size=2),
        ]
        if mongodb_url:
            from persistence.mongo.backend import MongoDBSessionStorage

            database = f"persistence_search_{os.getpid()}_{id(self)}"
            self.storages.append(MongoDBSessionStorage(mongodb_url, database_name=database))
        for storage in self.storages:
            self.run(storage.initialize())
        # Where searches go: these storages, or copies opened for reading (read_only()).
        self.searchers: list[SessionStorage] = list(self.storages)
        # How a test module writes what it searches (test_parity.WRITES).
        self.writes = "documents-indexed"

    def pending(self) -> dict[str, int]:
        """Messages each SQL store holds without a search document yet."""

        async def count(storage: SqlSessionStorage) -> int:
            async with storage.engine.connect() as connection:
                query = text("SELECT count(*) FROM chat_messages WHERE search_text IS NULL")
                return int((await connection.execute(query)).scalar_one())

        return {
            storage.backend_name: self.run(count(storage))
            for storage in self.storages
            if isinstance(storage, SqlSessionStorage)
        }

    def index_for_search(self) -> None:
        """Writes every pending search document (SessionStorage.index_for_search)."""

        async def index_all() -> None:
            for storage in self.storages:
                await storage.index_for_search()

        self.run(index_all())

    def read_only(self) -> None:
        """Searches from now on go to the same stores opened for reading (never writing)."""
        self.searchers = [same_store(storage) for storage in self.storages[:2]]
        self.searchers += self.storages[2:]
        for storage in self.searchers[:2]:
            self.run(storage.open_for_reading())

    def run(self, coroutine: Any) -> Any:
        return self.runner.run(coroutine)

    def save(self, *sessions: Any, unit_of_work: bool = False) -> None:
        """Saves `sessions` in every store: one save_session each, or all in one unit of
        work (whose inserts never make a save write pending documents, indexing.py)."""

        async def save_all() -> None:
            for storage in self.storages:
                copies = [session.model_copy(deep=True) for session in sessions]
                if not unit_of_work:
                    for copy in copies:
                        await storage.save_session(copy)
                    continue
                async with storage.unit_of_work() as uow:
                    for copy in copies:
                        await uow.sessions.add(copy)
                    await uow.commit()

        self.run(save_all())

    def search(self, query: str, **options: Any) -> dict[str, list[str]]:
        """Each backend's hits, as message ids in the order returned."""

        async def search_all() -> dict[str, list[str]]:
            return {
                storage.backend_name: [
                    m.message_id for m in await storage.search_messages(query, **options)
                ]
                for storage in self.searchers
            }

        found: dict[str, list[str]] = self.run(search_all())
        return found

    def pages(self, query: str, batch_size: int, **options: Any) -> dict[str, list[list[str]]]:
        """Each backend's batches of iter_search_messages, as message ids in order."""

        async def page(storage: SessionStorage) -> list[list[str]]:
            return [
                [m.message_id for m in batch]
                async for batch in storage.iter_search_messages(query, batch_size, **options)
            ]

        async def page_all() -> dict[str, list[list[str]]]:
            return {storage.backend_name: await page(storage) for storage in self.searchers}

        found: dict[str, list[list[str]]] = self.run(page_all())
        return found

    def close(self) -> None:
        async def close_all() -> None:
            for storage in self.searchers[:2]:
                if storage not in self.storages:
                    await storage.close()
            for storage in self.storages:
                if storage.backend_name == "mongodb":
                    await storage.drop_database()  # type: ignore[attr-defined]
                await storage.close()

        self.run(close_all())
        self.runner.close()


@contextmanager
def opened_stores(
    tmp_path_factory: pytest.TempPathFactory, postgresql_admin_url: str
) -> Iterator[Stores]:
    mongodb_url = os.environ.get("PERSISTENCE_TEST_MONGODB_URL")
    with servers.throwaway_postgresql_database(postgresql_admin_url) as url:
        opened = Stores(tmp_path_factory.mktemp("search") / "sessions.db", url, mongodb_url)
        try:
            yield opened
        finally:
            opened.close()


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory, postgresql_admin_url: str) -> Iterator[Stores]:
    with opened_stores(tmp_path_factory, postgresql_admin_url) as opened:
        yield opened


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The URL of an empty database on each SQL backend, for alembic to migrate."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'store.db'}"
        return
    with servers.throwaway_postgresql_database(
        request.getfixturevalue("postgresql_admin_url")
    ) as database:
        yield database
