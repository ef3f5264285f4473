"""`persistence stamp`: records the revision a store's tables are at, as `alembic
stamp` does, from an installed package (alembic's command line needs the source tree).

initialize() refuses a store whose version table does not say the revision its tables
are at, and names the revision to record. Unlike `alembic stamp`, this one checks the
tables first: it records a revision only if the tables are at it, so a wrong stamp
cannot make the next upgrade run revisions over tables that already have them.
"""

from __future__ import annotations

from sqlalchemy import Connection

from persistence.errors import MigrationError
from persistence.sql.revision_marks import (
    DATA_REVISIONS,
    missing_at,
    present_after,
    schema_revision,
)
from persistence.sql.revisions import HEAD, REVISIONS, version_heads
from persistence.sql.schema import (
    VERSION_TABLE,
    are,
    examine,
    listed,
    refuse_a_system_schema_first,
    refuse_if_claimed,
    refuse_without_version_table,
    script_directory,
    take_migration_lock,
)

BASE = "base"


def stamp(
    connection: Connection,
    revision: str,
    *,
    version_table: str = VERSION_TABLE,
    where: str = "the database",
) -> tuple[tuple[str, ...], str]:
    """Records `revision` ("head", "base" or a revision id) in the version table, in the
    connection's transaction.

    Returns:
        The revisions the version table held before, and the one it holds now ("base":
        none).

    Raises:
        MigrationError: for a revision that is not one of ours, or tables that are not
            at it (naming the revision they are at); nothing is written then.
    """
    wanted = HEAD if revision == "head" else revision
    if wanted != BASE and wanted not in REVISIONS:
        raise MigrationError(
            f"{revision!r} is not a revision of persistence: give head, base or one of"
            f" {', '.join(REVISIONS)}"
        )
    take_migration_lock(connection)
    refuse_a_system_schema_first(connection, where)
    before = version_heads(connection, version_table)
    newer = [head for head in before if head not in REVISIONS]
    if newer:
        # Found by attack: a store a newer version migrated was stamped back to this
        # version's head, and each version would then take the other's schema for its own.
        raise MigrationError(
            f"{where} is at schema revision {', '.join(newer)}, which this version of"
            " persistence does not know: a newer version wrote it; stamp it with that"
            " version (nothing was written)"
        )
    tables_at = schema_revision(connection)
    if tables_at is None and not before:
        _refuse_what_is_no_store(connection, version_table, where)
    if wanted == BASE:
        if tables_at is not None:
            raise MigrationError(
                f"{where} holds persistence's tables, at revision {tables_at} by their"
                f" columns: stamping it base would make an upgrade create them again;"
                f" stamp {tables_at} instead (nothing was written)"
            )
    else:
        missing, later = missing_at(connection, wanted), present_after(connection, wanted)
        if missing or later:
            at = f"revision {tables_at}" if tables_at else "no revision (0001's are incomplete)"
            why = (
                f"{listed(missing, ordered=True)} of that revision {are(missing)} not there"
                if missing
                else f"{listed(later, ordered=True)} of later revisions {are(later)} there"
            )
            raise MigrationError(
                f"{where}: its tables are not at revision {wanted}: {why}; they are at {at}"
                " by their columns (nothing was written)"
            )
        # A data revision the stamp would record as done, where neither the tables nor
        # the version table say it ran. Found by attack: `stamp head` on a SQLite store
        # at 0011 (0013 changes nothing there) recorded 0013, and 0012's rewrite never
        # ran: the next save failed.
        unproven = [
            data
            for data in DATA_REVISIONS
            if tables_at and tables_at < data <= wanted and all(head < data for head in before)
        ]
        if unproven:
            raise MigrationError(
                f"{where}: its tables are at revision {tables_at}, and revision"
                f" {', '.join(unproven)} changes only data, which the tables do not show:"
                f" stamp {tables_at}, and the upgrade runs {', '.join(unproven)} (again,"
                " if it ran: that changes nothing) (nothing was written)"
            )
    if wanted != BASE or before:  # base where no version row is: nothing to write
        from alembic.runtime.migration import MigrationContext

        context = MigrationContext.configure(connection, opts={"version_table": version_table})
        context.stamp(script_directory(), wanted)
    return before, wanted


def _refuse_what_is_no_store(connection: Connection, version_table: str, where: str) -> None:
    """Refuses a database with neither tables of ours nor a revision, as `alembic stamp`
    does: a SQLite file another application claimed (found by attack: the refusal named
    missing tables, not the claim), another application's (examine() says so), or an
    empty one (found by attack: `persistence stamp base` said "recorded as base")."""
    if connection.dialect.name == "sqlite":
        refuse_if_claimed(connection, where)
    examine(connection, version_table=version_table, where=where)
    refuse_without_version_table(
        connection, version_table, where, doing="stamp", create_with="`persistence upgrade`"
    )
