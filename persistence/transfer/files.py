"""Private output files written atomically, never through a planted symlink.

Every file starts as a fresh temp file (O_CREAT | O_EXCL, mode 0600) in the target's
own directory and only then takes its final name, so a reader never sees half a file
and a symlink waiting at the final name is replaced or refused, never followed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from persistence.errors import MigrationError

FILE_MODE = 0o600
DIRECTORY_MODE = 0o700
_MAX_NAME_ATTEMPTS = 100


def file_error(action: str, path: Path, exc: OSError) -> MigrationError:
    """Names the file and the system's reason, for an OSError met on `path`."""
    reason = exc.strerror or type(exc).__name__
    return MigrationError(f"{action} {path}: {reason}")


def private_directory(directory: Path) -> Path:
    """Returns `directory`, creating it (and its parents) with mode 0700 if missing.

    Raises:
        MigrationError: if it cannot be created or is not a directory.
    """
    try:
        directory.mkdir(mode=DIRECTORY_MODE, parents=True, exist_ok=True)
    except FileExistsError as exc:
        raise MigrationError(f"{directory} exists and is not a directory") from exc
    except OSError as exc:
        raise file_error("cannot create directory", directory, exc) from exc
    return directory


@contextmanager
def temp_file(directory: Path, prefix: str) -> Iterator[Path]:
    """Creates an empty 0600 temp file in `directory`; removes it unless it was renamed.

    Raises:
        MigrationError: if the directory cannot hold a new file.
    """
    try:
        fd, name = tempfile.mkstemp(dir=directory, prefix=f".{prefix}.", suffix=".tmp")
    except OSError as exc:
        raise file_error("cannot create a file in", directory, exc) from exc
    os.close(fd)
    path = Path(name)
    try:
        yield path
    finally:
        for leftover in (
            path,
            *(path.with_name(path.name + s) for s in ("-journal", "-wal", "-shm")),
        ):
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()


def sync_file(path: Path) -> None:
    """Forces the file's content to disk before it takes its final name."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_directory(directory: Path) -> None:
    # The rename itself is durable only once the directory entry is on disk.
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_with(temp: Path, target: Path) -> None:
    """Gives `temp` the name `target`, replacing what is there (a symlink itself, not its target).

    Raises:
        MigrationError: if the rename fails.
    """
    try:
        sync_file(temp)
        os.replace(temp, target)
        _sync_directory(target.parent)
    except OSError as exc:
        raise file_error("cannot write", target, exc) from exc


def _take_name(temp: Path, target: Path) -> None:
    """Moves `temp` to `target`; FileExistsError if anything is at `target`."""
    try:
        os.link(temp, target, follow_symlinks=False)
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
            raise
        # No hard links here: reserve the name (O_EXCL never follows a link), then rename.
        os.close(os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, FILE_MODE))
        os.replace(temp, target)
    else:
        temp.unlink()


def link_new_name(temp: Path, directory: Path, stem: str, suffix: str) -> Path:
    """Gives `temp` the first free name `stem[-n]suffix` in `directory`; returns it.

    A hard link fails on any existing entry, symlinks included, so nothing already
    in the directory is ever overwritten or followed.

    Raises:
        MigrationError: if no free name is found or the link fails.
    """
    try:
        sync_file(temp)
    except OSError as exc:
        raise file_error("cannot write", temp, exc) from exc
    for attempt in range(_MAX_NAME_ATTEMPTS):
        target = directory / (f"{stem}{suffix}" if attempt == 0 else f"{stem}-{attempt}{suffix}")
        try:
            _take_name(temp, target)
        except FileExistsError:
            continue
        except OSError as exc:
            raise file_error("cannot write", target, exc) from exc
        _sync_directory(directory)
        return target
    raise MigrationError(f"no free file name for {stem}{suffix} in {directory}")
