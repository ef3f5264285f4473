"""Pooled PostgreSQL connections the server ended between calls fail no call.

Two ways a connection ends while it sits in the pool:

- the server ends it (`pg_terminate_backend`, a restart) and the end reaches the
  socket, but the event loop has not read it yet: the termination here blocks the loop
  until the backends have exited, as a busy loop or a call right after the end would;
- the server host goes away and the client learns only when it sends (a proxy
  severs the links quietly): there a checkout's first call finds the connection dead.

Every public operation then succeeds once, with what the store holds; a call that may
have landed (a statement after others in a transaction, a write sent without BEGIN)
is never sent again: it fails as before.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import pytest

from persistence import (
    ChatSession,
    PostgreSQLSessionStorage,
    StorageConnectionError,
)
from persistence.sql.runner import traced
from tests.reliability.support import postgresql_state, through_proxy
from tests.servers import plain_postgresql_url

pytestmark = pytest.mark.postgresql

MakeStorage = Callable[..., Awaitable[PostgreSQLSessionStorage]]
POOL = 3


async def _terminate(url: str) -> int:
    admin = await asyncpg.connect(plain_postgresql_url(url))
    try:
        return int(
            await admin.fetchval(
                "SELECT count(pg_terminate_backend(pid, 10000)) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                " AND backend_type = 'client backend'"
            )
        )
    finally:
        await admin.close()


def terminate_blocking(url: str) -> int:
    """Ends every backend of the test database but the caller's, and returns only once
    they have exited and their end reached the sockets, without letting the caller's
    event loop run meanwhile: the driver cannot know before its next call."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        killed = pool.submit(asyncio.run, _terminate(url)).result()
    time.sleep(0.05)
    return killed


async def _pool_filled(storage: PostgreSQLSessionStorage, session: ChatSession) -> None:
    """Leaves POOL idle connections in the pool, each of which has served a call."""
    await asyncio.gather(*(storage.load_session(session.session_id) for _ in range(POOL)))
    assert storage.engine.pool.checkedin() == POOL


async def _seeded(storage: PostgreSQLSessionStorage) -> ChatSession:
    session = ChatSession.create("faults", metadata={"title": "seeded"})
    session.add_message("user", "the quick brown fox")
    session.add_message("assistant", "jumps over the lazy dog")
    await storage.save_session(session)
    return session


async def _load(storage: PostgreSQLSessionStorage, session: ChatSession) -> Any:
    loaded = await storage.load_session(session.session_id)
    assert loaded is not None
    return [m.content for m in loaded.messages]


async def _list(storage: PostgreSQLSessionStorage, session: ChatSession) -> Any:
    return [found.session_id for found in await storage.list_sessions()]


async def _search(storage: PostgreSQLSessionStorage, session: ChatSession) -> Any:
    return [m.content for m in await storage.search_messages("lazy")]


async def _count(storage: PostgreSQLSessionStorage, session: ChatSession) -> Any:
    return (await storage.count()).messages


async def _append(storage: PostgreSQLSessionStorage, session: ChatSession) -> Any:
    session.add_message("user", "appended after the end")
    assert await storage.save_session(session)
    return await _load(storage, session)


async def _new_with_messages(storage: PostgreSQLSessionStorage, session: ChatSession) -> Any:
    created = ChatSession.create("faults")
    created.add_message("user", "a new session, in a transaction")
    assert await storage.save_session(created)
    return await _load(storage, created)


async def _unit_of_work(storage: PostgreSQLSessionStorage, session: ChatSession) -> Any:
    session.add_message("user", "in a unit of work")
    async with storage.unit_of_work() as uow:
        assert await uow.sessions.get(session.session_id) is not None
        await uow.sessions.add(session)
        await uow.commit()
    return await _load(storage, session)


async def _delete(storage: PostgreSQLSessionStorage, session: ChatSession) -> Any:
    assert await storage.delete_session(session.session_id) is True
    return await storage.load_session(session.session_id)


SEEDED = ["the quick brown fox", "jumps over the lazy dog"]
OPERATIONS: dict[str, tuple[Callable[..., Awaitable[Any]], Any]] = {
    "load_session": (_load, SEEDED),
    "list_sessions": (_list, None),  # the seeded session's id
    "search_messages": (_search, ["jumps over the lazy dog"]),
    "count": (_count, 2),
    "save_session append": (_append, [*SEEDED, "appended after the end"]),
    "save_session new": (_new_with_messages, ["a new session, in a transaction"]),
    "unit of work": (_unit_of_work, [*SEEDED, "in a unit of work"]),
    "delete_session": (_delete, None),
}


async def _check_stored_once(url: str) -> None:
    """Every stored session's messages are whole: none twice, positions dense."""
    state = await postgresql_state(url)
    assert state.problems == []
    for ids in state.messages.values():
        assert len(ids) == len(set(ids))


@pytest.mark.parametrize("operation", OPERATIONS)
async def test_each_operation_succeeds_once_after_the_server_ended_every_pooled_connection(
    make_postgresql: MakeStorage, postgresql_url: str, operation: str
) -> None:
    storage = await make_postgresql(min_pool_size=POOL, max_pool_size=POOL + 2)
    session = await _seeded(storage)
    await _pool_filled(storage, session)
    call, expected = OPERATIONS[operation]
    if expected is None and operation == "list_sessions":
        expected = [session.session_id]

    # At least the pool's: an autovacuum worker or a closing connection may be there too.
    assert terminate_blocking(postgresql_url) >= POOL
    assert await call(storage, session) == expected

    assert storage.engine.pool.checkedout() == 0
    await _check_stored_once(postgresql_url)


async def test_every_ended_connection_of_the_pool_is_replaced_failing_no_call(
    make_postgresql: MakeStorage, postgresql_url: str
) -> None:
    """All the pool's idle connections ended at once (a restart): as many calls at
    once as the pool holds, then more, and none fails."""
    storage = await make_postgresql(min_pool_size=POOL, max_pool_size=POOL + 2)
    session = await _seeded(storage)
    await _pool_filled(storage, session)

    # At least the pool's: an autovacuum worker or a closing connection may be there too.
    assert terminate_blocking(postgresql_url) >= POOL
    loaded = await asyncio.gather(
        *(storage.load_session(session.session_id) for _ in range(POOL + 2))
    )
    assert all(found is not None and found.messages == session.messages for found in loaded)
    for turn in range(POOL + 2):
        session.add_message("user", f"after the end {turn}")
        assert await storage.save_session(session)
    found = await storage.load_session(session.session_id)
    assert found is not None and found.messages == session.messages
    await _check_stored_once(postgresql_url)


async def test_a_write_after_another_in_its_transaction_is_not_sent_again(
    make_postgresql: MakeStorage, postgresql_url: str
) -> None:
    """The server ends the connection after the transaction's first write statement:
    the save fails as it did (StorageConnectionError), now naming the server's reason
    rather than asyncpg's refusal to roll back on a closed connection; nothing of it
    is stored, no statement is sent twice, and the next save stores it once."""
    storage = await make_postgresql(min_pool_size=1, max_pool_size=2)
    created = ChatSession.create("faults")
    created.add_message("user", "first")
    created.add_message("assistant", "second")
    sent: list[str] = []

    def end_before_the_second(sql: str) -> None:
        sent.append(sql)
        if len(sent) == 2:
            terminate_blocking(postgresql_url)

    with (
        traced(end_before_the_second),
        pytest.raises(StorageConnectionError, match="due to administrator command"),
    ):
        await storage.save_session(created)
    assert len(sent) == 2, sent
    assert await storage.load_session(created.session_id) is None
    assert storage.has_unsaved_changes(created)

    assert await storage.save_session(created)
    loaded = await storage.load_session(created.session_id)
    assert loaded is not None and [m.content for m in loaded.messages] == ["first", "second"]
    await _check_stored_once(postgresql_url)


RETRIED = ["load_session", "list_sessions", "search_messages", "count", "save_session new"]


@pytest.mark.parametrize("operation", [*RETRIED, "unit of work"])
async def test_a_first_call_that_finds_its_connection_gone_is_sent_again_once(
    make_postgresql: MakeStorage, postgresql_url: str, operation: str
) -> None:
    """The server went away without a word (the proxy severs every link quietly): the
    checkout's first call, a read's statement or a transaction's BEGIN, finds the
    connection dead; nothing was committed, so it goes again on a fresh connection."""
    storage, proxy = await through_proxy(
        make_postgresql, postgresql_url, min_pool_size=POOL, max_pool_size=POOL + 2
    )
    try:
        session = await _seeded(storage)
        await _pool_filled(storage, session)
        call, expected = OPERATIONS[operation]
        if expected is None:
            expected = [session.session_id]

        proxy.sever_quietly()
        assert await call(storage, session) == expected
        # The pool's other connections, made before the end, are replaced: none fails.
        for _ in range(POOL + 2):
            assert session.session_id in await _list(storage, session)
            assert await _count(storage, session) >= 2
    finally:
        await proxy.close()
    await _check_stored_once(postgresql_url)


async def test_a_write_sent_without_begin_that_finds_its_connection_gone_is_not_sent_again(
    make_postgresql: MakeStorage, postgresql_url: str
) -> None:
    """An append is one statement, its own commit: the connection's end may have come
    after the server ran it, so it fails as before, and the next save finds out."""
    storage, proxy = await through_proxy(
        make_postgresql, postgresql_url, min_pool_size=POOL, max_pool_size=POOL + 2
    )
    try:
        session = await _seeded(storage)
        await _pool_filled(storage, session)
        sent: list[str] = []
        proxy.sever_quietly()
        session.add_message("user", "maybe landed")
        with traced(sent.append), pytest.raises(StorageConnectionError):
            await storage.save_session(session)
        assert len(sent) == 1
        assert storage.has_unsaved_changes(session)
        # The other connections the server ended are replaced: the next save succeeds.
        assert await storage.save_session(session)
        assert await _load(storage, session) == [*SEEDED, "maybe landed"]
    finally:
        await proxy.close()
    await _check_stored_once(postgresql_url)
