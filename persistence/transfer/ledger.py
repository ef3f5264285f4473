"""What a migration did with each session it read: the state its verification checks.

Live writers may change either store while a migration runs and before its
verification reads them again. Revisions tell their writes apart from the copy's: a
destination session at the revision the copy left it holds exactly what the copy
wrote (or found) there, and a source session at the revision the copy read holds
what the copy read. Only those pairs can be compared truthfully.

The ledger holds one entry per session and per file record, so it lives in a private
temporary SQLite database (`sqlite3.connect("")`): SQLite keeps it in its page cache
(PRAGMA cache_size, 2 MB by default) and moves the rest to a temporary file, which
it deletes when the connection closes. Memory stays flat however large the store;
a dict of the entries took about 106 bytes per session (README "Moving data").
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple

from persistence.errors import PersistenceError
from persistence.transfer.sides import failing_store

INSERTED, MERGED, HELD = "inserted", "merged", "held"

_SCHEMA = """
CREATE TABLE sessions (
    seq INTEGER PRIMARY KEY,
    session_id TEXT NOT NULL UNIQUE,
    outcome TEXT NOT NULL,
    destination_revision INTEGER,
    source_revision INTEGER
);
CREATE TABLE files (
    seq INTEGER PRIMARY KEY,
    file_id TEXT NOT NULL UNIQUE,
    inserted INTEGER NOT NULL
);
"""
# A session or file recorded again keeps its place (the order it was first read in)
# and takes its latest outcome.
_RECORD_SESSION = (
    "INSERT INTO sessions (session_id, outcome, destination_revision, source_revision)"
    " VALUES (?, ?, ?, ?) ON CONFLICT (session_id) DO UPDATE SET outcome = excluded.outcome,"
    " destination_revision = excluded.destination_revision,"
    " source_revision = excluded.source_revision"
)
_RECORD_FILE = (
    "INSERT INTO files (file_id, inserted) VALUES (?, ?)"
    " ON CONFLICT (file_id) DO UPDATE SET inserted = excluded.inserted"
)


class Entry(NamedTuple):
    # INSERTED as a new session; MERGED: the destination held it, and the copy added
    # messages or metadata keys; HELD: the destination held everything it had.
    outcome: str
    destination_revision: int | None  # after the copy's write, or as the copy found it
    source_revision: int | None  # as the copy read it


class Ledger:
    """Per session id the copy read, in the order it read them: an `Entry`; per file
    id: whether the copy inserted the record (False: the destination held it, and its
    values are its own).

    `close()` deletes its temporary file (so does the connection's garbage collection).
    """

    def __init__(self) -> None:
        with _ledger_errors():
            self._db = _open()

    def record_sessions(self, entries: Sequence[tuple[str, Entry]]) -> None:
        """Records what became of each session id of a batch."""
        with _ledger_errors():
            self._db.executemany(
                _RECORD_SESSION, [(session_id, *entry) for session_id, entry in entries]
            )

    def record_files(self, entries: Sequence[tuple[str, bool]]) -> None:
        """Records, per file id of a batch, whether the copy inserted its record."""
        with _ledger_errors():
            self._db.executemany(_RECORD_FILE, entries)

    def __len__(self) -> int:
        with _ledger_errors():
            (count,) = self._db.execute("SELECT count(*) FROM sessions").fetchone()
        return int(count)

    def batches(self, size: int) -> Iterator[list[tuple[str, Entry]]]:
        """The recorded sessions and their entries, `size` at a time, in the order
        they were first recorded."""
        query = "SELECT seq, session_id, outcome, destination_revision, source_revision"
        for rows in self._pages(f"{query} FROM sessions", size):
            yield [(row[1], Entry(*row[2:])) for row in rows]

    def file_batches(self, size: int) -> Iterator[list[tuple[str, bool]]]:
        """The recorded file ids and whether the copy inserted them, `size` at a time,
        in the order they were first recorded."""
        for rows in self._pages("SELECT seq, file_id, inserted FROM files", size):
            yield [(file_id, bool(inserted)) for _, file_id, inserted in rows]

    def _pages(self, select: str, size: int) -> Iterator[list[tuple[Any, ...]]]:
        """The rows of `select` (its first column `seq`), `size` at a time, by `seq`."""
        after = 0
        while True:
            with _ledger_errors():
                rows = self._db.execute(
                    f"{select} WHERE seq > ? ORDER BY seq LIMIT ?", (after, size)
                ).fetchall()
            if not rows:
                return
            after = rows[-1][0]
            yield rows

    def close(self) -> None:
        self._db.close()


def _open() -> sqlite3.Connection:
    """A private temporary database with the ledger's tables."""
    # Autocommit: each batch's executemany is its own statement transaction. Calls
    # come one at a time, but a copy and its check may run on different threads.
    db = sqlite3.connect("", isolation_level=None, check_same_thread=False)
    # A scratch database: nothing in it must survive a crash, but a statement that
    # fails (a full disk) still rolls back, from a journal kept in memory.
    db.execute("PRAGMA journal_mode = MEMORY")
    db.execute("PRAGMA synchronous = OFF")
    db.executescript(_SCHEMA)
    return db


@contextmanager
def _ledger_errors() -> Iterator[None]:
    """SQLite's errors as the library's: a ledger that cannot write its temporary file
    (a full disk) stops the copy with an error that says so."""
    with failing_store("neither"):  # the transfer's own scratch database
        try:
            yield
        except sqlite3.Error as exc:
            raise PersistenceError(
                f"the migration's ledger failed: {exc} (SQLite writes its temporary file to"
                " SQLITE_TMPDIR, TMPDIR or /var/tmp)"
            ) from exc
