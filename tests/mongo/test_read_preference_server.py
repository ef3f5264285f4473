"""Routed reads on a real MongoDB (PERSISTENCE_TEST_MONGODB_URL), skipped without one.

On any server a storage with a read preference reads its own writes. On a replica
set or a sharded cluster the routed reads also carry `readConcern.afterClusterTime`
(the operation time of the storage's last write), and loads do not.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from pymongo import monitoring

from persistence.models import ChatSession
from persistence.mongo.backend import MongoDBSessionStorage

pytestmark = pytest.mark.mongodb


class _Commands(monitoring.CommandListener):
    def __init__(self) -> None:
        self.started_commands: list[tuple[str, dict[str, Any]]] = []
        self.replies: list[tuple[str, dict[str, Any]]] = []

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        self.started_commands.append((event.command_name, dict(event.command)))

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        self.replies.append((event.command_name, dict(event.reply)))

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass

    def clear(self) -> None:
        self.started_commands.clear()
        self.replies.clear()


@pytest.fixture
async def routed(mongodb_url: str) -> AsyncIterator[tuple[MongoDBSessionStorage, _Commands]]:
    commands = _Commands()
    storage = MongoDBSessionStorage(
        mongodb_url,
        database_name=f"persistence_test_{uuid.uuid4().hex[:12]}",
        read_preference="secondaryPreferred",
        driver_options={"event_listeners": [commands]},
    )
    await storage.initialize()
    try:
        yield storage, commands
    finally:
        await storage.drop_database()
        await storage.close()


async def test_a_storage_with_a_read_preference_reads_its_own_writes(
    routed: tuple[MongoDBSessionStorage, _Commands],
) -> None:
    storage, _ = routed
    session = ChatSession.create("model")
    session.add_message("user", "written then read back at once")
    await storage.save_session(session)
    assert [s.session_id for s in await storage.list_sessions()] == [session.session_id]
    assert len(await storage.search_messages("written")) == 1
    assert (await storage.count()).messages == 1
    exported = [s async for batch in storage.iter_sessions() for s in batch]
    assert [s.session_id for s in exported] == [session.session_id]
    async with storage.unit_of_work() as uow:
        other = ChatSession.create("model")
        await uow.sessions.add(other)
        await uow.commit()
    assert len(await storage.list_sessions()) == 2


async def test_routed_reads_wait_for_the_last_write_and_loads_do_not(
    routed: tuple[MongoDBSessionStorage, _Commands],
) -> None:
    storage, commands = routed
    if not storage.supports_transactions:
        pytest.skip("a standalone server reports no operation time: nothing to wait for")
    session = ChatSession.create("model")
    session.add_message("user", "hello")
    commands.clear()
    await storage.save_session(session)
    written = max(reply["operationTime"] for name, reply in commands.replies if name == "update")
    commands.clear()
    await storage.list_sessions()
    await storage.load_session(session.session_id)
    finds = [command for name, command in commands.started_commands if name == "find"]
    listing, loading = finds[0], finds[-1]
    assert listing["readConcern"]["afterClusterTime"] >= written
    assert "readConcern" not in loading or "afterClusterTime" not in loading["readConcern"]
    if "$readPreference" in listing:
        assert listing["$readPreference"]["mode"] == "secondaryPreferred"
    assert loading.get("$readPreference", {"mode": "primary"})["mode"] == "primary"
