"""Child processes of the reliability tests (run as a script, never collected).

Modes:
    load DB PROC WRITERS SECONDS ACKS SHARED...   writers append until the deadline
    kill DB ACKS SEED                             saves forever; the parent SIGKILLs it
    diskfull DB ACKS HEADROOM                     saves under RLIMIT_FSIZE until refused

Every acknowledgement is one JSON line {"s": session, "m": [message ids]} written after
save_session returned; `kill` and `diskfull` fsync it before going on, so the parent
knows exactly which saves were acknowledged when the process died.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import resource
import sys
import time
from typing import Any, TextIO

from persistence import ChatSession, PersistenceError, SQLiteSessionStorage


class Acks:
    def __init__(self, path: str, durable: bool) -> None:
        self._file: TextIO = open(path, "a", encoding="utf-8")  # noqa: SIM115
        self._durable = durable

    def write(self, session: ChatSession, **extra: Any) -> None:
        record = {"s": session.session_id, "m": [m.message_id for m in session.messages]}
        record.update(extra)
        self._file.write(json.dumps(record) + "\n")
        if self._durable:
            self._file.flush()
            os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


def _largest_file(*paths: str) -> int:
    return max(os.path.getsize(path) for path in paths if os.path.exists(path))


def ready() -> None:
    print("ready", flush=True)


async def load(
    db: str, proc: str, writers: str, seconds: str, acks_path: str, *shared: str
) -> None:
    acks = Acks(acks_path, durable=False)
    errors: list[str] = []
    saves = 0
    async with SQLiteSessionStorage(db) as storage:
        await storage.initialize()
        ready()
        sys.stdin.readline()
        deadline = time.monotonic() + float(seconds)

        async def writer(index: int) -> None:
            nonlocal saves
            name = f"p{proc}-w{index}"
            own = ChatSession.create("load", session_id=name)
            targets = [own] + [await storage.load_session(sid) for sid in shared]  # type: ignore[misc]
            rng = random.Random(name)
            seq = 0
            while time.monotonic() < deadline:
                target = targets[0] if seq % 2 == 0 else rng.choice(targets[1:])
                target.add_message("user", f"{name} {seq}")
                seq += 1
                try:
                    await storage.save_session(target)
                except Exception as exc:  # every failure reaching the caller is counted
                    errors.append(f"{type(exc).__name__}: {exc}")
                    continue
                saves += 1
                acks.write(target)

        await asyncio.gather(*(writer(i) for i in range(int(writers))))
    acks.close()
    print(json.dumps({"saves": saves, "errors": errors}), flush=True)


async def kill(db: str, acks_path: str, seed: str) -> None:
    acks = Acks(acks_path, durable=True)
    rng = random.Random(int(seed))
    storage = SQLiteSessionStorage(db)
    await storage.initialize()
    sessions = [
        await storage.load_session(f"k{i}") or ChatSession.create("kill", session_id=f"k{i}")
        for i in range(4)
    ]
    ready()
    while True:
        session = rng.choice(sessions)
        for _ in range(rng.randint(1, 5)):
            session.add_message(
                rng.choice(["user", "assistant"]), f"seed {seed} " + "x" * rng.randint(0, 4000)
            )
        if rng.random() < 0.2:
            fresh = ChatSession.create("kill")
            fresh.add_message("user", "fresh")
            await storage.save_session(fresh)
            acks.write(fresh)
        await storage.save_session(session)
        acks.write(session)


async def diskfull(db: str, acks_path: str, limit: str) -> None:
    acks = Acks(acks_path, durable=True)
    storage = SQLiteSessionStorage(db)
    await storage.initialize()
    session = ChatSession.create("diskfull", session_id="full")
    await storage.save_session(session)
    acks.write(session)
    # Python ignores SIGXFSZ, so a write past the limit fails with EFBIG instead of killing.
    cap = _largest_file(db, db + "-wal") + int(limit)
    resource.setrlimit(resource.RLIMIT_FSIZE, (cap, cap))
    ready()
    outcome: dict[str, Any] = {"acked": 0, "errors": []}
    for attempt in range(10_000):
        session.add_message("user", f"{attempt} " + "y" * 20_000)
        try:
            await storage.save_session(session)
        except PersistenceError as exc:
            outcome["errors"].append([type(exc).__name__, str(exc)])
            if len(outcome["errors"]) >= 3:
                break
            continue
        except Exception as exc:
            outcome["errors"].append([type(exc).__name__, str(exc), "not a PersistenceError"])
            break
        outcome["acked"] += 1
        acks.write(session)
    try:
        await storage.close()
    except Exception as exc:
        outcome["close_error"] = [type(exc).__name__, str(exc)]
    print(json.dumps(outcome), flush=True)


def main() -> None:
    mode, *args = sys.argv[1:]
    asyncio.run({"load": load, "kill": kill, "diskfull": diskfull}[mode](*args))


if __name__ == "__main__":
    main()
