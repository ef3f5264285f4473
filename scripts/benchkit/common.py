"""Timing, memory and message-text helpers shared by every target and workload."""

from __future__ import annotations

import random
import resource
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

RESULT_TAG = "BENCH-RESULT:"
ROLES = ("user", "assistant")
# Sprinkled into every RARE_EVERY-th message, so W8 has a selective query too.
RARE_WORD = "zeppelin"
RARE_EVERY = 1000
# W8's common word: in every second message (50,000 of W8's 100,000).
HALF_WORD = "kestrel"

Message = tuple[str, str]


class Skip(Exception):
    """The workload cannot run for this target; the message says why."""


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def median_ms(seconds: list[float]) -> float:
    return statistics.median(seconds) * 1000.0


def percentile_ms(seconds: list[float], q: float) -> float:
    ordered = sorted(seconds)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000.0


def summary_ms(seconds: list[float]) -> dict[str, Any]:
    return {
        "median_ms": round(median_ms(seconds), 4),
        "p90_ms": round(percentile_ms(seconds, 0.9), 4),
        "min_ms": round(min(seconds) * 1000.0, 4),
        "samples": len(seconds),
    }


async def timed(call: Callable[[], Awaitable[Any]]) -> tuple[float, Any]:
    start = time.perf_counter()
    value = await call()
    return time.perf_counter() - start, value


async def repeat_timed(
    call: Callable[[], Awaitable[Any]], repeats: int, warmup: int = 1
) -> tuple[list[float], Any]:
    """Runs `call` warmup times untimed, then `repeats` times timed; returns times, last value."""
    value = None
    for _ in range(warmup):
        value = await call()
    times = []
    for _ in range(repeats):
        elapsed, value = await timed(call)
        times.append(elapsed)
    return times, value


class Texts:
    """Deterministic chat-like message bodies of about `size` characters."""

    WORDS = (
        *("the", "model", "said", "that", "session", "storage", "must", "keep", "every"),
        *("message", "in", "order", "and", "never", "lose", "one", "when", "the", "server"),
        *("restarts", "under", "load", "with", "many", "users"),
    )

    def __init__(self, size: int, seed: int = 7, *, half_word: bool = False) -> None:
        self._rng = random.Random(seed)
        self._size = size
        self._count = 0
        self._half_word = half_word

    def one(self) -> Message:
        words: list[str] = []
        length = 0
        while length < self._size:
            word = self._rng.choice(self.WORDS)
            words.append(word)
            length += len(word) + 1
        self._count += 1
        if self._count % RARE_EVERY == 0:
            words[0] = RARE_WORD
        if self._half_word and self._count % 2 == 0 and len(words) > 1:
            words[1] = HALF_WORD
        role = ROLES[self._count % 2]
        return role, f"[{self._count}] " + " ".join(words)[: self._size]

    def many(self, count: int) -> list[Message]:
        return [self.one() for _ in range(count)]
