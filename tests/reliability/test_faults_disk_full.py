"""Disk full (RLIMIT_FSIZE in a child process) during saves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from persistence import SQLiteSessionStorage
from tests.reliability.conftest import Figures
from tests.reliability.support import read_acks, sqlite_state, start_child, wait_ready

pytestmark = pytest.mark.sqlite


@pytest.mark.parametrize("headroom", [64 * 1024, 512 * 1024])
async def test_disk_full_during_saves_is_a_clear_error_and_keeps_every_ack(
    tmp_path: Path, headroom: int, figures: Figures
) -> None:
    db, acks_path = tmp_path / "full.db", tmp_path / "acks.jsonl"
    child = start_child("diskfull", db, acks_path, headroom)
    wait_ready(child)
    out, err = child.communicate(timeout=120)
    assert child.returncode == 0, err
    outcome = json.loads(out.strip().splitlines()[-1])
    assert outcome["errors"], "the file size limit was never reached"
    for error in outcome["errors"]:
        assert error[0] == "PersistenceError", error
        assert "save session failed" in error[1]
        assert "disk is full" in error[1] or "disk I/O error" in error[1], error
    assert "close_error" not in outcome

    acks = read_acks(acks_path)
    state = sqlite_state(db)
    assert state.problems == []
    assert state.missing(acks) == []
    assert len(state.messages["full"]) == outcome["acked"]
    # The library opens the file again and writes to it once there is room.
    async with SQLiteSessionStorage(db) as storage:
        await storage.initialize()
        loaded = await storage.load_session("full")
        assert loaded is not None and loaded.message_count == outcome["acked"]
        loaded.add_message("user", "room again")
        await storage.save_session(loaded)
    assert sqlite_state(db).problems == []
    figures["saves_acknowledged"] = outcome["acked"]
    figures["refusals"] = len(outcome["errors"])
    figures["error"] = outcome["errors"][0][1]
    figures["lost"] = 0
