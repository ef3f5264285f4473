"""Where the test servers are: PERSISTENCE_TEST_* URL, then testcontainers, else skip.

`PERSISTENCE_TEST_REQUIRE=sqlite,postgresql` turns a missing server into a failure.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import pytest

REQUIRED = {
    name.strip()
    for name in os.environ.get("PERSISTENCE_TEST_REQUIRE", "").split(",")
    if name.strip()
}


def unavailable(backend: str, reason: str) -> None:
    """Skips the test with the reason, or fails it when the backend is required."""
    message = f"{backend}: {reason}"
    if backend in REQUIRED:
        pytest.fail(f"{message} (PERSISTENCE_TEST_REQUIRE names {backend})")
    pytest.skip(message)


def docker_answers() -> bool:
    try:
        import docker  # type: ignore[import-untyped]

        docker.from_env(timeout=3).ping()
    except Exception:
        return False
    return True


@contextmanager
def container_url(backend: str) -> Iterator[str | None]:
    """Starts a throwaway server in Docker, if an engine answers; yields its URL or None."""
    if not docker_answers():
        yield None
        return
    if backend == "postgresql":
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer("postgres:16-alpine", driver=None) as container:
            yield container.get_connection_url()
    else:
        from testcontainers.mongodb import MongoDbContainer

        with MongoDbContainer("mongo:7") as container:
            yield container.get_connection_url()


def plain_postgresql_url(url: str) -> str:
    for prefix in ("postgresql+asyncpg://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql://" + url[len(prefix) :]
    return url


def with_database(url: str, database: str) -> str:
    from sqlalchemy import make_url

    return make_url(url).set(database=database).render_as_string(hide_password=False)


async def _admin(url: str, statement: str) -> None:
    import asyncpg

    connection = await asyncpg.connect(plain_postgresql_url(url), timeout=10)
    try:
        await connection.execute(statement)
    finally:
        await connection.close()


@contextmanager
def throwaway_postgresql_database(admin_url: str) -> Iterator[str]:
    """Creates a database for the tests and drops it afterwards; yields its URL."""
    name = f"persistence_test_{uuid.uuid4().hex[:12]}"
    asyncio.run(_admin(admin_url, f'CREATE DATABASE "{name}"'))
    try:
        yield with_database(plain_postgresql_url(admin_url), name)
    finally:
        asyncio.run(_admin(admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


_TABLES = "chat_messages, chat_sessions, uploaded_files"


@asynccontextmanager
async def emptied_postgresql(url: str) -> AsyncIterator[Any]:
    """A PostgreSQLSessionStorage on `url`, at head and with every table emptied."""
    from sqlalchemy import text

    from persistence import PostgreSQLSessionStorage

    async with PostgreSQLSessionStorage(url, min_pool_size=1, max_pool_size=10) as storage:
        async with storage.engine.begin() as connection:
            await connection.execute(
                text(
                    "TRUNCATE chat_messages, chat_sessions, uploaded_files,"
                    " chat_session_deletions, chat_session_merges RESTART IDENTITY CASCADE"
                )
            )
            # The store's notes (a copy stopped by another test), never its id.
            await connection.execute(text("DELETE FROM persistence_store WHERE name <> 'store_id'"))
        yield storage


@asynccontextmanager
async def throwaway_mongodb(url: str) -> AsyncIterator[Any]:
    """A MongoDBSessionStorage on a database of its own, dropped afterwards."""
    from persistence.mongo.backend import MongoDBSessionStorage

    storage = MongoDBSessionStorage(url, database_name=f"persistence_test_{uuid.uuid4().hex[:12]}")
    await storage.initialize()
    try:
        yield storage
    finally:
        await storage.drop_database()
        await storage.close()


@asynccontextmanager
async def second_holder(storage: Any) -> AsyncIterator[Any]:
    """The same store through a storage of its own (its own connections), as another
    server process would see it."""
    from persistence import PostgreSQLSessionStorage, SQLiteSessionStorage

    other: Any
    if isinstance(storage, SQLiteSessionStorage):
        other = SQLiteSessionStorage(storage.database_path)
    elif isinstance(storage, PostgreSQLSessionStorage):
        other = PostgreSQLSessionStorage(
            storage.url.render_as_string(hide_password=False), min_pool_size=1, max_pool_size=2
        )
    else:
        from persistence.mongo.backend import MongoDBSessionStorage

        assert isinstance(storage, MongoDBSessionStorage)
        other = MongoDBSessionStorage(
            storage.connection_string, database_name=storage.database_name
        )
    async with other:
        yield other
