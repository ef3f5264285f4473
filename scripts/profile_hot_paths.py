#!/usr/bin/env python3
"""Where the time of the hot paths goes: round trips, statements and a cProfile top list.

For W1 (append to a session of 1,000 messages), W2 (load 1,000 messages) and W3
(list 100 of 10,000 sessions), on SQLite and PostgreSQL, through the public API:

- driver round trips per call: aiosqlite thread hops (every `Connection._execute`),
  asyncpg messages written to the server socket (each one waits for its answer);
- SQL statements per call (SQLAlchemy's `before_cursor_execute`);
- the functions that take the time, by cProfile over many calls.

    python scripts/profile_hot_paths.py [--backends sqlite,postgresql] [--calls 300]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import pstats
import sys
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchkit.common import Texts
from benchkit.library import Library
from benchkit.sqlplan import captured_sql
from benchkit.stores import fresh_store

Call = Callable[[], Awaitable[Any]]


@contextmanager
def counted_round_trips() -> Iterator[Counter[str]]:
    """Counts aiosqlite thread hops and asyncpg socket writes, by what they were."""
    import asyncio.selector_events as selector_events

    import aiosqlite

    hops: Counter[str] = Counter()
    original_execute = aiosqlite.Connection._execute
    original_write = selector_events._SelectorSocketTransport.write

    async def execute(self: Any, fn: Any, *args: Any, **kwargs: Any) -> Any:
        hops[f"aiosqlite {getattr(fn, '__name__', repr(fn))}"] += 1
        return await original_execute(self, fn, *args, **kwargs)

    def write(self: Any, data: Any) -> None:
        hops[f"asyncpg message {bytes(data[:1]).decode('latin-1')!r}"] += 1
        original_write(self, data)

    aiosqlite.Connection._execute = execute  # type: ignore[method-assign]
    selector_events._SelectorSocketTransport.write = write  # type: ignore[method-assign]
    try:
        yield hops
    finally:
        aiosqlite.Connection._execute = original_execute  # type: ignore[method-assign]
        selector_events._SelectorSocketTransport.write = original_write  # type: ignore[method-assign]


async def per_call(target: Library, call: Call, calls: int = 10) -> dict[str, Any]:
    """Round trips and statements of one call, averaged over `calls` calls."""
    with counted_round_trips() as hops, captured_sql(target.storage.engine) as sql:
        for _ in range(calls):
            await call()
    return {
        "round_trips": sum(hops.values()) / calls,
        "by_kind": {kind: count / calls for kind, count in hops.most_common()},
        "statements": [" ".join(statement.split()[:6]) for statement in sql[: len(sql) // calls]],
    }


async def profile(call: Call, calls: int, top: int) -> str:
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        await call()
    profiler.disable()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out).strip_dirs()
    stats.sort_stats("tottime").print_stats(top)
    return out.getvalue()


async def hot_paths(target: Library, texts: Texts) -> dict[str, Call]:
    appending = await target.create_session()
    await target.add_messages(appending, texts.many(1000))
    loading = await target.create_session()
    await target.add_messages(loading, texts.many(1000))
    await target.seed_sessions(10_000, 1, texts)

    async def append() -> None:
        role, content = texts.one()
        await target.append(appending, role, content)

    return {
        "W1 append to 1,000": append,
        "W2 load 1,000": lambda: target.load(loading),
        "W3 list 100 of 10,000": lambda: target.list_page(100),
    }


async def run_backend(backend: str, urls: dict[str, str], calls: int, top: int) -> None:
    async with fresh_store(backend, urls, "profile") as location:
        target = Library(backend, urls)
        await target.open(location)
        try:
            paths = await hot_paths(target, Texts(300))
            for name, call in paths.items():
                for _ in range(5):
                    await call()
                counts = await per_call(target, call)
                print(f"\n=== {backend}: {name}")
                print(f"round trips per call: {counts['round_trips']:g}  {counts['by_kind']}")
                print(f"statements per call: {counts['statements']}")
                print(await profile(call, calls, top))
        finally:
            await target.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--pg-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    urls = {"postgresql": args.pg_url}
    for backend in args.backends.split(","):
        asyncio.run(run_backend(backend, urls, args.calls, args.top))


if __name__ == "__main__":
    main()
