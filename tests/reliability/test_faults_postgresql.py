"""PostgreSQL connections killed and the server cut off under load.

The operation in flight fails with StorageConnectionError (or succeeds), the pool
recovers, and nothing is half written: every save either landed whole or not at all.
"""

from __future__ import annotations

import asyncio
import gc
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import asyncpg
import pytest
from sqlalchemy import make_url

from persistence import (
    ChatSession,
    PersistenceError,
    PostgreSQLSessionStorage,
    StorageConnectionError,
)
from tests.reliability.conftest import Figures, Scale
from tests.reliability.support import TcpProxy, postgresql_state, through_proxy
from tests.servers import plain_postgresql_url

pytestmark = pytest.mark.postgresql

MakeStorage = Callable[..., Awaitable[PostgreSQLSessionStorage]]
WRITERS = 8


@dataclass
class Load:
    """Writers appending to own and shared sessions until told to stop."""

    storage: PostgreSQLSessionStorage
    saves: int = 0
    failures: list[BaseException] = field(default_factory=list)
    sessions: list[ChatSession] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def writer(self, index: int) -> None:
        own = ChatSession.create("faults", session_id=f"writer-{index}")
        shared = ChatSession.create("faults", session_id="shared")
        self.sessions += [own, shared]
        rng = random.Random(index)
        seq = 0
        while not self.stop.is_set():
            target = own if rng.random() < 0.5 else shared
            target.add_message("user", f"writer-{index} {seq}")
            seq += 1
            try:
                await self.storage.save_session(target)
            except StorageConnectionError as exc:
                self.failures.append(exc)
                await asyncio.sleep(0.005)
                continue
            self.saves += 1
        for target in (own, shared):
            await self.save_after_recovery(target)

    async def save_after_recovery(self, session: ChatSession) -> None:
        """The pool must recover: a few attempts drain connections that died in it."""
        for _ in range(self.storage.max_pool_size + 3):
            try:
                await self.storage.save_session(session)
                return
            except StorageConnectionError as exc:
                self.failures.append(exc)
                await asyncio.sleep(0.05)
        raise AssertionError("the pool did not recover")

    async def run(self, disrupt: Callable[[], Awaitable[None]]) -> None:
        writers = [asyncio.ensure_future(self.writer(i)) for i in range(WRITERS)]
        try:
            await disrupt()
        finally:
            self.stop.set()
        await asyncio.gather(*writers)

    async def check_nothing_half_written(self, url: str) -> int:
        state = await postgresql_state(url)
        assert state.problems == []
        expected = {m.message_id for session in self.sessions for m in session.messages}
        stored = {m for ids in state.messages.values() for m in ids}
        assert stored == expected
        assert state.rows == len(expected)
        assert self.storage.engine.pool.checkedout() == 0
        return state.rows


def _url(storage: PostgreSQLSessionStorage) -> str:
    return storage.url.render_as_string(hide_password=False)


async def test_connections_terminated_under_load_fail_cleanly_and_the_pool_recovers(
    make_postgresql: MakeStorage, postgresql_url: str, scale: Scale, figures: Figures
) -> None:
    storage = await make_postgresql(min_pool_size=2, max_pool_size=4)
    database = make_url(postgresql_url).database
    admin = await asyncpg.connect(plain_postgresql_url(postgresql_url))
    rounds = scale.n(15, 300)
    terminated = 0

    async def terminate() -> None:
        nonlocal terminated
        for _ in range(rounds):
            await asyncio.sleep(0.1)
            killed = await admin.fetch(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = $1 AND pid <> pg_backend_pid()",
                database,
            )
            terminated += sum(1 for row in killed if row[0])

    load = Load(storage)
    try:
        await load.run(terminate)
    finally:
        await admin.close()
    rows = await load.check_nothing_half_written(_url(storage))
    assert terminated > 0
    assert all(isinstance(f, StorageConnectionError) for f in load.failures)
    assert load.saves > 0
    figures["writers"] = WRITERS
    figures["kill_rounds"] = rounds
    figures["backends_terminated"] = terminated
    figures["saves_acknowledged"] = load.saves
    figures["saves_failed_cleanly"] = len(load.failures)
    figures["messages"] = rows
    figures["lost"] = 0


async def test_server_cut_off_and_restored_fails_cleanly_and_the_pool_recovers(
    make_postgresql: MakeStorage, postgresql_url: str, scale: Scale, figures: Figures
) -> None:
    target = make_url(postgresql_url)
    proxy = TcpProxy(target.host or "127.0.0.1", target.port or 5432)
    await proxy.start()
    through_proxy = target.set(host="127.0.0.1", port=proxy.port)
    storage = await make_postgresql(
        through_proxy.render_as_string(hide_password=False),
        min_pool_size=2,
        max_pool_size=4,
        connect_timeout=2,
    )
    cuts = scale.n(8, 100)

    async def cut_and_restore() -> None:
        for _ in range(cuts):
            await asyncio.sleep(0.1)
            await proxy.cut()
            await asyncio.sleep(0.1)
            await proxy.restore()

    load = Load(storage)
    try:
        await load.run(cut_and_restore)
        rows = await load.check_nothing_half_written(postgresql_url)
    finally:
        await proxy.close()
    assert load.failures, "cutting the server off made no operation fail"
    assert all(isinstance(f, StorageConnectionError) for f in load.failures)
    figures["writers"] = WRITERS
    figures["cuts"] = cuts
    figures["saves_acknowledged"] = load.saves
    figures["saves_failed_cleanly"] = len(load.failures)
    figures["messages"] = rows
    figures["lost"] = 0


async def _through_proxy(
    make_postgresql: MakeStorage, postgresql_url: str
) -> tuple[PostgreSQLSessionStorage, TcpProxy]:
    return await through_proxy(make_postgresql, postgresql_url, min_pool_size=1, max_pool_size=2)


async def _stored_message_ids(url: str, session_id: str) -> list[str]:
    state = await postgresql_state(url)
    assert state.problems == []
    return state.messages.get(session_id, [])


async def test_a_save_whose_acknowledgement_was_lost_is_retried_without_duplicates(
    make_postgresql: MakeStorage, postgresql_url: str
) -> None:
    storage, proxy = await _through_proxy(make_postgresql, postgresql_url)
    try:
        session = ChatSession.create("faults")
        session.add_message("user", "first")
        await storage.save_session(session)
        session.add_message("user", "warms the append's prepared statement")
        await storage.save_session(session)
        # An append is one statement (no COMMIT): the server runs it, the answer is lost.
        session.add_message("user", "landed, ack lost")
        proxy.lose_next_answer()
        with pytest.raises(StorageConnectionError):
            await storage.save_session(session)
        landed = await _stored_message_ids(postgresql_url, session.session_id)
        assert landed == [m.message_id for m in session.messages]
        session.add_message("user", "third")
        await storage.save_session(session)
        loaded = await storage.load_session(session.session_id)
    finally:
        await proxy.close()
    assert loaded is not None
    assert [m.content for m in loaded.messages] == [
        "first",
        "warms the append's prepared statement",
        "landed, ack lost",
        "third",
    ]
    assert loaded.message_count == 4


@pytest.mark.parametrize("then", ["append", "pop"])
async def test_a_unit_of_work_whose_commit_ack_was_lost_is_retried_without_duplicates(
    make_postgresql: MakeStorage, postgresql_url: str, then: str
) -> None:
    storage, proxy = await _through_proxy(make_postgresql, postgresql_url)
    try:
        session = ChatSession.create("faults")
        session.add_message("user", "first")
        await storage.save_session(session)
        session.add_message("user", "landed, ack lost")
        proxy.lose_next_commit_ack()
        with pytest.raises(StorageConnectionError):
            async with storage.unit_of_work() as uow:
                await uow.sessions.add(session)
                await uow.commit()
        landed = await _stored_message_ids(postgresql_url, session.session_id)
        assert landed == [m.message_id for m in session.messages]
        if then == "append":
            session.add_message("user", "third")
        else:
            # The message it stored, removed before the retry: removed from the store.
            session.pop_message()
        async with storage.unit_of_work() as uow:
            await uow.sessions.add(session)
            await uow.commit()
        loaded = await storage.load_session(session.session_id)
    finally:
        await proxy.close()
    assert loaded is not None
    expected = ["first", "landed, ack lost", "third"] if then == "append" else ["first"]
    assert [m.content for m in loaded.messages] == expected
    assert loaded.message_count == len(expected)


async def test_a_unit_of_work_whose_commit_failed_is_sent_again_by_the_next_save(
    make_postgresql: MakeStorage, postgresql_url: str
) -> None:
    # The link is cut before the COMMIT: nothing of the unit landed. What it wrote must
    # not count as stored: the next save sends it (and later changes) again.
    storage, proxy = await _through_proxy(make_postgresql, postgresql_url)
    try:
        session = ChatSession.create("faults")
        session.add_message("user", "first")
        await storage.save_session(session)
        session.add_message("user", "in the failed unit")
        session.metadata["title"] = "set in the failed unit"
        with pytest.raises(StorageConnectionError):
            async with storage.unit_of_work() as uow:
                await uow.sessions.add(session)
                await proxy.cut()
                await uow.commit()
        await proxy.restore()
        assert await _stored_message_ids(postgresql_url, session.session_id) == [
            session.messages[0].message_id
        ]
        assert storage.has_unsaved_changes(session)
        session.add_message("user", "third")
        await storage.save_session(session)
        loaded = await storage.load_session(session.session_id)
    finally:
        await proxy.close()
    assert loaded is not None
    assert [m.content for m in loaded.messages] == ["first", "in the failed unit", "third"]
    assert loaded.metadata == {"title": "set in the failed unit"}


async def test_a_unit_of_work_whose_connection_was_killed_between_works_commits_nothing(
    make_postgresql: MakeStorage, postgresql_url: str
) -> None:
    storage = await make_postgresql(min_pool_size=1, max_pool_size=2)
    first = ChatSession.create("faults")
    first.add_message("user", "in the unit")
    second = ChatSession.create("faults")
    admin = await asyncpg.connect(plain_postgresql_url(postgresql_url))
    try:
        with pytest.raises(StorageConnectionError):
            async with storage.unit_of_work() as uow:
                await uow.sessions.add(first)
                killed = await admin.fetchval(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                    " AND state LIKE 'idle in transaction%'"
                )
                assert killed == 1
                try:
                    await uow.sessions.add(second)
                finally:
                    # The unit refuses more work on a connection it knows is gone.
                    with pytest.raises(PersistenceError, match="interrupted"):
                        await uow.files.delete("any")
    finally:
        await admin.close()

    assert await storage.load_session(first.session_id) is None
    assert await storage.load_session(second.session_id) is None
    # The connection was dropped, not given back: the pool goes on, and the rolled
    # back unit's messages are sent again by the next save.
    await storage.save_session(first)
    loaded = await storage.load_session(first.session_id)
    assert loaded is not None and [m.content for m in loaded.messages] == ["in the unit"]


async def test_connections_closed_by_the_server_while_idle_fail_no_call(
    make_postgresql: MakeStorage, postgresql_url: str
) -> None:
    """Found by attack: after a restart, failover or idle timeout closed the pooled
    connections, each failed one call as "database unreachable", though asyncpg knew
    it was closed."""
    storage = await make_postgresql(min_pool_size=4, max_pool_size=6)
    session = ChatSession.create("faults")
    await storage.save_session(session)
    await asyncio.gather(*(storage.load_session(session.session_id) for _ in range(6)))
    admin = await asyncpg.connect(plain_postgresql_url(postgresql_url))
    try:
        killed = await admin.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
    finally:
        await admin.close()
    assert killed >= 4
    await asyncio.sleep(0.2)  # the loop reads each socket's end

    for turn in range(8):
        session.add_message("user", f"after the restart {turn}")
        assert await storage.save_session(session) is True
    loaded = await asyncio.gather(*(storage.load_session(session.session_id) for _ in range(6)))
    assert {len(found.messages) for found in loaded if found is not None} == {8}


def test_initialize_again_from_another_event_loop_says_so(postgresql_url: str) -> None:
    """Found by attack: initialize() again from a second loop (a startup hook run per
    loop) failed with a raw RuntimeError, and its failure let go of the engine, so the
    close() after it closed none of the first loop's connections."""
    storage = PostgreSQLSessionStorage(postgresql_url, min_pool_size=2, max_pool_size=4)

    async def first() -> int:
        await storage.initialize()
        await storage.save_session(ChatSession.create("faults"))
        return await _backends(postgresql_url)

    async def second() -> None:
        with pytest.raises(PersistenceError, match="another event loop"):
            await storage.initialize()

    async def third() -> None:
        await storage.close()

    loop = asyncio.new_event_loop()
    try:
        assert loop.run_until_complete(first()) >= 1
        asyncio.run(second())
        loop.run_until_complete(third())  # the loop that opened it closes its connections
        assert loop.run_until_complete(_backends(postgresql_url)) == 0
    finally:
        loop.close()


def test_close_from_another_event_loop_lets_go_of_the_replicas_too(postgresql_url: str) -> None:
    """Found by attack: close() from another loop let go of the primary's pool but not
    of the read replicas': their connections stayed, held by the closed storage, and
    replica_states() reported them up. (The same server stands in for a standby.)"""
    storage = PostgreSQLSessionStorage(postgresql_url, read_replicas=[postgresql_url])

    async def first() -> None:
        await storage.initialize()
        await storage.save_session(ChatSession.create("faults"))
        for _ in range(5):  # reads go to the replica once it holds this storage's writes
            await storage.list_sessions()
            await asyncio.sleep(0.05)

    asyncio.run(first())
    asyncio.run(storage.close())
    gc.collect()

    assert storage.replica_states() == []
    assert asyncio.run(_backends(postgresql_url)) == 0


async def test_a_unit_of_work_entered_before_close_borrows_no_connection_after_it(
    make_postgresql: MakeStorage, postgresql_url: str
) -> None:
    """Found by attack: a unit of work entered before close(), whose first statement
    came after it, borrowed a connection from the disposed engine's new pool, committed
    into the closed storage, and kept that server connection, owned by nobody."""
    storage = await make_postgresql(min_pool_size=1, max_pool_size=3)
    session = ChatSession.create("faults")
    async with storage.unit_of_work() as uow:
        await storage.close()
        with pytest.raises(PersistenceError, match="postgresql storage is closed"):
            await uow.sessions.add(session)
    assert await _backends(postgresql_url) == 0
    async with PostgreSQLSessionStorage(postgresql_url, min_pool_size=1) as again:
        assert await again.load_session(session.session_id) is None


async def test_a_unit_of_work_running_through_close_keeps_no_connection(
    make_postgresql: MakeStorage, postgresql_url: str
) -> None:
    """Found by attack: close() disposed of the pool while units of work held
    connections; given back to that pool afterwards, they stayed open for the
    process's life."""
    storage = await make_postgresql(min_pool_size=2, max_pool_size=4)
    inside = asyncio.Event()
    release = asyncio.Event()

    async def unit(number: int) -> None:
        async with storage.unit_of_work() as uow:
            await uow.sessions.add(ChatSession.create("faults", session_id=f"unit-{number}"))
            inside.set()
            await release.wait()
            await uow.commit()

    units = [asyncio.ensure_future(unit(number)) for number in range(3)]
    await inside.wait()
    await asyncio.sleep(0.05)
    await storage.close()
    release.set()
    await asyncio.gather(*units)

    assert await _backends(postgresql_url) == 0


def test_a_storage_used_from_another_event_loop_says_so(postgresql_url: str) -> None:
    """Found by attack (a second asyncio.run, a reloaded server): asyncpg's connections
    and the pool's queue belong to the loop that made them, and every call from another
    one failed with a raw RuntimeError, or as "database unreachable", for good."""
    storage = PostgreSQLSessionStorage(postgresql_url, min_pool_size=2, max_pool_size=4)
    session = ChatSession.create("faults")

    async def first() -> None:
        await storage.initialize()
        await storage.save_session(session)

    async def second() -> list[BaseException | ChatSession | None]:
        calls = [storage.load_session(session.session_id) for _ in range(4)]
        found = await asyncio.gather(*calls, return_exceptions=True)
        await storage.close()  # lets go of the first loop's connections
        return found

    asyncio.run(first())
    found = asyncio.run(second())

    assert all(isinstance(result, PersistenceError) for result in found), found
    assert all("another event loop" in str(result) for result in found)

    async def fresh() -> ChatSession | None:
        async with PostgreSQLSessionStorage(postgresql_url, min_pool_size=1) as again:
            return await again.load_session(session.session_id)

    assert asyncio.run(fresh()) == session


async def _backends(postgresql_url: str) -> int:
    """The server connections to the test's database, but the one asking."""
    admin = await asyncpg.connect(plain_postgresql_url(postgresql_url))
    try:
        return int(
            await admin.fetchval(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = $1 AND pid <> pg_backend_pid()",
                make_url(postgresql_url).database,
            )
        )
    finally:
        await admin.close()
