"""Stores of every backend on one event loop, for sync (hypothesis) and corpus tests."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from persistence import PostgreSQLSessionStorage, SessionStorage, SQLiteSessionStorage
from tests import servers


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

    def run(self, coroutine: Any) -> Any:
        return self.runner.run(coroutine)

    def save(self, *sessions: Any) -> None:
        async def save_all() -> None:
            for storage in self.storages:
                for session in sessions:
                    await storage.save_session(session.model_copy(deep=True))

        self.run(save_all())

    def search(self, query: str, **options: Any) -> dict[str, list[str]]:
        """Each backend's hits, as message ids in the order returned."""

        async def search_all() -> dict[str, list[str]]:
            return {
                storage.backend_name: [
                    m.message_id for m in await storage.search_messages(query, **options)
                ]
                for storage in self.storages
            }

        found: dict[str, list[str]] = self.run(search_all())
        return found

    def close(self) -> None:
        async def close_all() -> None:
            for storage in self.storages:
                if storage.backend_name == "mongodb":
                    await storage.drop_database()  # type: ignore[attr-defined]
                await storage.close()

        self.run(close_all())
        self.runner.close()


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory, postgresql_admin_url: str) -> Iterator[Stores]:
    mongodb_url = os.environ.get("PERSISTENCE_TEST_MONGODB_URL")
    with servers.throwaway_postgresql_database(postgresql_admin_url) as url:
        opened = Stores(tmp_path_factory.mktemp("search") / "sessions.db", url, mongodb_url)
        try:
            yield opened
        finally:
            opened.close()
