"""The store's own identity: a random id drawn when this table is made.

A storage's bookkeeping token names the store (persistence.sql.identity): on PostgreSQL
by the cluster's system identifier, the database's oid and the schema. Some hosts
withhold the system identifier (pg_control_system()); the token then held the URL as
displayed, so one database reached by two spellings (a host name and its address, a
port in the query) was two stores to the bookkeeping, and a session loaded through one
and saved through the other wrote another writer's later changes over (left by the
twenty-ninth round's attacks). The id drawn here, in the database, is the same by any
URL, and another database (or schema) draws its own.

The id is drawn by the server, in the statement that stores it. SQLite has the table
too (one set of tables); its token is the file's, so it does not read it. Both keep
their notes there too (persistence.store_notes): a copy into the store not finished.

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa

from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None

# 32 random hex digits, as the library's ids are.
_DRAWN = {
    "postgresql": "md5(random()::text || clock_timestamp()::text || pg_backend_pid()::text)",
    "sqlite": "lower(hex(randomblob(16)))",
}


def upgrade() -> None:
    op.create_table(
        "persistence_store",
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("value", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_persistence_store")),
    )
    drawn = _DRAWN[op.get_context().dialect.name]
    op.execute(f"INSERT INTO persistence_store (name, value) VALUES ('store_id', {drawn})")  # noqa: S608


def downgrade() -> None:
    op.drop_table("persistence_store")
