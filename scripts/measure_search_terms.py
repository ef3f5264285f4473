"""PostgreSQL bulk saves under two versions of `persistence_search_terms`, alternated.

Two stores at head, in two fresh databases; in one, the function is put back as revision
0006 left it (`--older`, a regex test before the fast path). The same batches of
messages are saved into both, one unit of work of `--batch` messages at a time, the
order alternated per round, so the machine's noise falls on both alike. Then the
function alone: both versions (as temporary functions of one connection) compute the
terms of 1,000 documents of a few sizes, alternated. Prints the medians, as JSON.

    python scripts/measure_search_terms.py --pg-url postgresql://postgres@127.0.0.1:5432/postgres
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import random
import sys
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import asyncpg
from benchkit.common import Texts, median_ms
from benchkit.stores import plain_postgresql_url, postgresql_store

import persistence
from persistence.search import search_document

HEAD = importlib.import_module(
    "persistence.sql.migrations.versions.0008_search_terms_cut_by_cast"
).CUT_BY_CAST_FUNCTION
OLDER = {
    "0006": importlib.import_module(
        "persistence.sql.migrations.versions.0006_search_terms_fast_path"
    ).FAST_PATH_FUNCTION,
}


async def measure(url: str, older: str, rounds: int, batch: int, chars: int) -> dict[str, Any]:
    async with AsyncExitStack() as stack:
        urls = {
            "head": await stack.enter_async_context(postgresql_store(url, "terms_head")),
            older: await stack.enter_async_context(postgresql_store(url, f"terms_{older}")),
        }
        stores = {}
        for name, store_url in urls.items():
            storage = persistence.PostgreSQLSessionStorage(store_url)
            await storage.initialize()
            stack.push_async_callback(storage.close)
            stores[name] = storage
        connection = await asyncpg.connect(plain_postgresql_url(urls[older]))
        try:
            await connection.execute(OLDER[older])
        finally:
            await connection.close()
        sessions = {name: persistence.ChatSession.create(model="bench") for name in stores}
        for name, storage in stores.items():
            await storage.save_session(sessions[name])
        texts = Texts(chars)
        seconds: dict[str, list[float]] = {name: [] for name in stores}
        for round_ in range(rounds):
            messages = texts.many(batch)
            for name in list(stores)[:: 1 if round_ % 2 else -1]:
                session = sessions[name]
                for role, content in messages:
                    session.add_message(role, content)
                start = time.perf_counter()
                async with stores[name].unit_of_work() as uow:
                    await uow.sessions.add(session)
                    await uow.commit()
                seconds[name].append(time.perf_counter() - start)
    return {
        "rounds": rounds,
        "batch": batch,
        "message_chars": chars,
        "median_ms_per_batch": {name: round(median_ms(s), 2) for name, s in seconds.items()},
    }


async def function_alone(url: str, older: str, repeats: int) -> dict[str, Any]:
    """Medians (ms) of computing the terms of 1,000 documents of distinct random words."""
    rng = random.Random(8)
    vocabulary = [f"{word}{n}" for word in Texts.WORDS for n in range(40)]
    result: dict[str, Any] = {}
    connection = await asyncpg.connect(plain_postgresql_url(url))
    try:
        for words in (20, 60, 600):
            documents = [
                search_document(" ".join(rng.choice(vocabulary) for _ in range(words)))
                for _ in range(1000)
            ]
            seconds: dict[str, list[float]] = {"head": [], older: []}
            for _ in range(repeats):
                for name, function in (("head", HEAD), (older, OLDER[older])):
                    await connection.execute(
                        function.replace("persistence_search_terms", "pg_temp.terms", 1)
                    )
                    start = time.perf_counter()
                    await connection.fetchval(
                        "SELECT count(pg_temp.terms(d)) FROM unnest($1::text[]) AS d", documents
                    )
                    seconds[name].append(time.perf_counter() - start)
            size = round(sum(map(len, documents)) / len(documents))
            result[f"documents of {size} characters"] = {
                name: round(median_ms(s), 2) for name, s in seconds.items()
            }
    finally:
        await connection.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pg-url", required=True, help="an admin URL; databases are made")
    parser.add_argument("--older", default="0006", choices=sorted(OLDER))
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--message-chars", type=int, default=200)
    args = parser.parse_args()
    result = asyncio.run(
        measure(args.pg_url, args.older, args.rounds, args.batch, args.message_chars)
    )
    result["function_alone_ms_per_1000_documents"] = asyncio.run(
        function_alone(args.pg_url, args.older, repeats=9)
    )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
