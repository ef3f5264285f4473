"""The revisions known without alembic (persistence.sql.revisions) are alembic's own."""

from __future__ import annotations

import pytest
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection, text
from sqlalchemy.ext.asyncio import create_async_engine

from persistence.sql.engines import async_driver_url
from persistence.sql.revisions import HEAD, REVISIONS, version_heads
from persistence.sql.schema import VERSION_TABLE, script_directory


def test_the_revisions_are_the_packaged_chain_oldest_first() -> None:
    script = script_directory()
    chain = list(script.walk_revisions())[::-1]
    assert tuple(revision.revision for revision in chain) == REVISIONS
    assert [revision.down_revision for revision in chain] == [None, *REVISIONS[:-1]]
    assert script.get_heads() == [HEAD]


def _alembics_reading(connection: Connection, version_table: str) -> tuple[str, ...]:
    context = MigrationContext.configure(connection, opts={"version_table": version_table})
    return tuple(context.get_current_heads())


_CREATED = "CREATE TABLE {table} (version_num VARCHAR(32) NOT NULL)"
# A version table's state: the statements that make it so, and the revisions it holds.
STATES: dict[str, tuple[list[str], tuple[str, ...]]] = {
    "missing": ([], ()),
    "empty": ([_CREATED], ()),
    "at head": ([_CREATED, f"INSERT INTO {{table}} VALUES ('{HEAD}')"], (HEAD,)),
    "two heads": ([_CREATED, "INSERT INTO {table} VALUES ('0003'), ('9999')"], ("0003", "9999")),
}


@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("version_table", [VERSION_TABLE, "order"])
async def test_version_heads_reads_the_version_table_as_alembic_does(
    fresh_url: str, state: str, version_table: str
) -> None:
    quoted = f'"{version_table}"'  # "order" is a reserved word on both engines
    engine = create_async_engine(async_driver_url(fresh_url))
    try:
        async with engine.begin() as connection:
            statements, held = STATES[state]
            for statement in statements:
                await connection.execute(text(statement.format(table=quoted)))
            ours = await connection.run_sync(version_heads, version_table)
            alembics = await connection.run_sync(_alembics_reading, version_table)
    finally:
        await engine.dispose()
    assert sorted(ours) == sorted(alembics) == sorted(held)
