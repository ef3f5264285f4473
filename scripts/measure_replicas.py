"""Measures what read replicas cost and save: writes, lists, and a list after each write.

Builds a primary and hot standby of its own (tests/replication.py: initdb and
pg_basebackup into a temporary directory, removed afterwards), stores `--sessions`
sessions, then times, with and without the standby as a read replica:

    W1 append   add one message to a session of 10 and save it
    W3 list     newest 100 of the sessions (served by the standby with replicas)
    write+list  one append then one list, the chat-server pattern: the list after a
                write asks the primary for its WAL position once (read-your-writes)

Each figure is the median (and p95) of the durations of every call, in milliseconds,
over `--rounds` rounds of `--ops` calls, the two configurations taking turns call by
call.

Usage:
    python scripts/measure_replicas.py [--sessions 10000] [--ops 200] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from persistence import ChatSession, PostgreSQLSessionStorage
from tests.replication import ReplicationPair, replication_pair, wait_caught_up


async def _populate(storage: PostgreSQLSessionStorage, count: int) -> None:
    for start in range(0, count, 500):
        async with storage.unit_of_work() as uow:
            for index in range(start, min(start + 500, count)):
                session = ChatSession.create("model", metadata={"n": index})
                session.add_message("user", f"session {index} opens")
                await uow.sessions.add(session)
            await uow.commit()


async def _conversation(storage: PostgreSQLSessionStorage) -> ChatSession:
    session = ChatSession.create("model")
    for turn in range(10):
        session.add_message("user" if turn % 2 == 0 else "assistant", f"turn {turn}")
    await storage.save_session(session)
    return session


async def _time(
    ops: int, operations: dict[str, Callable[[], Awaitable[object]]]
) -> dict[str, list[float]]:
    """The duration of each call in milliseconds, the configurations taking turns call
    by call (the first one alternating), so that a change of load hits both alike."""
    durations: dict[str, list[float]] = {name: [] for name in operations}
    names = list(operations)
    for call in range(ops):
        for name in names if call % 2 == 0 else reversed(names):
            started = time.perf_counter()
            await operations[name]()
            durations[name].append((time.perf_counter() - started) * 1000)
    return durations


async def measure(pair: ReplicationPair, sessions: int, ops: int, rounds: int) -> dict:
    primary, standby = pair.primary.url(), pair.standby.url()
    plain = PostgreSQLSessionStorage(primary, 2, 5)
    routed = PostgreSQLSessionStorage(primary, 2, 5, read_replicas=[standby])
    await plain.initialize()
    await _populate(plain, sessions)
    await routed.initialize()
    results: dict[str, dict[str, list[float]]] = {}
    try:
        chats = {"plain": await _conversation(plain), "routed": await _conversation(routed)}
        storages = {"plain": plain, "routed": routed}
        for storage in storages.values():
            for _ in range(20):  # warm pools and statement caches
                await storage.list_sessions()

        def append(name: str) -> Callable[[], Awaitable[object]]:
            async def run() -> object:
                chat = chats[name]
                chat.add_message("user", "one more")
                return await storages[name].save_session(chat)

            return run

        def listing(name: str) -> Callable[[], Awaitable[object]]:
            return lambda: storages[name].list_sessions(limit=100)

        def write_then_list(name: str) -> Callable[[], Awaitable[object]]:
            async def run() -> object:
                await append(name)()
                return await listing(name)()

            return run

        for _ in range(rounds):
            for workload, make in (
                ("W1 append", append),
                ("W3 list", listing),
                ("write+list", write_then_list),
            ):
                figures = await _time(ops, {name: make(name) for name in storages})
                for name, values in figures.items():
                    results.setdefault(workload, {}).setdefault(name, []).extend(values)
                await wait_caught_up(pair)
        states = routed.replica_states()
    finally:
        await plain.close()
        await routed.close()
    summary = {
        workload: {
            name: {
                "median_ms": round(statistics.median(values), 3),
                "p95_ms": round(statistics.quantiles(values, n=20)[-1], 3),
                "calls": len(values),
            }
            for name, values in by_name.items()
        }
        for workload, by_name in results.items()
    }
    return {"results": summary, "replica_states": [dataclasses.asdict(state) for state in states]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=10000)
    parser.add_argument("--ops", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    with replication_pair() as pair:
        figures = asyncio.run(measure(pair, args.sessions, args.ops, args.rounds))
    figures["load_average"] = os.getloadavg()
    figures["arguments"] = vars(args) | {"json": str(args.json) if args.json else None}
    print(json.dumps(figures, indent=2))
    for workload, by_name in figures["results"].items():
        plain, routed = by_name["plain"]["median_ms"], by_name["routed"]["median_ms"]
        print(f"{workload:12} median: no replica {plain:7.3f} ms, replica {routed:7.3f} ms")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
