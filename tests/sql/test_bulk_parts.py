"""PostgreSQL bulk inserts go as a COPY in parts, each built while the server stores the
part before (persistence.sql.bulk `copied_parts`, runner `_copy_unless_lost`)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from itertools import pairwise

import asyncpg
import pytest

from persistence.sql.bulk import FIRST_COPIED_PART, LARGEST_COPIED_PART, copied_parts
from persistence.sql.runner import _copy_unless_lost
from tests.servers import plain_postgresql_url


@pytest.mark.parametrize("total", [1, 63, 64, 65, 192, 193, 1200, 10_000])
def test_the_parts_cover_every_row_once_small_first_then_doubling_to_the_largest(
    total: int,
) -> None:
    parts = list(copied_parts(total))
    assert parts[0][0] == 0 and parts[-1][1] == total
    assert all(stop == start for (_, stop), (start, _) in pairwise(parts))
    sizes = [stop - start for start, stop in parts]
    assert all(size > 0 for size in sizes)
    full = [min(FIRST_COPIED_PART << n, LARGEST_COPIED_PART) for n in range(len(sizes))]
    assert sizes[:-1] == full[:-1] and sizes[-1] <= full[-1]


# The server takes this long to store a part: a trigger sleeps once per statement.
STORING_SECONDS = 0.4


@pytest.fixture
async def connection(postgresql_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A raw connection to the test database; the tables the tests make go with it."""
    opened = await asyncpg.connect(plain_postgresql_url(postgresql_url))
    try:
        yield opened
    finally:
        await opened.execute(
            "DROP TABLE IF EXISTS slow_parts, failing_parts;"
            " DROP FUNCTION IF EXISTS slow_parts_stored()"
        )
        await opened.close()


@pytest.mark.postgresql
async def test_the_next_part_is_built_while_the_server_stores_the_part_before(
    connection: asyncpg.Connection,
) -> None:
    await connection.execute(
        "CREATE TABLE slow_parts (n integer);"
        " CREATE FUNCTION slow_parts_stored() RETURNS trigger LANGUAGE plpgsql AS"
        f" $$ BEGIN PERFORM pg_sleep({STORING_SECONDS}); RETURN NULL; END $$;"
        " CREATE TRIGGER slow_parts AFTER INSERT ON slow_parts"
        " FOR EACH STATEMENT EXECUTE FUNCTION slow_parts_stored()"
    )
    built_at: list[float] = []

    def build_the_next_part() -> list[tuple[int]]:
        built_at.append(time.monotonic())
        return [(3,)]

    async with connection.transaction():
        following = await _copy_unless_lost(
            connection, "slow_parts", [(1,), (2,)], ["n"], build_the_next_part
        )
        stored_at = time.monotonic()
        assert await connection.fetchval("SELECT count(*) FROM slow_parts") == 2
    assert following == [(3,)] and len(built_at) == 1
    # Built once the rows were sent, while the server still stored them: the COPY
    # returned most of the server's time after it.
    assert stored_at - built_at[0] > STORING_SECONDS / 2


@pytest.mark.postgresql
async def test_a_part_that_fails_to_build_ends_the_copy_and_raises_its_error(
    connection: asyncpg.Connection,
) -> None:
    await connection.execute("CREATE TABLE failing_parts (n integer)")

    def build_the_next_part() -> list[tuple[int]]:
        raise ValueError("cannot build the next part")

    with pytest.raises(ValueError, match="cannot build the next part"):
        async with connection.transaction():
            await _copy_unless_lost(
                connection, "failing_parts", [(1,), (2,)], ["n"], build_the_next_part
            )
    assert await connection.fetchval("SELECT count(*) FROM failing_parts") == 0
    assert await connection.fetchval("SELECT 1") == 1
