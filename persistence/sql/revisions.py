"""The schema revisions this version of persistence ships, and those a database holds,
known without importing alembic.

alembic runs the revisions (persistence.sql.schema). Opening a store already at head
needs only their ids and its version table: importing alembic for them (with mako, and
the revision modules to learn the head) took about 120 ms of every CLI command and of
every process's first open. tests/sql/test_revisions.py holds REVISIONS to the packaged
revisions' chain, and version_heads to alembic's own reading.
"""

from __future__ import annotations

from sqlalchemy import Connection, String, column, inspect, select, table

# Oldest first: each revision's down_revision is the one before it.
REVISIONS = (
    "0001",
    "0002",
    "0003",
    "0004",
    "0005",
    "0006",
    "0007",
    "0008",
    "0009",
    "0010",
    "0011",
    "0012",
    "0013",
    "0014",
    "0015",
)
HEAD = REVISIONS[-1]


def version_heads(connection: Connection, version_table: str) -> tuple[str, ...]:
    """The revisions `version_table` holds (empty if it is empty or missing), read as
    alembic's `MigrationContext.get_current_heads` reads them."""
    if not inspect(connection).has_table(version_table):
        return ()
    version_num = column("version_num", String)
    rows = connection.execute(select(version_num).select_from(table(version_table, version_num)))
    return tuple(row[0] for row in rows)
