"""PostgreSQL databases must store text as UTF-8.

Found by attack: `initialize()` accepted any server encoding. On SQL_ASCII (what
initdb picks under the C locale when none is given) the server cut index terms at 200
bytes where queries are cut at 200 characters, so a long non-ASCII word stored through
the index was not found; on LATIN1 a save or a search of `日本語` failed with the
server's UntranslatableCharacterError. A database that is not UTF8 is refused when a
storage would write to it; opening it for reading stays possible, so its data can
still be moved out (`persistence migrate --from`).
"""

from __future__ import annotations

from sqlalchemy import Connection, text

from persistence.errors import MigrationError


def check_server_encoding(connection: Connection, where: str) -> None:
    """Raises unless the PostgreSQL database stores text as UTF-8.

    Raises:
        MigrationError: naming the encoding, and how to make a UTF8 database.
    """
    encoding = connection.execute(text("SHOW server_encoding")).scalar_one()
    if encoding != "UTF8":
        raise MigrationError(
            f"{where} stores text as {encoding}, and persistence needs UTF8 (messages in"
            " any script, searched alike): create the database with ENCODING 'UTF8'"
            " (CREATE DATABASE name ENCODING 'UTF8' TEMPLATE template0), then move the"
            " data with `persistence migrate --from OLD --to NEW`; nothing was written"
        )
