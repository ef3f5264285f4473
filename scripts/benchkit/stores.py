"""Fresh stores: a SQLite file in a temp directory, a PostgreSQL database made and
dropped, a MongoDB database named for one worker and dropped afterwards."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import urlsplit, urlunsplit


def plain_postgresql_url(url: str) -> str:
    """asyncpg only takes postgresql:// (or postgres://)."""
    scheme, rest = url.split("://", 1)
    return f"postgresql://{rest}" if scheme.startswith("postgres") else url


def with_database(url: str, database: str) -> str:
    parts = urlsplit(plain_postgresql_url(url))
    return urlunsplit(parts._replace(path=f"/{database}"))


def unique_name(tag: str) -> str:
    safe = "".join(ch if ch.isalnum() else "_" for ch in tag.lower())
    return f"bench_{safe}_{os.getpid()}_{uuid.uuid4().hex[:6]}"


async def _admin(admin_url: str, statement: str) -> None:
    import asyncpg

    connection = await asyncpg.connect(plain_postgresql_url(admin_url), timeout=10)
    try:
        await connection.execute(statement)
    finally:
        await connection.close()


@asynccontextmanager
async def sqlite_store(tag: str) -> AsyncIterator[str]:
    directory = tempfile.mkdtemp(prefix=f"bench-{tag}-")
    try:
        yield os.path.join(directory, "store.db")
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@asynccontextmanager
async def postgresql_store(admin_url: str, tag: str) -> AsyncIterator[str]:
    name = unique_name(tag)
    await _admin(admin_url, f'CREATE DATABASE "{name}"')
    try:
        yield with_database(admin_url, name)
    finally:
        await _admin(admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@asynccontextmanager
async def mongodb_store(url: str, tag: str) -> AsyncIterator[str]:
    """Yields the database name; the URL stays the caller's."""
    from pymongo import AsyncMongoClient

    name = unique_name(tag)
    try:
        yield name
    finally:
        client: AsyncMongoClient[dict[str, object]] = AsyncMongoClient(url)
        try:
            await client.drop_database(name)
        finally:
            await client.close()


@asynccontextmanager
async def fresh_store(backend: str, urls: dict[str, str], tag: str) -> AsyncIterator[str]:
    """A new, empty store for `backend`: a file path, a database URL or a database name."""
    if backend == "sqlite":
        async with sqlite_store(tag) as path:
            yield path
    elif backend == "postgresql":
        async with postgresql_store(urls["postgresql"], tag) as url:
            yield url
    elif backend == "mongodb":
        async with mongodb_store(urls["mongodb"], tag) as name:
            yield name
    else:
        raise ValueError(f"unknown backend {backend!r}")
