"""Which of a SQLite store's own files a path names: the database or a journal of it.

Writing there (an export, a rendering, a migration's copy) would replace the store, or
be wiped by it. The journals are beside the file a symlink stands for, so both places
count; a path is the file through any symlink or hard link.
"""

from __future__ import annotations

import os
from pathlib import Path
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


def refuse_own_file(storage: SessionStorage, path: str | Path) -> None:
    """Refuses to write `path` if it is one of `storage`'s own files.

    Found by attack: export_to_json into the store's own file replaced the database
    with the export and reported success (the CLI refused it; the library did not).

    Raises:
        InvalidDataError: naming the file and what it is.
    """
    if (role := storage.own_file(path)) is not None:
        raise InvalidDataError(f"refusing to write {path}: it is {role} (give another file name)")
