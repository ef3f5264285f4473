"""Peak memory of `migrate_storage` (with its check) as the store grows, SQLite to SQLite.

For each size, a source store of that many sessions (one short message each: the
sessions, not their content, are what the migration's ledger grows with) is seeded,
then one child process per run migrates it into a fresh store and reports its peak
RSS and time. Flat memory: the peak at the largest size about equals the smallest's.

    python scripts/measure_migrate_memory.py --sizes 20000,200000 --runs 2

Another checkout's code is measured by running this file with PYTHONPATH set to it
(the children inherit it).
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
from pathlib import Path

SEED_BATCH = 2_000


async def seed(path: Path, sessions: int) -> None:
    from persistence import ChatSession, SQLiteSessionStorage

    async with SQLiteSessionStorage(path) as storage:
        for start in range(0, sessions, SEED_BATCH):
            batch = []
            for index in range(start, min(sessions, start + SEED_BATCH)):
                session = ChatSession.create("m", session_id=f"{index:036d}")
                session.add_message("user", "hello there")
                batch.append(session)
            if not await storage.insert_sessions(batch):
                raise SystemExit(f"{path}: seeding found sessions already there")


async def migrate(source: Path, destination: Path) -> dict[str, object]:
    from persistence import SQLiteSessionStorage
    from persistence.transfer import migrate_storage

    async with SQLiteSessionStorage(source) as a, SQLiteSessionStorage(destination) as b:
        opened = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        started = time.perf_counter()
        result = await migrate_storage(a, b)
        return {
            "sessions": result["sessions_migrated"],
            "verified": result["verified"],
            "seconds": round(time.perf_counter() - started, 2),
            "rss_after_open_mb": round(opened, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="20000,200000", help="sessions per store, commas")
    parser.add_argument("--runs", type=int, default=2, help="child processes per size")
    parser.add_argument("--child", nargs=2, metavar=("SOURCE", "DESTINATION"), help="internal")
    args = parser.parse_args()
    if args.child:
        source, destination = map(Path, args.child)
        print(json.dumps(asyncio.run(migrate(source, destination))))
        return
    results: dict[str, list[dict[str, object]]] = {}
    with tempfile.TemporaryDirectory(prefix="migrate-memory-") as folder:
        for size in (int(part) for part in args.sizes.split(",")):
            source = Path(folder) / f"source-{size}.db"
            asyncio.run(seed(source, size))
            runs = results.setdefault(str(size), [])
            for run in range(args.runs):
                destination = Path(folder) / f"destination-{size}-{run}.db"
                done = subprocess.run(
                    [sys.executable, __file__, "--child", str(source), str(destination)],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                runs.append(json.loads(done.stdout))
                print(size, runs[-1], flush=True)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
