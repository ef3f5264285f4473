"""W1-W4, W6, W8 (issue 8) and W9 (issue 14); each runs on one target in one fresh store.

W5 and W7 start processes of their own and live in `processes.py`.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from benchkit.common import (
    HALF_WORD,
    RARE_EVERY,
    RARE_WORD,
    Texts,
    repeat_timed,
    summary_ms,
    timed,
)
from benchkit.target import Target


async def statements_of(target: Target, call: Callable[[], Awaitable[Any]]) -> list[str] | None:
    """The statements one call sends, for the library's SQL backends (not timed)."""
    storage = getattr(target, "storage", None)
    if storage is None or target.backend == "mongodb":
        return None
    from benchkit.sqlplan import count_statements

    return await count_statements(storage.engine, call())


async def seed_history(target: Target, handle: Any, count: int, texts: Texts) -> float:
    start = time.perf_counter()
    for first in range(0, count, 1000):
        await target.add_messages(handle, texts.many(min(1000, count - first)))
    return time.perf_counter() - start


def growth(per_size: dict[str, dict[str, Any]], key: str = "median_ms") -> float | None:
    sizes = list(per_size)
    if len(sizes) < 2:
        return None
    return per_size[sizes[-1]][key] / per_size[sizes[0]][key]


def _rotating_append(
    target: Target, handles: list[Any], texts: Texts
) -> Callable[[], Awaitable[None]]:
    turns = itertools.count()

    async def append() -> None:
        role, content = texts.one()
        await target.append(handles[next(turns) % len(handles)], role, content)

    return append


async def w1_append(target: Target, p: dict[str, Any]) -> dict[str, Any]:
    """add_message + save_session on a session that already holds N messages."""
    texts = Texts(p["msg_bytes"])
    per_n: dict[str, Any] = {}
    for n in p["w1_sizes"]:
        # Rotating over a few sessions keeps small N small while appending.
        handles = [await target.create_session() for _ in range(4 if n < 100 else 1)]
        seed_s = sum([await seed_history(target, h, n, texts) for h in handles])
        append = _rotating_append(target, handles, texts)
        times, _ = await repeat_timed(append, p["appends"], warmup=3)
        statements = await statements_of(target, append)
        per_n[str(n)] = summary_ms(times) | {"seed_s": round(seed_s, 2), "statements": statements}
    return {"per_size": per_n, "growth": growth(per_n)}


async def w2_load(target: Target, p: dict[str, Any]) -> dict[str, Any]:
    """load_session of 1,000 and 10,000 messages in a store that holds many more."""
    texts = Texts(p["msg_bytes"])
    noise_sessions = 10
    for _ in range(noise_sessions):
        await seed_history(
            target, await target.create_session(), p["w2_noise"] // noise_sessions, texts
        )
    per_size: dict[str, Any] = {}
    for size in p["w2_sizes"]:
        handle = await target.create_session()
        await seed_history(target, handle, size, texts)
        times, loaded = await repeat_timed(lambda h=handle: target.load(h), p["repeats"])
        statements = await statements_of(target, lambda h=handle: target.load(h))
        per_size[str(size)] = summary_ms(times) | {
            "loaded": loaded,
            "ok": loaded == size,
            "statements": statements,
        }
    return {"per_size": per_size, "noise_messages": p["w2_noise"]}


async def w9_tail(target: Target, p: dict[str, Any]) -> dict[str, Any]:
    """load_session(last=20) of sessions of 100 and 100,000 messages: flat in history."""
    texts = Texts(p["msg_bytes"])
    per_size: dict[str, Any] = {}
    for size in p["w9_sizes"]:
        handle = await target.create_session()
        await seed_history(target, handle, size, texts)
        times, loaded = await repeat_timed(lambda h=handle: target.load(h, last=20), p["repeats"])
        per_size[str(size)] = summary_ms(times) | {"loaded": loaded, "ok": loaded == 20}
    return {"per_size": per_size, "growth": growth(per_size)}


async def w3_list(target: Target, p: dict[str, Any]) -> dict[str, Any]:
    """list_sessions(limit=100) in stores of 10k and 100k sessions (1 message each)."""
    texts = Texts(p["msg_bytes"])
    per_size: dict[str, Any] = {}
    held = 0
    for size in p["w3_sizes"]:
        seed_s, _ = await timed(lambda more=size - held: target.seed_sessions(more, 1, texts))
        held = size
        times, page = await repeat_timed(lambda: target.list_page(100), p["repeats"], warmup=2)
        statements = await statements_of(target, lambda: target.list_page(100))
        per_size[str(size)] = summary_ms(times) | {
            "returned": len(page),
            "ok": len(page) == min(100, size) and all(count == 1 for _, count in page),
            "seed_s": round(seed_s, 2),
            "statements": statements,
        }
    return {"per_size": per_size, "growth": growth(per_size)}


async def w4_bulk(target: Target, p: dict[str, Any]) -> dict[str, Any]:
    """Bulk insert through the unit of work: messages/s over chunks of `w4_chunk`."""
    texts = Texts(p["msg_bytes"])
    handle = await target.create_session()
    total, chunk = p["w4_total"], p["w4_chunk"]
    chunk_times = []
    for first in range(0, total, chunk):
        batch = texts.many(min(chunk, total - first))
        elapsed, _ = await timed(lambda b=batch: target.add_messages(handle, b))
        chunk_times.append(elapsed)
    # The library leaves a bulk insert's search documents to the first search
    # (persistence.sql.indexing); raw indexes as it inserts. Both pay here in full.
    first_search, _ = await timed(lambda: target.search("zeppelin", 50))
    loaded = await target.load(handle)
    median_chunk = sorted(chunk_times)[len(chunk_times) // 2]
    return {
        "msgs_per_s": round(min(chunk, total) / median_chunk),
        "overall_msgs_per_s": round(total / sum(chunk_times)),
        "first_search_ms": round(first_search * 1000, 1),
        "with_first_search_msgs_per_s": round(total / (sum(chunk_times) + first_search)),
        "inserted": total,
        "chunk": chunk,
        "loaded": loaded,
        "ok": loaded == total,
    }


async def _seed_startup_store(
    target: Target, fresh: int, stale: int, expiry_hours: float, texts: Texts, tag: str
) -> float:
    old = datetime.now(UTC) - timedelta(hours=2 * expiry_hours)
    start = time.perf_counter()
    await target.seed_sessions(stale, 1, texts, updated_at=old)
    await target.seed_sessions(fresh, 1, texts)
    await target.add_file_records(20, expired=10, prefix=tag)
    return time.perf_counter() - start


async def w6_startup(target: Target, p: dict[str, Any]) -> dict[str, Any]:
    """SessionManager.startup() with 10k and 100k sessions, `w6_stale` of them stale."""
    texts = Texts(p["msg_bytes"])
    expiry_hours, stale = 72.0, p["w6_stale"]
    per_size: dict[str, Any] = {}
    held = 0
    for size in p["w6_sizes"]:
        seed_s = await _seed_startup_store(
            target, size - held - stale, stale, expiry_hours, texts, f"s{size}-"
        )
        held = size
        first_s, first = await timed(lambda: target.startup(expiry_hours))
        await target.after_startup()
        steady = []
        for _ in range(p["repeats"]):
            elapsed, _ = await timed(lambda: target.startup(expiry_hours))
            await target.after_startup()
            steady.append(elapsed)
        per_size[str(size)] = summary_ms(steady) | {
            "first_ms": round(first_s * 1000, 3),
            "first_result": {k: v for k, v in first.items() if isinstance(v, int | float | str)},
            "ok": first.get("expired_sessions") == stale,
            "seed_s": round(seed_s, 2),
        }
    return {
        "per_size": per_size,
        "growth": growth(per_size, "first_ms"),
        "steady_growth": growth(per_size),
    }


async def w8_search(target: Target, p: dict[str, Any]) -> dict[str, Any]:
    """search_messages over a store of `w8_messages` messages: rare and common words.

    `common_half` is the word in every second message (50,000 of 100,000): its newest
    50 matches must come back without reading all of them.
    """
    texts = Texts(p["msg_bytes"], half_word=True)
    sessions = max(1, p["w8_messages"] // 1000)
    seed_s, _ = await timed(
        lambda: target.seed_sessions(sessions, p["w8_messages"] // sessions, texts)
    )
    queries = {"rare": RARE_WORD, "common": "session storage", "common_half": HALF_WORD}
    expected = {
        "rare": min(50, p["w8_messages"] // RARE_EVERY),
        "common": 50,
        "common_half": min(50, p["w8_messages"] // 2),
    }
    out: dict[str, Any] = {"seed_s": round(seed_s, 2), "messages": p["w8_messages"]}
    for name, query in queries.items():
        times, found = await repeat_timed(lambda q=query: target.search(q, 50), p["repeats"])
        out[name] = summary_ms(times) | {
            "query": query,
            "found": found,
            "ok": found == expected[name],
        }
        if name == "common_half":
            out[name]["matches"] = p["w8_messages"] // 2
    out["plan"] = await target.search_plan(RARE_WORD, 50)
    return out


WORKLOADS: dict[str, Callable[[Target, dict[str, Any]], Awaitable[dict[str, Any]]]] = {
    "w1": w1_append,
    "w2": w2_load,
    "w3": w3_list,
    "w4": w4_bulk,
    "w6": w6_startup,
    "w8": w8_search,
    "w9": w9_tail,
}
