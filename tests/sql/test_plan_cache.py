"""PostgreSQL plans every execution: a cached generic plan must not outlive the data."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from persistence import PostgreSQLSessionStorage

pytestmark = pytest.mark.postgresql


async def test_every_pooled_connection_plans_each_execution(
    postgresql_storage: PostgreSQLSessionStorage,
) -> None:
    # A generic plan made while chat_messages was empty kept seq-scanning it once it
    # was large (autovacuum off): migrating 1000 sessions took 3x as long.
    async with postgresql_storage.engine.connect() as connection:
        setting = (await connection.execute(text("SHOW plan_cache_mode"))).scalar_one()
    assert setting == "force_custom_plan"
