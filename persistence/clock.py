"""The one clock of the library: UTC, truncated to the millisecond.

`utc_now` stamps every message `add_message` builds, thousands in a bulk insert, and
most of them fall in the same millisecond as the one before. The clock reads the
system time as an integer (`time.time_ns`, the clock `datetime.now` reads too) and
gives back the datetime it made last while the millisecond is unchanged: 0.2 us a
call instead of 1.3 (truncating a fresh `datetime.now` rebuilt the object).
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_NS_PER_MS = 1_000_000


def truncate_to_millisecond(value: datetime) -> datetime:
    """Drops the sub-millisecond part: MongoDB keeps milliseconds, so every backend does."""
    return value.replace(microsecond=value.microsecond - value.microsecond % 1000)


# The last millisecond read and its datetime: one tuple, swapped whole, so a thread
# never pairs one millisecond with another's datetime.
_last: tuple[int, datetime] = (0, _EPOCH)


def utc_now() -> datetime:
    """Returns the current time, timezone-aware in UTC, truncated to the millisecond."""
    global _last
    milliseconds = time.time_ns() // _NS_PER_MS
    last_milliseconds, last = _last
    if milliseconds == last_milliseconds:
        return last
    now = _EPOCH + timedelta(milliseconds=milliseconds)
    _last = (milliseconds, now)
    return now


# About 1,100 years: the cut-off of an expiry (now minus this) stays a valid date.
MAX_EXPIRY_HOURS = 10_000_000
# How long `persistence cleanup` keeps the record of a deleted session by default: a
# save that retries a creation of unknown outcome is never that old in practice.
DELETION_RECORD_DAYS = 30.0
