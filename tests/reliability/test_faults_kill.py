"""SIGKILL at random points during saves: the file stays sound and keeps every ack."""

from __future__ import annotations

import asyncio
import random
import signal
import sqlite3
from pathlib import Path

import pytest

from persistence import SQLiteSessionStorage
from persistence.sql.indexing import BATCH
from tests.reliability.conftest import Figures, Scale
from tests.reliability.support import (
    killed_on_exit,
    read_acks,
    sqlite_state,
    start_child,
    wait_ready,
)

pytestmark = pytest.mark.sqlite


async def test_sigkill_during_saves_keeps_every_acknowledged_save(
    tmp_path: Path, scale: Scale, figures: Figures
) -> None:
    db, acks_path = tmp_path / "kill.db", tmp_path / "acks.jsonl"
    kills = scale.n(20, 200)
    rng = random.Random(20261125)
    acked_before = 0
    for round_ in range(kills):
        with killed_on_exit(start_child("kill", db, acks_path, round_)) as child:
            wait_ready(child)
            # Random points in the save loop; not a timing assertion.
            await asyncio.sleep(rng.uniform(0.02, 0.4))
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=30)
            assert child.returncode == -signal.SIGKILL, child.returncode
        acks = read_acks(acks_path)
        state = sqlite_state(db)
        assert state.problems == [], f"after kill {round_ + 1}"
        assert state.missing(acks) == [], f"after kill {round_ + 1}"
        assert len(acks) >= acked_before
        acked_before = len(acks)
    # The library itself opens the file and carries on after the last kill.
    async with SQLiteSessionStorage(db) as storage:
        await storage.initialize()
        counts = await storage.count()
    state = sqlite_state(db)
    assert counts.messages == state.rows
    figures["kills_survived"] = kills
    figures["saves_acknowledged"] = len(read_acks(acks_path))
    figures["messages"] = state.rows
    figures["sessions"] = len(state.messages)
    figures["lost"] = 0


async def test_sigkill_while_a_search_writes_pending_documents(
    tmp_path: Path, scale: Scale, figures: Figures
) -> None:
    count = 20_000
    rng = random.Random(20261201)
    rounds = scale.n(6, 40)
    for round_ in range(rounds):
        db = tmp_path / f"index-{round_}.db"
        with killed_on_exit(start_child("index", db, count)) as child:
            wait_ready(child)
            # A random point of the writing (20 transactions of 1,000 documents).
            await asyncio.sleep(rng.uniform(0.0, 0.6))
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=30)
        state = sqlite_state(db)  # integrity_check and FTS5's integrity-check
        assert state.problems == [], f"round {round_ + 1}"
        connection = sqlite3.connect(db)
        pending = connection.execute(
            "SELECT count(*) FROM chat_messages WHERE search_text IS NULL"
        ).fetchone()[0]
        connection.close()
        # Each transaction wrote its batch whole, or not at all.
        assert pending % BATCH == 0, pending
        figures.add("pending_left_by_the_kills", pending)
        async with SQLiteSessionStorage(db) as storage:
            await storage.initialize()
            found = await storage.search_messages("word4321")
            every = await storage.search_messages("bulk", limit=count)
        assert [m.content for m in found] == ["bulk message word4321"]
        assert [m.content for m in every] == [
            f"bulk message word{n}" for n in range(count - 1, -1, -1)
        ]
        assert sqlite_state(db).problems == []
    figures["kills_while_indexing"] = rounds
