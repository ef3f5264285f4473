"""A server process of the many-writers soak (run as a script, never collected).

    writers_child.py URL PROC SECONDS ACKS SEED SESSION_ID...

Opens its own storage on URL and its own SessionManager, waits for "go" on stdin, then
two tasks run a random mix of append, edit, rewind, pop, metadata set, archive and
delete over the shared sessions until the deadline, and the manager shuts down. Every
operation the manager acknowledged (auto_save returned True, or archive/delete
returned) is one JSON line in ACKS. The last stdout line is a JSON report.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import sys
import time
from typing import Any, TextIO

from persistence import ChatSession, PersistenceError
from persistence.config import config_from_url, create_storage
from persistence.manager import SessionManager


class _Conflicts(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.resolved = 0
        self.dropped = 0

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "reapplying" in message:
            self.resolved += 1
        elif "deleted by another writer" in message:
            self.dropped += 1


class Acks:
    def __init__(self, path: str) -> None:
        self._file: TextIO = open(path, "a", encoding="utf-8")  # noqa: SIM115

    def write(self, **record: Any) -> None:
        record["t"] = time.time()
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


async def run(
    url: str, proc: str, seconds: float, acks_path: str, seed: int, ids: list[str]
) -> None:
    conflicts = _Conflicts()
    logging.getLogger("persistence.manager").addHandler(conflicts)
    rng = random.Random(seed)
    acks = Acks(acks_path)
    counts: dict[str, int] = {}
    errors: list[str] = []
    deletable = set(ids[: max(1, len(ids) // 3)])
    storage = create_storage(config_from_url(url))
    async with storage:
        manager = SessionManager(storage, max_cached_sessions=4)
        print("ready", flush=True)
        sys.stdin.readline()
        deadline = time.monotonic() + seconds
        serial = 0

        def tag() -> str:
            nonlocal serial
            serial += 1
            return f"p{proc}-{serial}"

        async def one_step() -> None:
            session_id = rng.choice(ids)
            kind = rng.choices(
                ["append", "edit", "rewind", "pop", "meta", "archive", "delete"],
                weights=[45, 15, 6, 6, 18, 6, 1 if session_id in deletable else 0],
            )[0]
            if kind == "delete":
                if await manager.delete_session(session_id):
                    acks.write(op="delete", s=session_id)
                return
            if kind == "archive":
                if await manager.archive_session(session_id):
                    acks.write(op="archive", s=session_id)
                return
            session: ChatSession | None = await manager.get_session(session_id)
            if session is None:
                return
            record: dict[str, Any]
            if kind == "append":
                message = session.add_message(rng.choice(["user", "assistant"]), tag())
                record = {"op": "append", "s": session_id, "m": message.message_id}
            elif kind == "edit" and session.messages:
                target = rng.choice(session.messages[-8:])
                content = tag()
                session.edit_message(target.message_id, content=content)
                record = {"op": "edit", "s": session_id, "m": target.message_id, "c": content}
            elif kind in ("rewind", "pop") and len(session.messages) > 3:
                if kind == "pop":
                    removed = [session.pop_message()]
                else:
                    keep = session.messages[-rng.randint(2, min(4, len(session.messages)))]
                    removed = session.rewind(keep.message_id)
                record = {
                    "op": "rewind",
                    "s": session_id,
                    "removed": [m.message_id for m in removed if m is not None],
                }
            elif kind == "meta":
                key, value = f"k{tag()}", rng.randint(0, 10**6)
                session.metadata[key] = value
                session.metadata["title"] = tag()
                record = {"op": "meta", "s": session_id, "k": key, "v": value}
            else:
                return
            if await manager.auto_save(session):
                acks.write(**record)
                counts[record["op"]] = counts.get(record["op"], 0) + 1

        async def worker() -> None:
            while time.monotonic() < deadline:
                try:
                    await one_step()
                except PersistenceError as exc:
                    errors.append(f"{type(exc).__name__}: {exc}")
                    return

        await asyncio.gather(worker(), worker())
        await manager.shutdown()
    acks.close()
    report = {
        "counts": counts,
        "errors": errors,
        "conflicts_resolved": conflicts.resolved,
        "deleted_dropped": conflicts.dropped,
    }
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    url, proc, seconds, acks_path, seed, *session_ids = sys.argv[1:]
    asyncio.run(run(url, proc, float(seconds), acks_path, int(seed), session_ids))
