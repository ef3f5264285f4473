"""The one clock of the library: UTC, truncated to the millisecond."""

from __future__ import annotations

from datetime import UTC, datetime


def truncate_to_millisecond(value: datetime) -> datetime:
    """Drops the sub-millisecond part: MongoDB keeps milliseconds, so every backend does."""
    return value.replace(microsecond=value.microsecond - value.microsecond % 1000)


def utc_now() -> datetime:
    """Returns the current time, timezone-aware in UTC, truncated to the millisecond."""
    return truncate_to_millisecond(datetime.now(UTC))
