"""Child processes of the reliability tests (run as a script, never collected).

Modes:
    load DB PROC WRITERS SECONDS ACKS SHARED...   writers append until the deadline
    kill DB ACKS SEED                             saves forever; the parent SIGKILLs it
    diskfull DB ACKS HEADROOM                     saves under RLIMIT_FSIZE until refused
    exportfull DB OUT LIMIT                       exports and backs up under RLIMIT_FSIZE
    import DB FILE BATCH                          imports an export file (the parent kills it)
    migrate DB URL BATCH                          migrates DB to URL (the parent kills it)
    index DB COUNT                                bulk-inserts COUNT messages, then searches:
                                                  writes their documents (the parent kills it)

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


def _ends_with_newline(path: str) -> bool:
    with open(path, "rb") as handle:
        handle.seek(-1, os.SEEK_END)
        return handle.read(1) == b"\n"


class Acks:
    def __init__(self, path: str, durable: bool) -> None:
        self._file: TextIO = open(path, "a", encoding="utf-8")  # noqa: SIM115
        self._durable = durable
        # A process killed mid-line left a torn ack: end it, so it stays on a line of its own.
        if os.path.getsize(path) and not _ends_with_newline(path):
            self._file.write("\n")

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


async def exportfull(db: str, out: str, limit: str) -> None:
    from persistence import SessionManager
    from persistence.transfer import backup_storage, export_to_json

    outcome: dict[str, Any] = {}
    async with SQLiteSessionStorage(db) as storage:
        await storage.initialize()
        first = (await storage.list_sessions(limit=1))[0].session_id
        resource.setrlimit(resource.RLIMIT_FSIZE, (int(limit), int(limit)))
        attempts = {
            "export_to_json": lambda: export_to_json(storage, os.path.join(out, "all.json")),
            "backup_storage": lambda: backup_storage(storage, os.path.join(out, "backups")),
            "export_to_file": lambda: SessionManager(storage).export_to_file(
                first, os.path.join(out, "one.json")
            ),
        }
        for name, attempt in attempts.items():
            try:
                await attempt()
            except Exception as exc:
                said = "; ".join([str(exc), *getattr(exc, "__notes__", [])])
                outcome[name] = [type(exc).__name__, said, isinstance(exc, PersistenceError)]
            else:
                outcome[name] = None
    print(json.dumps(outcome), flush=True)


async def import_(db: str, path: str, batch: str) -> None:
    from persistence.transfer import import_from_json

    async with SQLiteSessionStorage(db) as storage:
        await storage.initialize()
        ready()
        result = await import_from_json(storage, path, batch_size=int(batch))
    print(json.dumps(result), flush=True)


async def migrate(db: str, url: str, batch: str) -> None:
    from persistence import PostgreSQLSessionStorage
    from persistence.transfer import migrate_storage

    async with SQLiteSessionStorage(db) as source, PostgreSQLSessionStorage(url, 1, 2) as dest:
        await source.initialize()
        await dest.initialize()
        ready()
        result = await migrate_storage(source, dest, verify=False, batch_size=int(batch))
    print(json.dumps(result), flush=True)


async def index(db: str, count: str) -> None:
    storage = SQLiteSessionStorage(db)
    await storage.initialize()
    session = ChatSession.create("index", session_id="index")
    for n in range(int(count)):
        session.add_message("user", f"bulk message word{n}")
    async with storage.unit_of_work() as uow:
        await uow.sessions.add(session)
        await uow.commit()
    ready()
    # More pending than a search tests one by one: it writes them all, then answers.
    await storage.search_messages("word7")
    print("indexed", flush=True)
    await asyncio.sleep(3600)


MODES = {
    "load": load,
    "kill": kill,
    "diskfull": diskfull,
    "exportfull": exportfull,
    "import": import_,
    "migrate": migrate,
    "index": index,
}


def main() -> None:
    mode, *args = sys.argv[1:]
    asyncio.run(MODES[mode](*args))


if __name__ == "__main__":
    main()
