#!/usr/bin/env python3
"""Where the time of the hot paths goes: round trips, statements and a cProfile top list.

For W1 (append to a session of 1,000 messages), W2 (load 1,000 messages), W3 (list
100 of 10,000 sessions) and W8 (search for a word in one message of 1,000), on SQLite
and PostgreSQL, through the public API:

- driver round trips per call: aiosqlite thread hops (every `Connection._execute`),
  asyncpg messages written to the server socket (each one waits for its answer);
- SQL statements per call (the SQL runner's tracer; SQLAlchemy's events on older cores);
- the functions that take the time, by cProfile over many calls.

    python scripts/profile_hot_paths.py [--backends sqlite,postgresql] [--calls 300]
    py-spy record --format raw -o stacks.txt -- \\
        python scripts/profile_hot_paths.py --backends sqlite --only W2 --sample 20
    python scripts/profile_hot_paths.py --collapsed stacks.txt   # top functions of it

cProfile sees only the event loop's thread; on SQLite the statements, row decoding and
object building run in aiosqlite's thread, which py-spy samples too.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import pstats
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchkit.common import RARE_WORD, Texts
from benchkit.library import Library
from benchkit.sqlplan import captured_sql
from benchkit.stores import fresh_store

Call = Callable[[], Awaitable[Any]]


@contextmanager
def counted_round_trips() -> Iterator[Counter[str]]:
    """Counts aiosqlite thread hops and asyncpg socket writes, by what they were."""
    import asyncio.selector_events as selector_events

    import aiosqlite

    from persistence.sql import runner, sqlite_storage, uow

    hops: Counter[str] = Counter()
    original_execute = aiosqlite.Connection._execute
    original_run_in_thread = runner.run_in_thread
    original_write = selector_events._SelectorSocketTransport.write

    async def execute(self: Any, fn: Any, *args: Any, **kwargs: Any) -> Any:
        hops[f"aiosqlite {getattr(fn, '__name__', repr(fn))}"] += 1
        return await original_execute(self, fn, *args, **kwargs)

    async def run_in_thread(connection: Any, fn: Any, *args: Any) -> Any:
        # The library queues its own calls on the thread, not through _execute.
        hops[f"aiosqlite {getattr(fn, '__name__', repr(fn))}"] += 1
        return await original_run_in_thread(connection, fn, *args)

    def write(self: Any, data: Any) -> None:
        hops[f"asyncpg message {bytes(data[:1]).decode('latin-1')!r}"] += 1
        original_write(self, data)

    aiosqlite.Connection._execute = execute  # type: ignore[method-assign]
    sqlite_storage.run_in_thread = uow.run_in_thread = run_in_thread
    selector_events._SelectorSocketTransport.write = write  # type: ignore[method-assign]
    try:
        yield hops
    finally:
        aiosqlite.Connection._execute = original_execute  # type: ignore[method-assign]
        sqlite_storage.run_in_thread = uow.run_in_thread = original_run_in_thread
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
        "W8 search a rare word": lambda: target.search(RARE_WORD, 50),
    }


async def keep_calling(name: str, call: Call, seconds: float) -> None:
    """Runs one hot path for `seconds`, for an outside sampler such as py-spy."""
    deadline = time.monotonic() + seconds
    calls = 0
    while time.monotonic() < deadline:
        await call()
        calls += 1
    print(f"{name}: {calls} calls in {seconds:g} s ({seconds / calls * 1000:.3f} ms each)")


async def run_backend(backend: str, urls: dict[str, str], args: argparse.Namespace) -> None:
    calls, top = args.calls, args.top
    async with fresh_store(backend, urls, "profile") as location:
        target = Library(backend, urls)
        await target.open(location)
        try:
            paths = await hot_paths(target, Texts(300))
            if args.only:
                paths = {name: call for name, call in paths.items() if name.startswith(args.only)}
            if args.sample:
                print("SAMPLE-START", flush=True)
                for name, call in paths.items():
                    await keep_calling(name, call, args.sample)
                return
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


def summarise_collapsed(path: Path, top: int) -> None:
    """Prints the functions with most samples (self and inclusive) in py-spy raw output."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        frames = [
            frame.split(" (")[0] + " " + frame.rsplit("/", 1)[-1].rstrip(")")
            for frame in stack.split(";")
            if frame
        ]
        if not frames:
            continue
        count = int(count_text)
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    for title, counter in (("self", own), ("inclusive", inclusive)):
        print(f"--- {title} (% of {total} samples)")
        for frame, count in counter.most_common(top):
            print(f"{100 * count / total:5.1f}%  {frame}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--pg-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--only", help="W1, W2, W3 or W8: profile that hot path only")
    parser.add_argument(
        "--sample",
        type=float,
        help="no cProfile: run each path this many seconds for py-spy (sees aiosqlite's thread)",
    )
    parser.add_argument("--collapsed", type=Path, help="summarise a py-spy --format raw file")
    args = parser.parse_args()
    if args.collapsed:
        summarise_collapsed(args.collapsed, args.top)
        return
    urls = {"postgresql": args.pg_url}
    for backend in args.backends.split(","):
        asyncio.run(run_backend(backend, urls, args))


if __name__ == "__main__":
    main()
