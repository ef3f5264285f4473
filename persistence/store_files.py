"""Which of a SQLite store's own files a path names: the database or a journal of it.

Writing there (an export, a rendering, a migration's copy) would replace the store, or
be wiped by it. The journals are beside the file a symlink stands for, so both places
count; a path is the file through any symlink or hard link.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from stat import S_ISDIR, S_ISFIFO, S_ISLNK, S_ISREG
from typing import TYPE_CHECKING

from persistence.errors import InvalidDataError

if TYPE_CHECKING:
    from collections.abc import Iterator

    from persistence.storage import SessionStorage

# The files SQLite keeps for a database: the file itself and its journals.
SQLITE_FILE_SUFFIXES = ("", "-wal", "-shm", "-journal")


def same_file(first: Path, second: Path) -> bool:
    """Whether two paths name one file: through a symlink or a hard link too, and, for
    a file not there yet, by the path it would have."""
    try:
        return os.path.samefile(first, second)
    except OSError:  # one of them does not exist (yet)
        return os.path.realpath(first) == os.path.realpath(second)


def _store_files(store: Path) -> Iterator[tuple[Path, str]]:
    """Each file of the SQLite store at `store` (beside its path and its realpath),
    with what it is ("the store X", "the wal file of the store X")."""
    for base in dict.fromkeys((store, Path(os.path.realpath(store)))):
        for suffix in SQLITE_FILE_SUFFIXES:
            what = f"the {suffix[1:]} file of the store" if suffix else "the store"
            yield base.with_name(base.name + suffix), f"{what} {store}"


def sqlite_file_role(path: str | Path, store: Path) -> str | None:
    """Which file of the SQLite store at `store` `path` is, or None."""
    for named, what in _store_files(store):
        if same_file(Path(path), named):
            return what
    return None


def sqlite_file_roles_of_descriptors(
    descriptors: tuple[int, ...], store: Path
) -> tuple[str | None, ...]:
    """Which file of the SQLite store at `store` each open file of `descriptors` is, as
    sqlite_file_role tells it of a path, or None (also if it cannot be told); the
    store's files looked at once for all."""
    opened: list[os.stat_result | None] = []
    for descriptor in descriptors:
        try:
            opened.append(os.fstat(descriptor))
        except (OSError, ValueError):
            opened.append(None)
    roles: list[str | None] = [None] * len(descriptors)
    if not any(opened):
        return tuple(roles)
    for named, what in _store_files(store):
        try:
            found = os.stat(named)
        except OSError:
            continue
        for index, stat in enumerate(opened):
            if roles[index] is None and stat is not None and os.path.samestat(found, stat):
                roles[index] = what
    return tuple(roles)


# How each SQLite file that text written into would damage begins (its first bytes), and
# what it is: a database, a write-ahead log (either byte order of its checksums), a hot
# rollback journal.
_DATABASE_HEAD = b"SQLite format 3\x00"
# A rollback journal begins so while it holds a transaction not yet committed or rolled
# back (a "hot" one); SQLite zeroes it or deletes the file after.
_JOURNAL_HEAD = bytes.fromhex("d9d505f920a163d7")
_SQLITE_HEADS = (
    (_DATABASE_HEAD, "database"),
    (bytes.fromhex("377f0682"), "write-ahead log"),
    (bytes.fromhex("377f0683"), "write-ahead log"),
    (_JOURNAL_HEAD, "rollback journal"),
)
# The journals SQLite keeps beside a database, by the suffix of their names.
_JOURNAL_SUFFIXES = (
    ("-wal", "write-ahead log"),
    ("-journal", "rollback journal"),
    ("-shm", "shared-memory index"),
)


def sqlite_kind_of_descriptor(descriptor: int) -> str | None:
    """What SQLite file the open file `descriptor` is: "the SQLite database PATH" (or
    "a SQLite database" where its path cannot be told), or None: not a regular file,
    not such a file, or it cannot be read.

    Told by how it begins (a database, a write-ahead log, a hot rollback journal), else
    by its name beside a database: `-wal`, `-journal`, `-shm` (found by attack: the
    journal of a transaction under way begins with zeros until its commit).

    Any store's, not only the configured one's: the command line checks its standard
    output and error with it before it parses its arguments, when it does not know the
    store yet (found by attack: a usage error, `--help` or `--version` appended to a
    store by `2>> store.db` or `>> store.db`).
    """
    try:
        opened = os.fstat(descriptor)
    except (OSError, ValueError):
        return None
    if not S_ISREG(opened.st_mode):
        return None
    path = _path_of(descriptor, opened)
    if (kind := _kind_by_head(_head_of(descriptor, opened))) is not None:
        return f"a SQLite {kind}" if path is None else f"the SQLite {kind} {path}"
    if path is not None and (journal := journal_beside_a_database(path)) is not None:
        return f"the SQLite {journal[0]} {path}"
    return None


def sqlite_kind_of_path(path: str | Path) -> str | None:
    """What SQLite file `path` stands for, as sqlite_kind_of_descriptor tells an open
    file: "a SQLite database" (a write-ahead log, a hot rollback journal) by how it
    begins, "the write-ahead log of the SQLite database X" (or another journal) by its
    name beside a database X; None if it is not there, not a regular file or neither.

    Found by attack: `export-all other.db` replaced another store's database with the
    export, and `export-all other.db-wal` wrote into its log; only the configured
    store's own files were refused.
    """
    if _unreadable(os.fspath(path)):
        return "a file this process cannot read, which may be a SQLite database"
    if (kind := _kind_by_head(_head_at(os.fspath(path)))) is not None:
        return f"a SQLite {kind}"
    if (journal := journal_beside_a_database(path)) is not None:
        return f"the {journal[0]} of the SQLite database {journal[1]}"
    name = os.path.realpath(path)
    for suffix, kind in _JOURNAL_SUFFIXES:
        if name.endswith(suffix) and _unreadable(name[: -len(suffix)], follow=False):
            return (
                f"named as the {kind} of {name[: -len(suffix)]}, which this process cannot"
                " read, so it may be a SQLite database"
            )
    return None


def _unreadable(path: str, *, follow: bool = True) -> bool:
    """Whether `path` is a regular file that this process may not open for reading: it
    cannot be told from a database. Found by attack: another user's 0600 database in a
    directory the caller may write was replaced by an export (the rename needs only
    the directory), and an export named as its -wal made it unopenable."""
    flags = os.O_RDONLY | os.O_NONBLOCK | (0 if follow else os.O_NOFOLLOW)
    try:
        os.close(os.open(path, flags))
    except PermissionError:
        with contextlib.suppress(OSError):
            return S_ISREG(os.stat(path, follow_symlinks=follow).st_mode)
    except OSError:
        pass
    return False


def _kind_by_head(head: bytes) -> str | None:
    for magic, kind in _SQLITE_HEADS:
        if head.startswith(magic):
            return kind
    return None


def journal_beside_a_database(path: str | Path) -> tuple[str, str] | None:
    """(what it is, the database's path) if the file `path` stands for is named as a
    journal of a SQLite database beside it (`X-wal`, `X-journal`, `X-shm` beside a
    regular file `X` that begins as a database), else None. Such a file may be empty or
    not there yet.

    Where the file is, not the name given: SQLite keeps a database's journals beside
    the file a symlink stands for (found by attack: a symlink to `X-wal` was taken, and
    `lnk-wal` beside a symlink `lnk` to a database elsewhere was refused).
    """
    name = os.path.realpath(path)
    for suffix, kind in _JOURNAL_SUFFIXES:
        if name.endswith(suffix) and _is_database(name[: -len(suffix)]):
            return kind, name[: -len(suffix)]
    return None


def database_in_a_journals_place(path: str | Path) -> tuple[str, str, str] | None:
    """(which journal, its path, what stands there) if a SQLite database or a symlink
    stands where the database `path` keeps a journal (`path-wal`, `-journal`, `-shm`),
    else None: SQLite would take it for that journal and throw it away when it opens
    `path` (found by attack: a store named `foo-wal` was deleted, its sessions with it,
    when a store `foo` was opened; then, a symlink named so was deleted, or failed the
    open as "database unreachable")."""
    name = os.path.realpath(path)
    for suffix, kind in _JOURNAL_SUFFIXES:
        if os.path.islink(name + suffix):
            return kind, name + suffix, "a symbolic link"
        if _is_database(name + suffix):
            return kind, name + suffix, "a SQLite database"
    return None


def journal_not_a_file(path: str | Path) -> tuple[str, str, str] | None:
    """(which journal, its path, what stands there) if a directory, a FIFO, a socket or
    a device stands where the database `path` keeps a journal, else None. Found by
    attack: a FIFO named `store.db-journal` made every read wait for good (SQLite opens
    it to look for a hot journal), a directory gave "disk I/O error"."""
    name = os.path.realpath(path)
    for suffix, kind in _JOURNAL_SUFFIXES:
        try:
            mode = os.lstat(name + suffix).st_mode
        except OSError:
            continue
        if not S_ISREG(mode) and not S_ISLNK(mode):
            what = "a directory" if S_ISDIR(mode) else "a FIFO" if S_ISFIFO(mode) else "not a file"
            return kind, name + suffix, what
    return None


def journal_is_hot(path: str | Path) -> bool:
    """Whether the database `path` (a symlink's target: SQLite keeps the journals there)
    has a -journal, a regular file, that begins as a rollback journal (one that a writer
    left or is writing: a finished one is deleted, truncated or its header zeroed)."""
    return _head_at(f"{os.path.realpath(path)}-journal").startswith(_JOURNAL_HEAD)


def wal_mode_header(path: str | Path) -> bool:
    """Whether the database file's header says WAL mode (bytes 18 and 19 are 2)."""
    return _head_at(str(path), length=20)[18:20] == b"\x02\x02"


def _head_of(descriptor: int, opened: os.stat_result) -> bytes:
    """The first 16 bytes of the regular file open as `descriptor`; b"" if unreadable.

    A shell's `>>` opens it for writing only: then the file is opened again, for
    reading, through /proc, and kept only if it is the same file (a /proc of another
    PID namespace names another process's).
    """
    try:
        return os.pread(descriptor, 16, 0)
    except OSError:
        return _head_at(f"/proc/self/fd/{descriptor}", opened)


def _is_database(path: str) -> bool:
    """Whether `path` is a regular file (not a symlink) that begins as a SQLite database."""
    return _head_at(path, follow=False) == _DATABASE_HEAD


def _head_at(
    path: str, same_as: os.stat_result | None = None, *, follow: bool = True, length: int = 16
) -> bytes:
    """The first `length` bytes of the regular file at `path` (if `same_as`, only if it is
    that file; without `follow`, not through a symlink); b"" if there is none or it
    cannot be read. Opened without blocking: a FIFO of that name would wait for a writer
    for good."""
    flags = os.O_RDONLY | os.O_NONBLOCK | (0 if follow else os.O_NOFOLLOW)
    try:
        descriptor = os.open(path, flags)
    except OSError:
        return b""
    try:
        found = os.fstat(descriptor)
        if not S_ISREG(found.st_mode) or (
            same_as is not None and not os.path.samestat(found, same_as)
        ):
            return b""
        return os.pread(descriptor, length, 0)
    except OSError:
        return b""
    finally:
        os.close(descriptor)


def _path_of(descriptor: int, opened: os.stat_result) -> str | None:
    """The path of the file open as `descriptor`, if /proc names it and it is that file."""
    try:
        path = os.readlink(f"/proc/self/fd/{descriptor}")
        return path if os.path.samestat(os.stat(path), opened) else None
    except OSError:
        return None


def refuse_own_file(storage: SessionStorage, path: str | Path) -> None:
    """Refuses to write `path` if it is one of `storage`'s own files, or any other
    SQLite database or journal (refuse_database_file).

    Found by attack: export_to_json into the store's own file replaced the database
    with the export and reported success (the CLI refused it; the library did not).

    Raises:
        InvalidDataError: naming the file and what it is.
    """
    if (role := storage.own_file(path)) is not None:
        raise InvalidDataError(f"refusing to write {path}: it is {role} (give another file name)")
    refuse_database_file(path)


def refuse_database_file(path: str | Path) -> None:
    """Refuses to write an export or a rendering over `path` if it is a SQLite database
    or journal (sqlite_kind_of_path): text written there destroys a database.

    Raises:
        InvalidDataError: naming the file and what it is.
    """
    if (kind := sqlite_kind_of_path(path)) is not None:
        raise InvalidDataError(f"refusing to write {path}: it is {kind} (give another file name)")
