"""Export, then import, a SQLite store of one session holding one very long message.

The JSON parser lexes a string cut by a read again from its start with each read, so
an import's cost grows with the square of its longest string over the parser's read
size (persistence.transfer.json_stream.READ_SIZE). Prints the seconds of each import,
as JSON, for each `--megabytes` size (the message is that many million letters).

    python scripts/measure_long_message_import.py --megabytes 8,32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

from persistence import ChatSession, SQLiteSessionStorage, export_to_json, import_from_json


async def _one(megabytes: int, directory: Path) -> dict[str, float]:
    source = directory / f"source-{megabytes}.db"
    exported = directory / f"export-{megabytes}.json"
    async with SQLiteSessionStorage(source) as storage:
        session = ChatSession.create("measure")
        session.add_message("user", "x" * (megabytes * 1_000_000))
        await storage.save_session(session)
        await export_to_json(storage, exported)
    async with SQLiteSessionStorage(directory / f"imported-{megabytes}.db") as storage:
        started = time.perf_counter()
        await import_from_json(storage, exported)
        seconds = time.perf_counter() - started
    return {"megabytes": megabytes, "import_seconds": round(seconds, 3)}


async def main(sizes: list[int]) -> None:
    with tempfile.TemporaryDirectory() as directory:
        for megabytes in sizes:
            print(json.dumps(await _one(megabytes, Path(directory))), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", default="8,32", help="comma-separated sizes")
    arguments = parser.parse_args()
    asyncio.run(main([int(size) for size in arguments.megabytes.split(",")]))
