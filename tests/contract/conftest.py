"""Helpers of the contract suite: a second, independent view of the same store."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest

from persistence import PostgreSQLSessionStorage, SessionStorage, SQLiteSessionStorage

Reopen = Callable[[SessionStorage], Any]


@asynccontextmanager
async def _reopened(storage: SessionStorage) -> AsyncIterator[SessionStorage]:
    """Opens the same store through new connections, to see only what was committed."""
    other: SessionStorage
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


@pytest.fixture
def reopen() -> Reopen:
    return _reopened
