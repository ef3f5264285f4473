"""The library's clock: UTC, to the millisecond, never behind the system's time."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime

from persistence.clock import truncate_to_millisecond, utc_now


def test_now_is_the_system_time_in_utc_cut_to_the_millisecond() -> None:
    for _ in range(20_000):
        before = truncate_to_millisecond(datetime.now(UTC))
        now = utc_now()
        after = truncate_to_millisecond(datetime.now(UTC))
        assert before <= now <= after
        assert now.tzinfo is UTC and now.microsecond % 1000 == 0


def test_a_new_millisecond_gives_a_new_time() -> None:
    first = utc_now()
    time.sleep(0.003)
    assert utc_now() > first


def test_threads_reading_together_each_get_a_right_time() -> None:
    wrong: list[tuple[datetime, datetime, datetime]] = []

    def read() -> None:
        for _ in range(5_000):
            before = truncate_to_millisecond(datetime.now(UTC))
            now = utc_now()
            after = truncate_to_millisecond(datetime.now(UTC))
            if not before <= now <= after:
                wrong.append((before, now, after))

    threads = [threading.Thread(target=read) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert wrong == []
