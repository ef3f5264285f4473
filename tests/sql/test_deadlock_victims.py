"""A plain save or delete that PostgreSQL picks as a deadlock's victim runs again.

Found by attack: with other writers' units of work taking two sessions in opposite
orders, about one plain save of those sessions in five failed with "deadlock
detected", though a plain save holds one session. The server rolls such a
transaction back whole, so the library runs it again (three times at most); a unit
of work is the caller's to run again, as the README says.

The deadlock is raised here by a trigger with PostgreSQL's own SQLSTATE (40P01), as
many times as a test asks: a sequence counts the attempts, as a sequence is not
rolled back with the transaction that advanced it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from sqlalchemy import text

from persistence import ChatSession, PersistenceError, PostgreSQLSessionStorage

pytestmark = pytest.mark.postgresql


_REMOVE = (
    "DROP FUNCTION IF EXISTS test_deadlock() CASCADE",
    "DROP SEQUENCE IF EXISTS test_attempts",
)


@pytest.fixture
async def storage(
    postgresql_storage: PostgreSQLSessionStorage,
) -> AsyncIterator[PostgreSQLSessionStorage]:
    """The store, rid of the test's trigger, function and sequence afterwards."""
    yield postgresql_storage
    async with postgresql_storage.engine.begin() as connection:
        for statement in _REMOVE:
            await connection.execute(text(statement))


async def _deadlock_first(storage: PostgreSQLSessionStorage, table: str, times: int) -> None:
    """The first `times` writes into `table` (BEFORE INSERT or DELETE) fail as deadlocks."""
    async with storage.engine.begin() as connection:
        for statement in _REMOVE:
            await connection.execute(text(statement))
        await connection.execute(text("CREATE SEQUENCE test_attempts"))
        await connection.execute(
            text(
                "CREATE FUNCTION test_deadlock() RETURNS trigger LANGUAGE plpgsql AS $$"
                f" BEGIN IF nextval('test_attempts') <= {times} THEN"
                " RAISE EXCEPTION 'deadlock detected' USING ERRCODE = '40P01'; END IF;"
                " RETURN COALESCE(NEW, OLD); END $$"
            )
        )
        await connection.execute(
            text(
                f"CREATE TRIGGER test_deadlock BEFORE INSERT OR DELETE ON {table}"
                " FOR EACH ROW EXECUTE FUNCTION test_deadlock()"
            )
        )


async def _attempts(storage: PostgreSQLSessionStorage) -> int:
    async with storage.engine.begin() as connection:
        return int(
            (await connection.execute(text("SELECT last_value FROM test_attempts"))).scalar_one()
        )


async def _no_more_deadlocks(storage: PostgreSQLSessionStorage, table: str) -> None:
    async with storage.engine.begin() as connection:
        await connection.execute(text(f"DROP TRIGGER test_deadlock ON {table}"))


async def _contents(storage: PostgreSQLSessionStorage, session_id: str) -> list[str] | None:
    loaded = await storage.load_session(session_id)
    return None if loaded is None else [message.content for message in loaded.messages]


async def _saved_then_deadlocking(storage: PostgreSQLSessionStorage, times: int) -> ChatSession:
    """A session saved with one message ("first"), then given a second ("second") to
    save, whose first `times` attempts will fail as deadlocks."""
    session = ChatSession.create("m")
    session.add_message("user", "first")
    await storage.save_session(session)
    await _deadlock_first(storage, "chat_messages", times=times)
    session.add_message("assistant", "second")
    return session


async def _saved_empty_then_deadlocking(
    storage: PostgreSQLSessionStorage, table: str
) -> ChatSession:
    """A session saved without messages, whose next write into `table` fails once as a
    deadlock."""
    session = ChatSession.create("m")
    await storage.save_session(session)
    await _deadlock_first(storage, table, times=1)
    return session


async def test_a_plain_save_picked_as_a_deadlock_victim_runs_again(
    storage: PostgreSQLSessionStorage,
) -> None:
    session = await _saved_then_deadlocking(storage, times=2)
    assert await storage.save_session(session) is True

    assert await _attempts(storage) == 3
    assert await _contents(storage, session.session_id) == ["first", "second"]
    session.add_message("user", "third")  # the object knows what it saved
    assert await storage.save_session(session) is True
    assert await _contents(storage, session.session_id) == ["first", "second", "third"]


async def test_a_save_that_stays_a_deadlock_victim_fails_after_three_attempts(
    storage: PostgreSQLSessionStorage,
) -> None:
    session = await _saved_then_deadlocking(storage, times=3)
    with pytest.raises(PersistenceError, match="deadlock detected"):
        await storage.save_session(session)

    assert await _attempts(storage) == 3
    assert await _contents(storage, session.session_id) == ["first"]
    await _no_more_deadlocks(storage, "chat_messages")
    assert await storage.save_session(session) is True
    assert await _contents(storage, session.session_id) == ["first", "second"]


async def test_a_delete_picked_as_a_deadlock_victim_runs_again(
    storage: PostgreSQLSessionStorage,
) -> None:
    session = await _saved_empty_then_deadlocking(storage, "chat_sessions")

    assert await storage.delete_session(session.session_id) is True

    assert await _attempts(storage) == 2
    assert await storage.load_session(session.session_id) is None


async def test_a_unit_of_work_picked_as_a_deadlock_victim_is_the_callers_to_run_again(
    storage: PostgreSQLSessionStorage,
) -> None:
    session = await _saved_empty_then_deadlocking(storage, "chat_messages")

    session.add_message("user", "in a unit")
    with pytest.raises(PersistenceError, match="deadlock detected"):
        async with storage.unit_of_work() as uow:
            await uow.sessions.add(session)
            await uow.commit()

    assert await _attempts(storage) == 1
    assert await _contents(storage, session.session_id) == []
