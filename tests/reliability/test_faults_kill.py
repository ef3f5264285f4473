"""SIGKILL at random points during saves: the file stays sound and keeps every ack."""

from __future__ import annotations

import asyncio
import random
import signal
from pathlib import Path

import pytest

from persistence import SQLiteSessionStorage
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
