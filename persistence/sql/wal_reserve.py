"""A SQLite WAL file grown once, when a storage opens, instead of by every commit.

SQLite deletes a store's `-wal` file when its last connection closes, and a new one
grows by every commit until the first checkpoint starts it over (after
`wal_autocheckpoint` frames, 1,000 by default). While it grows, each commit's fsync
also writes the file's new size to the file system's journal: a SQLite append (about 7
pages) took 374 us on average over its first 200 commits, against 299 us on a file
grown beforehand (plain sqlite3, our schema, WAL, synchronous=FULL, ten stores a side,
alternated). So a freshly opened store was slower for its first 140 or so appends.

`reserve_wal` grows the file to the size it keeps after the first checkpoint anyway,
without committing anything: in a transaction it writes that many pages of a table it
creates, with a small page cache, so SQLite spills them to the WAL as frames of no
commit; the ROLLBACK undoes all of it, and the next commit writes its frames over them
from the start. Readers never see such frames (only a commit frame makes earlier frames
part of the database), and crash recovery ignores them. It never waits for the write
lock and never fails an open: another writer or a read-only directory leave the WAL as
it was.

Found by attack, so bounded: on a nearly full disk the reserve took the last free
space, and the checkpoint then could not grow the database, so the WAL was never
emptied and later saves and backups failed. It now reserves only where the file system
keeps `_FREE_MARGIN` (or the database's size, if larger) free beyond it, and a write
that fails half way is cut back to the file's size before it, under the write lock (no
reader reads past the last commit's frame). With 64 KiB pages the reserve was 66 MB and
an open ten times slower: it is at most `_MAX_RESERVE`.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
from pathlib import Path

# A WAL file's header, and each frame's header before its page (SQLite's file format).
_WAL_HEADER = 32
_FRAME_HEADER = 24
# Pages the spilling transaction keeps in memory: the rest go to the WAL.
_SPILL_CACHE_PAGES = 16
# The default WAL (1,000 frames of 4 KiB pages) is 4.1 MB: larger pages reserve no more.
_MAX_RESERVE = 4_200_000
# Space the file system must keep free beyond the reserve (or the database's size).
_FREE_MARGIN = 64 * 1024 * 1024


def reserve_wal(connection: sqlite3.Connection, database: Path, busy_timeout_ms: int) -> int:
    """Grows `database`'s WAL file to hold `wal_autocheckpoint` frames, if it is smaller.

    Runs in the connection's thread, outside a transaction. Returns the bytes the file
    grew by (0: it was large enough, the write lock was taken, or writing failed).
    """
    try:
        return _reserve(connection, Path(os.path.realpath(database) + "-wal"), busy_timeout_ms)
    except sqlite3.Error:
        return 0


def _reserve(connection: sqlite3.Connection, wal: Path, busy_timeout_ms: int) -> int:
    page_size = connection.execute("PRAGMA page_size").fetchone()[0]
    frames = connection.execute("PRAGMA wal_autocheckpoint").fetchone()[0]
    frame = _FRAME_HEADER + page_size
    wanted = min(_WAL_HEADER + frames * frame, _MAX_RESERVE)
    if frames <= 0 or file_size(wal) >= wanted or connection.in_transaction:
        return 0
    database = wal.with_name(wal.name.removesuffix("-wal"))
    if _free_bytes(wal.parent) < wanted + max(_FREE_MARGIN, file_size(database)):
        return 0
    cache_size = connection.execute("PRAGMA cache_size").fetchone()[0]
    connection.execute(f"PRAGMA cache_size = {_SPILL_CACHE_PAGES}")
    connection.execute("PRAGMA busy_timeout = 0")
    before = 0
    try:
        connection.execute("BEGIN IMMEDIATE")
        try:
            # Measured under the write lock: no commit grows the file from here.
            before = file_size(wal)
            connection.execute("CREATE TABLE persistence_wal_reserve (page BLOB)")
            # One row a page (a blob of three quarters of a page never shares one), and
            # the pages the cache keeps, which never reach the WAL.
            connection.execute(
                "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?)"
                " INSERT INTO persistence_wal_reserve SELECT zeroblob(?) FROM n",
                (max(wanted - before, 0) // frame + _SPILL_CACHE_PAGES + 1, page_size * 3 // 4),
            )
        except sqlite3.Error:
            # A full disk half way: the frames written are no commit's, and the lock is
            # still held, so the file goes back to its size before them.
            if connection.in_transaction:
                _truncate(wal, before)
            raise
        finally:
            if connection.in_transaction:
                connection.execute("ROLLBACK")
    finally:
        connection.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        connection.execute(f"PRAGMA cache_size = {int(cache_size)}")
    return max(file_size(wal) - before, 0)


def _free_bytes(directory: Path) -> int:
    try:
        return shutil.disk_usage(directory).free
    except OSError:
        return 0


def _truncate(path: Path, size: int) -> None:
    try:
        if file_size(path) > size:
            os.truncate(path, size)
    except OSError:
        pass


def file_size(path: Path) -> int:
    """The size of the file at `path`, 0 if there is none (or it cannot be told)."""
    try:
        return path.stat().st_size
    except OSError:
        return 0
