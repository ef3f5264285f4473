"""Alembic environment: runs the packaged revisions on the configured database.

The database is `-x url=...` when given, else the one the library's configuration
names (STORAGE_* variables, then the config file, then the default SQLite file).
The revision is kept in persistence's own version table (`-x version_table=...` names
another), beside any other application's tables and `alembic_version`; a store whose
`alembic_version` holds one of our revisions is moved to it first.
"""

from __future__ import annotations

import asyncio
from typing import Any

from sqlalchemy import Connection, pool
from sqlalchemy.ext.asyncio import create_async_engine

from alembic import context
from persistence.errors import MigrationError
from persistence.sql.engines import async_driver_url
from persistence.sql.schema import VERSION_TABLE, adopt_legacy_version, examine, script_directory
from persistence.sql.tables import SEARCH_OBJECTS, Base

_VERSION_TABLE = context.get_x_argument(as_dictionary=True).get("version_table", VERSION_TABLE)


def _configured_url() -> str:
    explicit = context.get_x_argument(as_dictionary=True).get("url")
    if explicit:
        return explicit
    from persistence.config import load_config, sql_url

    return sql_url(load_config())


def _include_object(
    obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any
) -> bool:
    # Full-text search objects are dialect-specific DDL that the ORM does not declare.
    return not (name or "").startswith(tuple(SEARCH_OBJECTS))


def _adopt_legacy_version(connection: Connection) -> None:
    try:
        state = examine(connection, script_directory(), version_table=_VERSION_TABLE)
    except MigrationError:
        return  # tables of another application: ours are created beside them
    if state.legacy:
        adopt_legacy_version(connection, _VERSION_TABLE)


def _run(connection: Connection) -> None:
    with connection.begin():
        _adopt_legacy_version(connection)
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        include_object=_include_object,
        compare_type=True,
        version_table=_VERSION_TABLE,
    )
    with context.begin_transaction():
        context.run_migrations()


async def _run_online() -> None:
    engine = create_async_engine(async_driver_url(_configured_url()), poolclass=pool.NullPool)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(_run)
    finally:
        await engine.dispose()


if context.is_offline_mode():
    context.configure(
        url=async_driver_url(_configured_url()),
        target_metadata=Base.metadata,
        literal_binds=True,
        version_table=_VERSION_TABLE,
    )
    with context.begin_transaction():
        context.run_migrations()
else:
    asyncio.run(_run_online())
