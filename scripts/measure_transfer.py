"""Measures the transfer tools: peak memory by store size, and migration speed.

For each store size it builds a SQLite store of N sessions x M messages, then runs
each operation in a fresh child process and reads that process's peak RSS
(resource.getrusage, ru_maxrss) and its duration:

    migrate   SQLite -> PostgreSQL (a throwaway database), verify=True
    export    SQLite -> one JSON export file
    import    that file -> a fresh SQLite store
    baseline  the same imports and connections, moving nothing

Usage:
    python scripts/measure_transfer.py [--sessions 1000 10000] [--messages 20]
        [--batch-size 500] [--postgres-url postgresql://postgres@127.0.0.1:5432/postgres]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from persistence import ChatSession, PostgreSQLSessionStorage, SQLiteSessionStorage
from persistence.transfer import export_to_json, import_from_json, migrate_storage

DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


async def _populate(path: Path, sessions: int, messages: int) -> None:
    async with SQLiteSessionStorage(path, synchronous="NORMAL") as storage:
        for start in range(0, sessions, 500):
            async with storage.unit_of_work() as uow:
                for index in range(start, min(start + 500, sessions)):
                    session = ChatSession.create("gemini-2.5-flash", metadata={"n": index})
                    for turn in range(messages):
                        session.add_message(
                            "user" if turn % 2 == 0 else "assistant",
                            f"message {turn} of session {index}: " + "lorem ipsum " * 8,
                            {"turn": turn},
                        )
                    await uow.sessions.add(session)
                await uow.commit()


async def _admin(url: str, statement: str) -> None:
    import asyncpg

    connection = await asyncpg.connect(url)
    try:
        await connection.execute(statement)
    finally:
        await connection.close()


def _database_url(admin_url: str, name: str) -> str:
    from sqlalchemy import make_url

    return make_url(admin_url).set(database=name).render_as_string(hide_password=False)


async def _child(operation: str, args: dict[str, Any]) -> dict[str, Any]:
    source = SQLiteSessionStorage(args["sqlite"])
    await source.initialize()
    started = time.perf_counter()
    result: dict[str, Any] = {}
    try:
        if operation == "migrate":
            async with PostgreSQLSessionStorage(args["postgres"], 1, 4) as destination:
                result = await migrate_storage(
                    source, destination, verify=True, batch_size=args["batch_size"]
                )
            result.pop("verification", None)
        elif operation == "export":
            result = await export_to_json(source, args["file"], batch_size=args["batch_size"])
        elif operation == "import":
            async with SQLiteSessionStorage(args["target"], synchronous="NORMAL") as target:
                result = await import_from_json(target, args["file"], batch_size=args["batch_size"])
        else:
            await source.count()
    finally:
        await source.close()
    result["wall_seconds"] = round(time.perf_counter() - started, 3)
    # Linux reports ru_maxrss in KiB.
    result["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return result


def _run_child(operation: str, args: dict[str, Any]) -> dict[str, Any]:
    completed = subprocess.run(
        [sys.executable, __file__, "--child", operation, json.dumps(args)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(completed.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def _measure(sessions: int, messages: int, batch_size: int, admin_url: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="measure-transfer-") as scratch:
        directory = Path(scratch)
        sqlite = directory / "source.db"
        asyncio.run(_populate(sqlite, sessions, messages))
        database = f"measure_transfer_{uuid.uuid4().hex[:10]}"
        asyncio.run(_admin(admin_url, f'CREATE DATABASE "{database}"'))
        try:
            common = {"sqlite": str(sqlite), "batch_size": batch_size}
            figures = {
                "baseline": _run_child("baseline", common),
                "migrate": _run_child(
                    "migrate", {**common, "postgres": _database_url(admin_url, database)}
                ),
                "export": _run_child("export", {**common, "file": str(directory / "x.json")}),
            }
            figures["export"]["file_mib"] = round((directory / "x.json").stat().st_size / 2**20, 1)
            figures["import"] = _run_child(
                "import",
                {**common, "file": str(directory / "x.json"), "target": str(directory / "t.db")},
            )
        finally:
            asyncio.run(_admin(admin_url, f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)'))
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--messages", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--postgres-url", default=DEFAULT_POSTGRES_URL)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.child:
        operation, raw = options.child
        print(json.dumps(asyncio.run(_child(operation, json.loads(raw))), default=str))
        return
    for sessions in options.sessions:
        figures = _measure(sessions, options.messages, options.batch_size, options.postgres_url)
        total = sessions * options.messages
        migrate = figures["migrate"]
        print(f"\n{sessions} sessions x {options.messages} messages ({total} messages)")
        print(f"  baseline peak RSS {figures['baseline']['peak_rss_mib']} MiB")
        print(
            f"  migrate SQLite->PostgreSQL with verify: peak RSS {migrate['peak_rss_mib']} MiB,"
            f" {migrate['duration_seconds']} s ({migrate['write_seconds']} s writing),"
            f" {total / migrate['duration_seconds']:.0f} messages/s with verification,"
            f" {total / migrate['write_seconds']:.0f} messages/s writing only,"
            f" verified={migrate['verified']}"
        )
        for name in ("export", "import"):
            figure = figures[name]
            print(
                f"  {name}: peak RSS {figure['peak_rss_mib']} MiB,"
                f" {figure['duration_seconds']} s"
                + (f", file {figure['file_mib']} MiB" if "file_mib" in figure else "")
            )


if __name__ == "__main__":
    main()
