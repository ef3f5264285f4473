"""SQLite's pool rolls back a connection it takes back inside a transaction.

The pool's own reset rolled back every connection it took back: one more hop to the
connection's thread for each unit of work, after its COMMIT had ended the transaction
(test_statements.py counts the hops now). Its replacement (engines.sqlite_engine) rolls
back only a transaction still open, and that it must still do.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import aiosqlite
import pytest

from persistence import SQLiteSessionStorage
from persistence.sql.checkout import driver_connection
from tests.factories import conversation


@pytest.fixture
def rollbacks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Each rollback that reaches aiosqlite (the pool's reset goes through it)."""
    calls: list[int] = []
    original = aiosqlite.Connection.rollback

    async def counted(self: aiosqlite.Connection) -> None:
        calls.append(1)
        await original(self)

    monkeypatch.setattr(aiosqlite.Connection, "rollback", counted)
    return calls


async def test_a_connection_given_back_inside_a_transaction_is_rolled_back(
    tmp_path: Path, rollbacks: list[int]
) -> None:
    path = tmp_path / "s.db"
    async with SQLiteSessionStorage(path, busy_timeout=0.2) as storage:
        session = conversation(1)
        await storage.save_session(session)
        rollbacks.clear()  # the dialect's own, when the engine first connects

        async with driver_connection(storage.engine) as driver:
            await driver.execute("BEGIN IMMEDIATE")
            await driver.execute("DELETE FROM chat_messages")
            held: Any = driver

        # Taken back with its transaction open: rolled back, the write lock released.
        assert rollbacks == [1]
        assert not held._connection.in_transaction
        other = sqlite3.connect(path, timeout=0.2, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
            other.execute("ROLLBACK")
        finally:
            other.close()
        loaded = await storage.load_session(session.session_id)
        assert loaded is not None and loaded.message_count == 1
        # The pool lends the same connection again, clean.
        async with driver_connection(storage.engine) as again:
            assert again is held
            assert not again._connection.in_transaction
