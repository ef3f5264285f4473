"""SQLite under load: 2 processes x 8 writers on shared and own sessions."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from persistence import ChatSession, SQLiteSessionStorage
from tests.reliability.conftest import Figures, Scale
from tests.reliability.support import read_acks, sqlite_state, start_child, wait_ready

pytestmark = pytest.mark.sqlite

PROCESSES = 2
WRITERS = 8
SHARED = ["shared-0", "shared-1"]


async def test_two_processes_of_eight_writers_lose_nothing_and_never_see_locked(
    tmp_path: Path, scale: Scale, figures: Figures
) -> None:
    db = tmp_path / "load.db"
    async with SQLiteSessionStorage(db) as storage:
        await storage.initialize()
        for session_id in SHARED:
            await storage.save_session(ChatSession.create("load", session_id=session_id))
    seconds = scale.seconds(3.0, 60.0)
    acks_paths = [tmp_path / f"acks-{proc}.jsonl" for proc in range(PROCESSES)]
    children = [
        start_child("load", db, proc, WRITERS, seconds, acks_paths[proc], *SHARED)
        for proc in range(PROCESSES)
    ]
    try:
        for child in children:
            wait_ready(child)
        for child in children:
            assert child.stdin is not None
            child.stdin.write("go\n")
            child.stdin.flush()
        outputs = [child.communicate(timeout=seconds + 120) for child in children]
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
    reports = []
    for child, (out, err) in zip(children, outputs, strict=True):
        assert child.returncode == 0, err
        reports.append(json.loads(out.strip().splitlines()[-1]))

    errors = [error for report in reports for error in report["errors"]]
    assert not [e for e in errors if "locked" in e.lower()], errors[:5]
    assert errors == []

    acks = [ack for path in acks_paths for ack in read_acks(path)]
    state = sqlite_state(db)
    assert state.problems == []
    assert state.missing(acks) == []
    acked_messages = {message_id for ack in acks for message_id in ack["m"]}
    assert state.rows == len(acked_messages)
    # Each writer's messages appear in the order it saved them, in every session.
    for session_id, contents in state.contents.items():
        last_seq: dict[str, int] = {}
        for content in contents:
            match = re.fullmatch(r"(p\d+-w\d+) (\d+)", content)
            assert match, content
            writer, seq = match[1], int(match[2])
            assert seq > last_seq.get(writer, -1), (session_id, content)
            last_seq[writer] = seq
    shared_rows = sum(len(state.messages[sid]) for sid in SHARED)
    figures["processes"] = PROCESSES
    figures["writers"] = PROCESSES * WRITERS
    figures["seconds"] = seconds
    figures["saves"] = sum(report["saves"] for report in reports)
    figures["messages"] = state.rows
    figures["shared_session_messages"] = shared_rows
    figures["locked_errors"] = 0
    figures["lost"] = 0
