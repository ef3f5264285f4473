"""Appends on SQLite, alone and each followed by a search: what pending documents cost.

Since SQLite appends leave their search documents pending (persistence.sql.indexing),
an append writes less and a search right after it tests a few messages one by one.
This measures both sides on one store, in one process:

- `appends`: one message saved at a time into a session of 1,000 (indexed) messages,
  median / mean / p99 in ms. The mean carries the saves that write pending documents.
- `append_then_search`: an append, then a search for a word only the new messages
  hold (the newest must come first), alternated; medians in ms of each and of both.

Run it once per revision to compare them, e.g. `PYTHONPATH=<checkout> python
scripts/measure_pending_appends.py`; the machine's noise is large, so alternate runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchkit.common import Texts, median_ms, percentile_ms

import persistence


def _summary(seconds: list[float]) -> dict[str, float]:
    return {
        "median_ms": round(median_ms(seconds), 3),
        "mean_ms": round(statistics.mean(seconds) * 1e3, 3),
        "p99_ms": round(percentile_ms(seconds, 0.99), 3),
    }


async def _store(directory: str, synchronous: str, texts: Texts) -> Any:
    storage = persistence.SQLiteSessionStorage(
        Path(directory) / "sessions.db", synchronous=synchronous
    )
    await storage.initialize()
    session = persistence.ChatSession.create(model="bench")
    for role, content in texts.many(1000):
        session.add_message(role, content)
    async with storage.unit_of_work() as uow:
        await uow.sessions.add(session)
        await uow.commit()
    await storage.index_for_search()
    return storage, session


async def measure(appends: int, size: int, synchronous: str) -> dict[str, Any]:
    texts = Texts(size)
    result: dict[str, Any] = {"appends": appends, "message_chars": size, "sync": synchronous}
    with tempfile.TemporaryDirectory() as directory:
        storage, session = await _store(directory, synchronous, texts)
        times = []
        for _ in range(appends):
            started = time.perf_counter()
            session.add_message(*texts.one())
            await storage.save_session(session)
            times.append(time.perf_counter() - started)
        result["appends_alone"] = _summary(times)
        await storage.close()
    with tempfile.TemporaryDirectory() as directory:
        storage, session = await _store(directory, synchronous, texts)
        appended, searched = [], []
        for n in range(appends // 4):
            started = time.perf_counter()
            session.add_message("user", f"question {n} about quokkas: {texts.one()[1]}")
            await storage.save_session(session)
            middle = time.perf_counter()
            found = await storage.search_messages("quokkas", limit=10)
            searched.append(time.perf_counter() - middle)
            appended.append(middle - started)
            if not found[0].content.startswith(f"question {n} "):
                raise AssertionError(f"the search missed the newest message ({n})")
        result["append_then_search"] = {
            "append_median_ms": round(statistics.median(appended) * 1e3, 3),
            "search_median_ms": round(statistics.median(searched) * 1e3, 3),
            "both_median_ms": round(
                statistics.median(a + s for a, s in zip(appended, searched, strict=True)) * 1e3,
                3,
            ),
        }
        await storage.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--appends", type=int, default=1200)
    parser.add_argument("--message-chars", type=int, default=300)
    parser.add_argument("--synchronous", default="FULL", choices=["FULL", "NORMAL"])
    options = parser.parse_args()
    found = asyncio.run(measure(options.appends, options.message_chars, options.synchronous))
    print(json.dumps(found))


if __name__ == "__main__":
    main()
