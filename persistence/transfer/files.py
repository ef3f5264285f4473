"""Private output files written atomically, never through a symlink.

Every file starts as a fresh temp file (O_CREAT | O_EXCL, mode 0600) in the target's
own directory and only then takes its final name, so a reader never sees half a file.
A symlink at the target is refused, never followed or replaced; a FIFO or a character
device (`/dev/stdout`, `/dev/full`, a named pipe) is written through, as a shell's `>`
would, and a failed write there is an error like any other. Errors name the user's
path, never the temp file.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Literal

from persistence.errors import MigrationError
from persistence.store_files import refuse_database_file
from persistence.transfer.scratch import partial_file

FILE_MODE = 0o600
DIRECTORY_MODE = 0o700
_MAX_NAME_ATTEMPTS = 100


# What writing a file meets when its filesystem, the user's quota or the process's file
# size limit (EFBIG) leaves no room.
NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def file_error(action: str, path: Path, exc: OSError) -> MigrationError:
    """Names the file and the system's reason, for an OSError met on `path`."""
    reason = exc.strerror or type(exc).__name__
    return MigrationError(f"{action} {path}: {reason}")


def _symlink_refused(path: Path, what: str) -> MigrationError:
    try:
        points_to = f" (to {os.readlink(path)})"
    except OSError:
        points_to = ""
    return MigrationError(
        f"refusing to write {what} {path}: it is a symbolic link{points_to};"
        " give the path it stands for"
    )


def output_kind(target: Path) -> Literal["new", "file", "stream"]:
    """What writing to `target` means: a new file, replacing a regular file, or a stream.

    Raises:
        MigrationError: for a symlink (refused, never followed or replaced, unless it
            leads to a FIFO or character device), a directory, a socket or block
            device, or a missing parent directory.
    """
    try:
        mode = os.lstat(target).st_mode
    except FileNotFoundError:
        if not target.parent.is_dir():
            # Found by attack: a missing directory was called "not a directory".
            missing = not target.parent.exists()
            what = "no such directory" if missing else "not a directory"
            raise MigrationError(f"cannot write {target}: {target.parent}: {what}") from None
        return "new"
    except OSError as exc:
        raise file_error("cannot write", target, exc) from exc
    if stat.S_ISLNK(mode):
        try:
            mode = os.stat(target).st_mode
        except OSError:
            mode = 0
        if not (stat.S_ISFIFO(mode) or stat.S_ISCHR(mode)):
            raise _symlink_refused(target, "to")
        # A link to a FIFO or device (/dev/stderr, a tty's alias) holds no file to
        # replace: written through, as a shell's `>` would.
        return "stream"
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISFIFO(mode) or stat.S_ISCHR(mode):
        return "stream"
    if stat.S_ISDIR(mode):
        raise MigrationError(f"cannot write {target}: it is a directory")
    raise MigrationError(f"refusing to write {target}: not a file, FIFO or character device")


def _open_through(target: Path) -> IO[str]:
    """Opens an existing FIFO or character device for writing, never creating a file
    (a link to one is followed: what it opens is checked before a byte is written)."""
    fd = os.open(target, os.O_WRONLY | os.O_NOCTTY)
    try:
        mode = os.fstat(fd).st_mode
        if not (stat.S_ISFIFO(mode) or stat.S_ISCHR(mode)):
            raise OSError(errno.EEXIST, "replaced while being opened", str(target))
        return open(fd, "w", encoding="utf-8", newline="")
    except BaseException:
        os.close(fd)
        raise


def _open_new(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_NOFOLLOW, FILE_MODE)


@contextmanager
def output_file(target: Path, *, sweep: bool = True) -> Iterator[IO[str]]:
    """Yields a text stream for `target`: atomically replaced, or written through.

    A regular or new file is written to a 0600 temp file beside it, which takes the
    name only once complete (nothing is left behind on failure); a FIFO or character
    device (or a link to one) is written directly; any other symlink is refused.

    Raises:
        MigrationError: naming `target` and the reason, if it cannot be written.
    """
    if output_kind(target) == "stream":
        try:
            with _open_through(target) as stream:
                yield stream
        except OSError as exc:
            raise file_error("cannot write", target, exc) from exc
        return
    with temp_file(target.parent, target.name, sweep=sweep) as temp:
        try:
            with open(temp, "w", encoding="utf-8", newline="", opener=_open_new) as stream:
                yield stream
        except OSError as exc:
            raise file_error("cannot write", target, exc) from exc
        # Again: a database made there while the export ran would be replaced by it.
        refuse_database_file(target)
        replace_with(temp, target)


def write_text(target: Path, text: str) -> None:
    """Writes `text` to `target` as `output_file` does, without looking for abandoned
    temp files (a file per session may go into one directory).

    Raises:
        MigrationError: naming `target`, if it cannot be written.
    """
    with output_file(target, sweep=False) as stream:
        stream.write(text)


def private_directory(directory: Path) -> Path:
    """Returns `directory`, creating it (and its parents) with mode 0700 if missing.

    Raises:
        MigrationError: if it cannot be created, is not a directory, or is a symlink
            (refused, as for files: give the directory it stands for).
    """
    if directory.is_symlink():
        raise _symlink_refused(directory, "into")
    # Each missing level made here, outermost first: mkdir(parents=True) would give the
    # parents the default mode (0777 & ~umask), not 0700. mkdir's mode is still masked
    # by the umask, which never adds permissions.
    missing = [level for level in (directory, *directory.parents) if not level.exists()]
    try:
        for level in reversed(missing):
            level.mkdir(mode=DIRECTORY_MODE, exist_ok=True)
        if not directory.is_dir():
            raise FileExistsError(directory)
    except FileExistsError as exc:
        raise MigrationError(f"{directory} exists and is not a directory") from exc
    except OSError as exc:
        raise file_error("cannot create directory", directory, exc) from exc
    return directory


@contextmanager
def temp_file(directory: Path, prefix: str, *, sweep: bool = True) -> Iterator[Path]:
    """Creates an empty 0600 temp file in `directory` (scratch.partial_file, which with
    `sweep` removes the abandoned ones first); removes it unless it was renamed.

    Raises:
        MigrationError: if the directory cannot hold a new file.
    """
    with contextlib.ExitStack() as stack:
        try:
            path = stack.enter_context(partial_file(directory, prefix, sweep=sweep))
        except OSError as exc:
            raise file_error("cannot create a file in", directory, exc) from exc
        yield path


def sync_file(path: Path) -> None:
    """Forces the file's content to disk before it takes its final name."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_directory(directory: Path) -> None:
    """Forces the directory's entries to disk: the rename itself is durable only then.

    A directory this process may write but not read (mode 0300) cannot be opened to
    sync: the rename is done, and left to the file system's own flush. Found by attack:
    `export-all out/all.json` there said "cannot write ...: Permission denied" and
    exited 1, with the whole export in place.
    """
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except PermissionError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_with(temp: Path, target: Path) -> None:
    """Gives `temp` the name `target`, replacing what is there (a symlink itself, not its target).

    Raises:
        MigrationError: naming `target`, if the rename fails.
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
        raise file_error("cannot write in", directory, exc) from exc
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
