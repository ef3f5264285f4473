"""Which database a PostgreSQL server serves: its cluster and the database in it.

A storage's bookkeeping token (persistence.turns) names the store by it, so one store
is one store through any URL, pool or replica, and another database (a dump restored
elsewhere) is another; a read replica serves reads only while it shows the primary's
(persistence.sql.standby).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from persistence.sql.checkout import driver_connection

# The cluster's system identifier (a standby cloned from it keeps it) and the database's
# oid (physical replication keeps it): what a copy of a database shares with it.
SYSTEM_IDENTIFIER = "SELECT system_identifier FROM pg_control_system()"
DATABASE_OID = "SELECT oid FROM pg_database WHERE datname = current_database()"


@dataclass(frozen=True, slots=True)
class Identity:
    """Which database a server serves: its cluster (None: not told) and its oid."""

    system: int | None
    oid: int

    def token(self, fallback: str) -> str:
        """The store's bookkeeping token (SessionStorage.token): one store through any
        URL, pool or replica. `fallback` stands for an identifier the server withholds."""
        return f"{fallback if self.system is None else self.system}:{self.oid}"

    def mismatch(self, replica: Identity) -> str | None:
        """What keeps `replica` from being known as a copy of this database, or None."""
        if self.system is None:
            return (
                "the primary does not tell its system identifier (pg_control_system()):"
                " the replica cannot be known to be a copy of its database"
            )
        if replica.system is None:
            return "it does not tell its system identifier (pg_control_system())"
        if replica.system != self.system:
            return (
                f"it belongs to another cluster (system identifier {replica.system},"
                f" the primary's is {self.system})"
            )
        if replica.oid != self.oid:
            return (
                f"it is another database of the cluster (oid {replica.oid},"
                f" the primary's database is oid {self.oid})"
            )
        return None


async def identity_of(connection: Any) -> Identity:
    """The identity of the database an asyncpg connection serves."""
    import asyncpg

    oid = await connection.fetchval(DATABASE_OID)
    try:
        system = await connection.fetchval(SYSTEM_IDENTIFIER)
    except asyncpg.PostgresError:  # a privilege some hosts withhold
        system = None
    return Identity(None if system is None else int(system), int(oid))


class NotThisDatabase(Exception):
    """The server is not a copy of the primary's database (the message says why)."""


async def database_identity(engine: AsyncEngine) -> Identity:
    """The identity of the database a pool's connections serve."""
    async with driver_connection(engine) as driver:
        return await identity_of(driver)
