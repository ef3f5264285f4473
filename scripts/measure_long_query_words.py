"""One search of long query words against a message of one very long word, per backend.

The message (the newest of 201) is one word of `--message-chars` letters; each of the
`--words` query words is built so an engine compares all of it at every position:
PostgreSQL's strpos compares backwards from a word's end, so by default the words
differ from the message at their first letter; SQLite's instr (memcmp) compares
forwards, so with `--from-end` they differ at their last. `han4` uses a Han letter of
four bytes, `han3` one of three, `ascii` the letter a (the message "b" + "a" * N: a
word that must begin a message's word). With `--all-match` the message also ends with
every query word, so every test runs in full. `--unbounded` lifts
persistence.search.MAX_QUERY_BYTES, as before it existed; PostgreSQL then stops each
statement after `--timeout` seconds. Prints the worst and best of three, as JSON.

    python scripts/measure_long_query_words.py --words 4 --chars 32 --all-match
    python scripts/measure_long_query_words.py --kind han3 --chars 300000 --from-end \\
        --unbounded --sqlite-only
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import asyncpg
from benchkit.stores import plain_postgresql_url, postgresql_store, sqlite_store

import persistence
from persistence import search

LETTERS = {"han4": ("\U00020000", 0x4E00), "han3": ("\u6f22", 0x5B57), "ascii": ("a", 0x62)}


def contents(args: argparse.Namespace) -> tuple[str, str]:
    """The message and the query."""
    fill, first = LETTERS[args.kind]
    chars, size = args.chars, args.message_chars
    heads = [chr(first + n) if args.kind != "ascii" else str(n) for n in range(args.words)]
    built = [
        fill * (chars - len(head)) + head if args.from_end else head + fill * (chars - len(head))
        for head in heads
    ]
    tail = " ".join(built) if args.all_match else ""
    start = "b" if args.kind == "ascii" else ""
    message = start + fill * (size - len(start) - len(tail)) + tail
    return message, " ".join(built)


async def measure(storage: persistence.SessionStorage, message: str, query: str) -> dict[str, Any]:
    await storage.initialize()
    session = persistence.ChatSession.create("m")
    for n in range(200):
        session.add_message("user", f"filler {n}")
    session.add_message("user", message)
    await storage.save_session(session)
    await storage.index_for_search()
    timings, found = [], None
    for _ in range(3):
        start = time.perf_counter()
        try:
            found = len(await storage.search_messages(query))
        except persistence.PersistenceError as exc:
            found = f"{type(exc).__name__}: {str(exc)[:60]}"
        timings.append(time.perf_counter() - start)
    return {"worst_s": round(max(timings), 3), "best_s": round(min(timings), 3), "found": found}


async def main(args: argparse.Namespace) -> dict[str, Any]:
    if args.unbounded:
        search.MAX_QUERY_BYTES = sys.maxsize
    message, query = contents(args)
    results: dict[str, Any] = {key: value for key, value in vars(args).items() if key != "pg_url"}
    results["query_bytes"] = len(query.encode()) - query.count(" ")
    async with AsyncExitStack() as stack:
        path = await stack.enter_async_context(sqlite_store("long_words"))
        async with persistence.SQLiteSessionStorage(path) as storage:
            results["sqlite"] = await measure(storage, message, query)
        if args.sqlite_only:
            return results
        url = await stack.enter_async_context(postgresql_store(args.pg_url, "long_words"))
        name = url.rsplit("/", 1)[1]
        connection = await asyncpg.connect(plain_postgresql_url(args.pg_url))
        try:  # a statement of the unbounded search may run for minutes
            await connection.execute(
                f"ALTER DATABASE \"{name}\" SET statement_timeout = '{args.timeout}s'"
            )
        finally:
            await connection.close()
        async with persistence.PostgreSQLSessionStorage(url) as storage:
            results["postgresql"] = await measure(storage, message, query)
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pg-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--kind", choices=sorted(LETTERS), default="han4")
    parser.add_argument("--words", type=int, default=1)
    parser.add_argument("--chars", type=int, default=128)
    parser.add_argument("--message-chars", type=int, default=search.MAX_SEARCHABLE_CHARS)
    parser.add_argument("--all-match", action="store_true")
    parser.add_argument("--from-end", action="store_true")
    parser.add_argument("--unbounded", action="store_true")
    parser.add_argument("--sqlite-only", action="store_true")
    parser.add_argument("--timeout", type=int, default=60)
    print(json.dumps(asyncio.run(main(parser.parse_args())), indent=2))
