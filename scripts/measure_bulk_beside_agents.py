"""PostgreSQL bulk saves beside the OpenAI Agents SDK's, alternated in one process.

The peer harness (`../shared/bench/run.py`) runs each side in its own process, one
after the other, and its W4 moves by a third between runs of the same code. Here one
session of each grows by `--messages` messages a round: ours through `unit_of_work`
(as the harness's adapter saves them), theirs through `SQLAlchemySession.add_items`
on a shared engine, in separate databases of one server, the two alternating within
each round. Prints the medians of the rounds after the first two, as JSON.

Run it with an interpreter that has the peers' requirements
(`../shared/bench/requirements-peers.txt`) and this checkout on its path:

    PYTHONPATH=. <peers venv>/bin/python scripts/measure_bulk_beside_agents.py \\
        --pg-url postgresql://postgres@127.0.0.1:5432/postgres
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchkit.common import Texts, median_ms
from benchkit.stores import postgresql_store

import persistence


async def measure(pg_url: str, rounds: int, messages: int, size: int) -> dict[str, float]:
    from agents.extensions.memory import SQLAlchemySession
    from sqlalchemy.ext.asyncio import create_async_engine

    texts = Texts(size)
    ours: list[float] = []
    theirs: list[float] = []
    async with (
        postgresql_store(pg_url, "bulk_ours") as our_url,
        postgresql_store(pg_url, "bulk_agents") as their_url,
    ):
        storage = persistence.PostgreSQLSessionStorage(our_url)
        await storage.initialize()
        engine = create_async_engine(their_url.replace("postgresql://", "postgresql+asyncpg://"))
        try:
            peer = SQLAlchemySession(uuid.uuid4().hex, engine=engine, create_tables=True)
            session = persistence.ChatSession.create(model="bench-model")
            await storage.save_session(session)
            for _ in range(rounds):
                batch = texts.many(messages)
                started = time.perf_counter()
                for role, content in batch:
                    session.add_message(role, content)
                async with storage.unit_of_work() as uow:
                    await uow.sessions.add(session)
                    await uow.commit()
                ours.append(time.perf_counter() - started)
                started = time.perf_counter()
                items = [{"role": role, "content": content} for role, content in batch]
                await peer.add_items(items)
                theirs.append(time.perf_counter() - started)
        finally:
            await storage.close()
            await engine.dispose()
    ours_ms, theirs_ms = median_ms(ours[2:]), median_ms(theirs[2:])
    return {
        "persistence_ms": round(ours_ms, 2),
        "agents_sqlalchemy_ms": round(theirs_ms, 2),
        "ratio": round(ours_ms / theirs_ms, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pg-url", required=True, help="admin URL; two databases are made")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--messages", type=int, default=1000, help="messages a save")
    parser.add_argument("--size", type=int, default=300, help="characters a message")
    args = parser.parse_args()
    result = asyncio.run(measure(args.pg_url, args.rounds, args.messages, args.size))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
