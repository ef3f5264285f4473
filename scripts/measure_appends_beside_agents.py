"""SQLite appends beside the OpenAI Agents SDK's, alternated in one process.

The peer harness (`../shared/bench/run.py`) runs each side in its own process, one
after the other, and its W1 on SQLite moves by up to 2x between runs of the same code
(persistence 0.38 ms in one run, the Agents SDK 0.98 ms; 1.37x the SDK's time in
another). Here one session of each, holding `--history` messages first, gets one
message a save: ours through `save_session` (as the harness's adapter appends), theirs
through `SQLiteSession.add_items([item])`, in two files of one directory, the sides
alternating every `--appends` appends. Both commit each append with synchronous=FULL
in WAL mode (the SDK keeps stdlib sqlite3's FULL), so both wait for one fsync an
append; `--synchronous NORMAL` shows what ours costs without it. Prints the medians
as JSON.

Run it with an interpreter that has the peers' requirements
(`../shared/bench/requirements-peers.txt`) and this checkout on its path:

    PYTHONPATH=. <peers venv>/bin/python scripts/measure_appends_beside_agents.py
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchkit.common import Texts, median_ms

import persistence


async def measure(
    history: int, rounds: int, appends: int, size: int, synchronous: str
) -> dict[str, float | str]:
    from agents import SQLiteSession

    texts = Texts(size)
    ours: list[float] = []
    theirs: list[float] = []
    with tempfile.TemporaryDirectory(prefix="appends_beside_agents_") as directory:
        storage = persistence.SQLiteSessionStorage(
            Path(directory) / "ours.db", synchronous=synchronous
        )
        await storage.initialize()
        peer = SQLiteSession(uuid.uuid4().hex, str(Path(directory) / "agents.db"))
        try:
            session = persistence.ChatSession.create(model="bench-model")
            seed = texts.many(history)
            for role, content in seed:
                session.add_message(role, content)
            await storage.save_session(session)
            await peer.add_items([{"role": role, "content": content} for role, content in seed])
            for turn in range(rounds):
                for side in ("ours", "theirs") if turn % 2 == 0 else ("theirs", "ours"):
                    for role, content in texts.many(appends):
                        started = time.perf_counter()
                        if side == "ours":
                            session.add_message(role, content)
                            await storage.save_session(session)
                        else:
                            await peer.add_items([{"role": role, "content": content}])
                        (ours if side == "ours" else theirs).append(time.perf_counter() - started)
        finally:
            await storage.close()
            peer.close()
    # The first round of each side warms its caches.
    ours_ms, theirs_ms = median_ms(ours[appends:]), median_ms(theirs[appends:])
    return {
        "history": history,
        "synchronous": synchronous,
        "persistence_ms": round(ours_ms, 3),
        "agents_sqlite_ms": round(theirs_ms, 3),
        "ratio": round(ours_ms / theirs_ms, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--history", type=int, nargs="+", default=[10, 1000])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--appends", type=int, default=40, help="appends a side a round")
    parser.add_argument("--size", type=int, default=300, help="characters a message")
    parser.add_argument("--synchronous", default="FULL", help="ours: FULL (the SDK's), NORMAL")
    args = parser.parse_args()
    for history in args.history:
        result = asyncio.run(
            measure(history, args.rounds, args.appends, args.size, args.synchronous)
        )
        print(json.dumps(result))


if __name__ == "__main__":
    main()
