"""Runs the packaged alembic revisions on a live connection."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic.config import Config
from alembic.runtime.environment import EnvironmentContext
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, text

from persistence.errors import SchemaVersionError
from persistence.sql.tables import Base

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
# Any constant works: it only has to be the same for every process of this library.
_PG_MIGRATION_LOCK = 7_274_551_337


def script_directory() -> ScriptDirectory:
    """Returns the revisions that ship inside the package."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return ScriptDirectory.from_config(config)


def check_known_revision(connection: Connection, script: ScriptDirectory) -> tuple[str, ...]:
    """Returns the database's current heads.

    Raises:
        SchemaVersionError: if a head is a revision this code does not know.
    """
    heads = MigrationContext.configure(connection).get_current_heads()
    known = {rev.revision for rev in script.walk_revisions()}
    unknown = [head for head in heads if head not in known]
    if unknown:
        raise SchemaVersionError(
            f"database schema is at revision {', '.join(unknown)}, which this version of"
            f" persistence does not know (known head: {script.get_current_head()});"
            " it was written by a newer version: upgrade persistence"
        )
    return tuple(heads)


def upgrade_to_head(connection: Connection) -> None:
    """Brings the schema to head in the connection's transaction.

    Raises:
        SchemaVersionError: if the database is at a revision this code does not know.
    """
    if connection.dialect.name == "postgresql":
        # Two processes initialising one fresh database must not both create tables.
        connection.execute(text(f"SELECT pg_advisory_xact_lock({_PG_MIGRATION_LOCK})"))
    script = script_directory()
    heads = check_known_revision(connection, script)
    if heads == (script.get_current_head(),):
        return
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))

    def upgrade(revision: Any, context: MigrationContext) -> Any:
        return script._upgrade_revs("head", revision)

    with EnvironmentContext(config, script, fn=upgrade) as env:
        env.configure(
            connection=connection,
            target_metadata=Base.metadata,
            render_as_batch=connection.dialect.name == "sqlite",
        )
        env.run_migrations()
