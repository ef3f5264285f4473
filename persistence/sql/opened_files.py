"""The files of an open SQLite store stay the ones it opened: checked in each transaction.

A SQLite store in WAL mode is three files: the database, and beside it its `-wal`
(the commits not yet copied into the database) and `-shm` (the index of the -wal
that every connection shares). While a connection is open SQLite never removes
either; only the last connection to close does.

Found by attack:
- a store moved onto the path of an open storage (`mv other.db live.db`, a backup
  restored while the service runs) took saves that reported success into the old,
  unlinked file, lost with it, and the -wal they wrote beside the path corrupted the
  new file;
- with its `-wal` removed (`rm live.db-wal`, a cleanup script), saves went on
  reporting success into the unlinked -wal: after a kill all of them were gone, and
  the saves from before the removal too;
- with its `-shm` removed, a second process made a new one, and the two wrote the
  -wal each by its own index: `integrity_check` failed after 1,500 saves.

So each transaction, once begun (a write's BEGIN IMMEDIATE holds the write lock),
checks that the path still names the database it opened, and, in a storage that
writes, that its -shm is still the one there when it opened: nothing is written, nor
read, after one of them changed. Its -wal is checked so at most every
`WAL_CHECK_SECONDS`: a `stat` of the -wal, just written and synced, took 50-80 us in
this process (an append at history 10 took 460-519 us against 395-455 without it,
alternated in fresh processes), where the database's and the -shm's take about 1 us.
So saves in the first 0.1 s after a -wal was removed can still be acknowledged into
the unlinked file: closing the storage copies them into the database (SQLite
checkpoints the -wal it holds when it closes); a kill before that loses them.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from persistence.errors import PersistenceError

WAL_CHECK_SECONDS = 0.1


def _identity(path: str) -> tuple[int, int] | None:
    try:
        found = os.stat(path)
    except FileNotFoundError:
        return None
    return found.st_dev, found.st_ino


class OpenedFiles:
    """`check()`: PersistenceError unless the store's files are those it opened."""

    __slots__ = ("_database", "_path", "_path_text", "_shm", "_wal", "_wal_checked")

    def __init__(self, path: Path, database: os.stat_result, *, writing: bool) -> None:
        self._path = path
        self._path_text = str(path)  # a stat of text: no Path conversion each transaction
        self._database = (database.st_dev, database.st_ino)
        # SQLite names them after the file itself, through any symlink. Only a writing
        # storage checks them: a reader may not hold the -shm (a read-only file or
        # directory), so the last writer's close may remove both under it, rightly.
        real = os.path.realpath(path)
        self._shm = self._beside(real + "-shm", writing)
        self._wal = self._beside(real + "-wal", writing)
        self._wal_checked = time.monotonic()

    @staticmethod
    def _beside(name: str, writing: bool) -> tuple[str, tuple[int, int]] | None:
        found = _identity(name) if writing else None
        return None if found is None else (name, found)

    def __call__(self) -> None:
        """Raises PersistenceError, naming the path, if a file was replaced or removed."""
        if _identity(self._path_text) != self._database:
            raise PersistenceError(
                f"{self._path}: the database file was replaced or removed while open: close"
                " and open the storage again"
            )
        self._check(self._shm)
        if self._wal is not None and time.monotonic() - self._wal_checked >= WAL_CHECK_SECONDS:
            self._check(self._wal)
            self._wal_checked = time.monotonic()

    def _check(self, opened: tuple[str, tuple[int, int]] | None) -> None:
        if opened is not None and _identity(opened[0]) != opened[1]:
            name = opened[0]
            raise PersistenceError(
                f"{self._path}: its {name[-4:]} file ({name}) was replaced or removed while"
                " open, so what this storage wrote would be lost or corrupt the store:"
                " nothing more is written; close and open the storage again"
            )
