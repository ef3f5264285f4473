"""Plain saves beside units of work that take two sessions in opposite orders.

PostgreSQL's deadlock detector ends the circle of the two units of work, and may end
a plain save waiting on one of their sessions with it (a soft edge of the lock queue),
though a plain save holds one session. For `--seconds`, in one storage of a throwaway
database, two tasks run units of work that append to sessions A then B and B then A,
and three tasks append to A, B and A through `save_session` (reloading the newest
message on a conflict). Prints, as JSON, what each kind did and how it failed.

    python scripts/measure_deadlock_victims.py --pg-url postgresql://postgres@127.0.0.1/postgres
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
from collections import Counter

import asyncpg

from persistence import (
    ChatSession,
    PersistenceError,
    PostgreSQLSessionStorage,
    SessionConflictError,
)


async def _units_of_work(
    storage: PostgreSQLSessionStorage, order: str, until: float
) -> Counter[str]:
    outcomes: Counter[str] = Counter()
    loop = asyncio.get_running_loop()
    while loop.time() < until:
        try:
            async with storage.unit_of_work() as uow:
                for session_id in order:
                    session = await uow.sessions.get(session_id)
                    assert session is not None
                    session.add_message("user", "in a unit of work")
                    await uow.sessions.add(session)
                    await asyncio.sleep(random.random() * 0.002)
                await uow.commit()
            outcomes["done"] += 1
        except PersistenceError as exc:
            outcomes[f"failed: {str(exc)[:60]}"] += 1
    return outcomes


async def _plain_saves(
    storage: PostgreSQLSessionStorage, session_id: str, until: float
) -> Counter[str]:
    outcomes: Counter[str] = Counter()
    loop = asyncio.get_running_loop()
    session = await storage.load_session(session_id, last=1)
    while loop.time() < until:
        assert session is not None
        try:
            session.add_message("user", "a plain save")
            await storage.save_session(session)
            outcomes["done"] += 1
        except SessionConflictError:
            outcomes["conflict"] += 1
            session = await storage.load_session(session_id, last=1)
        except PersistenceError as exc:
            outcomes[f"failed: {str(exc)[:60]}"] += 1
            session = await storage.load_session(session_id, last=1)
    return outcomes


async def main(admin_url: str, seconds: float) -> dict[str, dict[str, int]]:
    name = f"persistence_deadlock_probe_{os.getpid()}"
    admin = await asyncpg.connect(admin_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        storage = PostgreSQLSessionStorage(admin_url.rsplit("/", 1)[0] + f"/{name}")
        try:
            await storage.initialize()
            for session_id in "AB":
                await storage.save_session(ChatSession.create("m", session_id=session_id))
            until = asyncio.get_running_loop().time() + seconds
            *units, a, b, a_again = await asyncio.gather(
                _units_of_work(storage, "AB", until),
                _units_of_work(storage, "BA", until),
                *(_plain_saves(storage, session_id, until) for session_id in "ABA"),
            )
            plain = [a, b, a_again]
        finally:
            await storage.close()
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
    return {
        "units_of_work": dict(sum(units, Counter())),
        "plain_saves": dict(sum(plain, Counter())),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pg-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--seconds", type=float, default=20)
    arguments = parser.parse_args()
    print(json.dumps(asyncio.run(main(arguments.pg_url, arguments.seconds)), indent=2))
