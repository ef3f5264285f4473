"""Which database a PostgreSQL server serves: its cluster, the database in it, the
schema the store's tables are in, and the store's own id there.

A storage's bookkeeping token (persistence.turns) names the store by its id, oid and
schema, so one store is one store through any URL, pool, replica or role, and another
database or schema is another; a read replica serves reads only while it shows the
primary's cluster, database and schema (persistence.sql.standby).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from persistence.sql.checkout import driver_connection

# The cluster's system identifier (a standby cloned from it keeps it) and the database's
# oid (physical replication keeps it): what a copy of a database shares with it. And the
# schema unqualified names resolve to, where the store's tables are (a URL may choose
# another, with `options=-c search_path=...`): one database can hold several stores.
SYSTEM_IDENTIFIER = "SELECT system_identifier FROM pg_control_system()"
# When the server started: a physical copy of the cluster (a promoted standby, a clone)
# keeps the identity above, but runs apart from it, started at another moment.
SERVER_STARTED = "SELECT pg_postmaster_start_time()::text"
DATABASE_OID_AND_SCHEMA = (
    "SELECT oid, current_schema() FROM pg_database WHERE datname = current_database()"
)
# The id the store drew when it was made (revision 0015), in the schema of unqualified
# names: what a storage's token names the store by.
STORE_ID = "SELECT value FROM persistence_store WHERE name = 'store_id'"


@dataclass(frozen=True, slots=True)
class Identity:
    """Which database a server serves: its cluster (None: not told), its oid, and the
    schema of unqualified names (None: no schema of the search path exists); and, for
    the store's own database (database_identity), the id its store drew."""

    system: int | None
    oid: int
    schema: str | None = None
    store: str | None = None
    """The store's own id (None: the database holds none this role may read)."""
    unread: str | None = None
    """Why `store` is None (no table, a privilege, a missing row)."""

    def token(self) -> str | None:
        """The store's bookkeeping token (SessionStorage.token): one store through any
        URL, pool, replica or role; None where the store's id cannot be read (`unread`
        says why).

        Found by attack: two stores in two schemas of one database had one token, so
        a session saved to one was refused by the other as deleted, and `migrate`
        between them called them the same store.

        The store's own id, with the oid and schema, names it: not the cluster's
        identifier, which some hosts withhold from some roles (found by attack: two
        spellings of one database's URL, then two roles, then storages opened before
        and after a REVOKE, were two stores, and a stale save through one wrote over
        another writer's later changes). A copy of the database keeps the id, as a
        physical copy keeps the cluster's identifier: on another server, in a database
        of the same oid, it is one store with it to the bookkeeping, told apart by
        running_instance.
        """
        if self.store is None:
            return None
        return f"store {self.store}:{self.oid}:{self.schema}"

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
        if replica.schema is None:
            return "its search_path names no schema that exists there (or that the role may use)"
        if replica.schema != self.schema:
            return (
                f"its search path reads schema {replica.schema!r}, the primary's"
                f" {self.schema!r} (another store of the database)"
            )
        return None


async def identity_of(connection: Any) -> Identity:
    """The identity of the database an asyncpg connection serves."""
    import asyncpg

    oid, schema = await connection.fetchrow(DATABASE_OID_AND_SCHEMA)
    try:
        system = await connection.fetchval(SYSTEM_IDENTIFIER)
    except (
        asyncpg.InsufficientPrivilegeError,
        asyncpg.UndefinedFunctionError,
        asyncpg.FeatureNotSupportedError,
    ):
        # A privilege some hosts withhold, or a function a server does not have. Only
        # these: found by attack, a connection ended by the server during the query (a
        # fast shutdown, pg_terminate_backend, a failover) was taken for a withheld
        # identifier; the storage then opened under another token, and a save made
        # through it of a session loaded through another storage of the same store
        # wrote over that session's later changes.
        system = None
    return Identity(None if system is None else int(system), int(oid), schema)


async def _store_id(connection: Any) -> tuple[str | None, str | None]:
    """The store's id (STORE_ID), or None and why there is none to read: a database not
    at revision 0015 (a replica not caught up), a role that may not read it, a row
    deleted by hand."""
    import asyncpg

    try:
        value = await connection.fetchval(STORE_ID)
    except asyncpg.UndefinedTableError:
        return None, "there is no table persistence_store (revision 0015)"
    except asyncpg.InsufficientPrivilegeError:
        return None, "this role may not read the table persistence_store (grant it SELECT)"
    if value is None:
        return None, (
            "persistence_store holds no store_id row (deleted by hand? put the old one"
            " back; or a new one: INSERT INTO persistence_store (name, value) VALUES"
            " ('store_id', md5(random()::text || clock_timestamp()::text)), then restart"
            " every process that has this store open: their storages know the old one)"
        )
    return str(value), None


async def server_started(engine: AsyncEngine) -> str:
    """When the server a pool's connections reach started (SERVER_STARTED)."""
    async with driver_connection(engine) as driver:
        return str(await driver.fetchval(SERVER_STARTED))


class NotThisDatabase(Exception):
    """The server is not a copy of the primary's database (the message says why)."""


async def database_identity(engine: AsyncEngine) -> Identity:
    """The identity of the database a pool's connections serve, with its store's id:
    the token's (a replica's connections are checked by identity_of alone, without it)."""
    async with driver_connection(engine) as driver:
        identity = await identity_of(driver)
        store, unread = await _store_id(driver)
    return replace(identity, store=store, unread=unread)
