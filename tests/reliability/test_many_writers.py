"""Many writers, one truth: three server processes, each with its own SessionManager.

They append, edit, rewind, pop, set metadata, archive and delete over one shared set of
sessions on one SQLite file or one PostgreSQL database, logging what their manager
acknowledged. Afterwards: no acknowledged append is missing unless its session was
deleted or the message removed by an acknowledged rewind; no deleted session is back;
no acknowledged metadata key is lost; an acknowledged archive holds; an edited message
shows an acknowledged edit; `message_count` equals the rows of every session.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from persistence import SessionStorage
from persistence.config import config_from_url, create_storage
from tests.factories import conversation
from tests.reliability.conftest import Figures, Scale
from tests.reliability.support import child_env

CHILD = Path(__file__).with_name("writers_child.py")
PROCESSES = 3
SESSIONS = 6


def _start(url: str, proc: int, seconds: float, acks: Path, ids: list[str]) -> Any:
    return subprocess.Popen(
        [sys.executable, str(CHILD), url, str(proc), str(seconds), str(acks), str(proc), *ids],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=child_env(),
    )


def _acks(paths: list[Path]) -> list[dict[str, Any]]:
    return [
        json.loads(line)
        for path in paths
        if path.exists()
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.strip()
    ]


async def _row_counts(storage: SessionStorage) -> dict[str, int]:
    from sqlalchemy import text

    engine = storage.engine  # type: ignore[attr-defined]
    async with engine.connect() as connection:
        rows = await connection.execute(
            text("SELECT session_id, count(*) FROM chat_messages GROUP BY session_id")
        )
        return {row[0]: int(row[1]) for row in rows}


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    request.applymarker(getattr(pytest.mark, request.param))
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'shared.db'}"
    url: str = request.getfixturevalue("postgresql_url")
    return url


async def test_three_managers_on_one_store_lose_undo_and_revive_nothing(
    store_url: str, tmp_path: Path, scale: Scale, figures: Figures
) -> None:
    seconds = scale.seconds(4.0, 60.0)
    async with create_storage(config_from_url(store_url)) as storage:
        if storage.backend_name == "postgresql":
            for sid in [s.session_id for s in await storage.list_sessions(limit=1000)]:
                await storage.delete_session(sid)
        seeded = [conversation(6) for _ in range(SESSIONS)]
        for session in seeded:
            await storage.save_session(session)
    ids = [session.session_id for session in seeded]

    paths = [tmp_path / f"acks-{proc}.jsonl" for proc in range(PROCESSES)]
    children = [_start(store_url, proc, seconds, paths[proc], ids) for proc in range(PROCESSES)]
    try:
        for child in children:
            assert child.stdout is not None and child.stdout.readline().strip() == "ready"
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
        assert child.returncode == 0, err[-3000:]
        reports.append(json.loads(out.strip().splitlines()[-1]))
    assert [e for report in reports for e in report["errors"]] == []

    acks = _acks(paths)
    deleted = {ack["s"] for ack in acks if ack["op"] == "delete"}
    removed = {m for ack in acks if ack["op"] == "rewind" for m in ack["removed"]}
    edits: dict[str, set[str]] = {}
    for ack in acks:
        if ack["op"] == "edit":
            edits.setdefault(ack["m"], set()).add(ack["c"])

    problems: list[str] = []
    async with create_storage(config_from_url(store_url)) as storage:
        rows = await _row_counts(storage)
        stored = {sid: await storage.load_session(sid) for sid in ids}
        for sid in deleted:
            if stored[sid] is not None:
                problems.append(f"deleted session {sid} is back")
            if rows.get(sid):
                problems.append(f"deleted session {sid} left {rows[sid]} message rows")
        for sid, session in stored.items():
            if session is None:
                if sid not in deleted:
                    problems.append(f"session {sid} vanished without an acknowledged delete")
                continue
            if session.message_count != rows.get(sid, 0) or session.message_count != len(
                session.messages
            ):
                problems.append(
                    f"{sid}: message_count {session.message_count}, rows {rows.get(sid, 0)}"
                )
            contents = {m.message_id: m.content for m in session.messages}
            for ack in acks:
                if ack["s"] != sid:
                    continue
                if ack["op"] == "append" and ack["m"] not in contents and ack["m"] not in removed:
                    problems.append(f"{sid}: acknowledged append {ack['m']} missing")
                if ack["op"] == "meta" and session.metadata.get(ack["k"]) != ack["v"]:
                    problems.append(f"{sid}: acknowledged metadata key {ack['k']} lost")
                if ack["op"] == "archive" and session.status != "archived":
                    problems.append(f"{sid}: acknowledged archive undone ({session.status})")
            for message_id, content in contents.items():
                if message_id in edits and content not in edits[message_id]:
                    problems.append(f"{sid}: message {message_id} shows no acknowledged edit")
    assert problems == [], problems[:10]

    kinds: dict[str, int] = {}
    for ack in acks:
        kinds[ack["op"]] = kinds.get(ack["op"], 0) + 1
    assert kinds.get("append", 0) > 0 and kinds.get("edit", 0) > 0 and kinds.get("meta", 0) > 0
    figures["processes"] = PROCESSES
    figures["seconds"] = seconds
    figures["acknowledged"] = len(acks)
    for kind, count in sorted(kinds.items()):
        figures[kind] = count
    figures["conflicts_resolved"] = sum(r["conflicts_resolved"] for r in reports)
    figures["deleted_dropped"] = sum(r["deleted_dropped"] for r in reports)
    figures["sessions_deleted"] = len(deleted)
    figures["problems"] = 0
