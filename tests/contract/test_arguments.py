"""Counts given to reads: anything but an int in 0..2**63-1 is refused, alike everywhere."""

from __future__ import annotations

from typing import Any

import pytest

from persistence import InvalidDataError, SessionStorage
from tests.factories import conversation

# Each was once answered differently by SQLite and PostgreSQL: a raw OverflowError or
# TypeError, a "datatype mismatch", or a float silently cut to an int.
NOT_COUNTS: list[Any] = [-1, 2**63, 10**20, 2.5, 2.0, "3", True, False, None]


@pytest.mark.parametrize("last", [value for value in NOT_COUNTS if value is not None])
async def test_load_session_refuses_a_last_that_is_not_a_count(
    storage: SessionStorage, last: Any
) -> None:
    session = conversation(3)
    await storage.save_session(session)

    with pytest.raises(InvalidDataError, match="last"):
        await storage.load_session(session.session_id, last=last)


@pytest.mark.parametrize("value", NOT_COUNTS)
async def test_pages_refuse_a_limit_or_offset_that_is_not_a_count(
    storage: SessionStorage, value: Any
) -> None:
    with pytest.raises(InvalidDataError, match="limit"):
        await storage.list_sessions(limit=value)
    with pytest.raises(InvalidDataError, match="offset"):
        await storage.list_sessions(offset=value)
    with pytest.raises(InvalidDataError, match="limit"):
        await storage.list_file_records(limit=value)
    with pytest.raises(InvalidDataError, match="limit"):
        await storage.search_messages("word", limit=value)


async def test_the_largest_counts_are_taken(storage: SessionStorage) -> None:
    session = conversation(3)
    await storage.save_session(session)

    loaded = await storage.load_session(session.session_id, last=2**63 - 1)
    assert loaded is not None and len(loaded.messages) == 3
    assert len(await storage.list_sessions(limit=2**63 - 1)) == 1
    assert await storage.list_sessions(limit=1, offset=2**63 - 1) == []
    assert await storage.list_file_records(limit=2**63 - 1) == []
