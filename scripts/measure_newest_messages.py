"""PostgreSQL partial loads (`last=20`) of a session that grew after the statistics.

One fresh database: `--short-sessions` sessions of 10 messages, analysed, autovacuum off
on both tables (so the statistics stay as a busy store's are between its ANALYZE runs:
every session about ten rows). Then one session grows to each of `--sizes` messages,
saved as a holder saves them, and at each size `load_session(last=20)` is timed
alternately with the same load through the statement without its lower bound on
positions (the form before it, `SELECT_SESSION_WITH_NEWEST_ANYWHERE`, put in its
place for those calls). Prints the medians, as JSON.

    python scripts/measure_newest_messages.py --pg-url postgresql://postgres@127.0.0.1:5432/postgres
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchkit.common import Texts, median_ms
from benchkit.stores import postgresql_store
from sqlalchemy import text

import persistence
from persistence.sql import repositories

LAST = 20


BOUNDED = repositories.SELECT_SESSION_WITH_NEWEST
STATEMENTS = {"bounded": BOUNDED, "unbounded": repositories.SELECT_SESSION_WITH_NEWEST_ANYWHERE}


async def _store_short_sessions(
    storage: persistence.PostgreSQLSessionStorage, count: int, texts: Texts
) -> None:
    """`count` sessions of 10 messages, analysed, with autovacuum off."""
    async with storage.engine.begin() as connection:
        for table in ("chat_sessions", "chat_messages"):
            await connection.execute(text(f"ALTER TABLE {table} SET (autovacuum_enabled = false)"))
    for start in range(0, count, 500):
        batch = []
        for _ in range(start, min(count, start + 500)):
            session = persistence.ChatSession.create("bench-model")
            for role, content in texts.many(10):
                session.add_message(role, content)
            batch.append(session)
        assert await storage.insert_sessions(batch)
    async with storage.engine.begin() as connection:
        await connection.execute(text("ANALYZE chat_sessions, chat_messages"))


async def _timed_loads(
    storage: persistence.PostgreSQLSessionStorage, session_id: str, rounds: int
) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in STATEMENTS}
    for turn in range(rounds):
        for name in sorted(STATEMENTS, reverse=turn % 2 == 1):
            # The storage's own load, with one statement or the other.
            repositories.SELECT_SESSION_WITH_NEWEST = STATEMENTS[name]
            start = time.perf_counter()
            tail = await storage.load_session(session_id, last=LAST)
            times[name].append(time.perf_counter() - start)
            assert tail is not None and len(tail.messages) == LAST
    return {name: round(median_ms(values), 3) for name, values in times.items()}


async def measure(url: str, short_sessions: int, sizes: list[int], rounds: int) -> dict[str, Any]:
    texts = Texts(300)
    result: dict[str, Any] = {"short_sessions": short_sessions, "last": LAST, "sizes": {}}
    async with (
        postgresql_store(url, "newest_messages") as store_url,
        persistence.PostgreSQLSessionStorage(store_url) as storage,
    ):
        await _store_short_sessions(storage, short_sessions, texts)
        long = persistence.ChatSession.create("bench-model")
        await storage.save_session(long)
        for size in sizes:
            while len(long.messages) < size:
                for role, content in texts.many(min(5000, size - len(long.messages))):
                    long.add_message(role, content)
                await storage.save_session(long)
            result["sizes"][str(size)] = await _timed_loads(storage, long.session_id, rounds)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--pg-url", required=True, help="an admin URL; a database is made")
    parser.add_argument("--short-sessions", type=int, default=20_000)
    parser.add_argument("--sizes", default="100,1000,10000,100000")
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")]
    try:
        result = asyncio.run(measure(args.pg_url, args.short_sessions, sizes, args.rounds))
    finally:
        repositories.SELECT_SESSION_WITH_NEWEST = BOUNDED
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
