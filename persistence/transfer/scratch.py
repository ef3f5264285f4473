"""Scratch files and directories that a process killed mid-way does not leave for good.

A restore copies the whole backup into a private temporary directory (opening a
database may bring its schema to head, so it works on a copy); an export or a backup
writes a temp file beside its destination and renames it when done. Python removes
them when the work ends, even on an error or Ctrl-C, but a process killed with SIGKILL
(the OOM killer, a container's stop timeout) runs no clean-up: found by attack, each
such restore left a `persistence-restore-*` directory holding a full copy of its
backup, and each such export a hidden partial file beside its destination.

So each scratch file (a directory: its OWNER file) stays locked (`flock`) by its
process while it lives, and the kernel releases the lock when the process dies,
however it dies. Before making a new one, a process removes those of the same name
pattern whose lock is free: their process is gone. A file is locked before it takes
the name the pattern matches, so one still being set up is never taken for abandoned;
a live process's, another user's, a symlink, and anything not made this way (an older
version's temp files end in `.tmp`) are left alone. Without `fcntl` (Windows) nothing
is locked or removed ahead.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no flock
    fcntl = None  # type: ignore[assignment]

# The lock file of each scratch directory.
OWNER = ".owner"
# The suffix of a temp file until it is locked, then once locked: distinctive, so that
# a user's own file is not taken for one (found by attack: `.all.json.draft.partial`
# was removed).
UNLOCKED, LOCKED = ".persistence-new", ".persistence-partial"
# What a SQLite database written to a temp file puts beside it.
SIDECARS = ("-journal", "-wal", "-shm")


@contextlib.contextmanager
def scratch_directory(prefix: str) -> Iterator[Path]:
    """A new private temporary directory, removed when the block ends. Directories of
    `prefix` their processes abandoned (killed) are removed first."""
    for candidate in _matching(Path(tempfile.gettempdir()), prefix, "*"):
        if _ours(candidate, stat.S_ISDIR) and _abandoned(candidate / OWNER):
            shutil.rmtree(candidate, ignore_errors=True)
    with tempfile.TemporaryDirectory(prefix=prefix) as name:
        directory = Path(name)
        unlocked = directory / f"{OWNER}{UNLOCKED}"
        os.close(os.open(unlocked, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        with _locked(unlocked, directory / OWNER):
            yield directory


@contextlib.contextmanager
def partial_file(directory: Path, prefix: str, *, sweep: bool = True) -> Iterator[Path]:
    """A new empty 0600 file in `directory`, named `.{prefix}.XXXXXXXX` and LOCKED,
    locked while the block runs; removed at its end unless it was renamed. With `sweep`,
    the files of that pattern, whatever their prefix, that their processes abandoned
    (killed) are removed first, which lists the directory (found by attack: 25 ms a
    file in one of 50,000 entries, so a caller writing a file per session passes
    False). Found by attack: only those of the same prefix were, so a killed export's
    file stayed through exports and backups to other names in its directory.

    Raises:
        OSError: if the directory cannot hold a new file.
    """
    for candidate in _matching(directory, ".", f"*.{'[!.]' * 8}{LOCKED}") if sweep else ():
        if _ours(candidate, stat.S_ISREG) and _abandoned(candidate):
            _remove_with_sidecars(candidate)
    descriptor, name = tempfile.mkstemp(dir=directory, prefix=f".{prefix}.", suffix=UNLOCKED)
    os.close(descriptor)
    unlocked = Path(name)
    path = unlocked.with_name(unlocked.name.removesuffix(UNLOCKED) + LOCKED)
    try:
        with _locked(unlocked, path):
            yield path
    finally:
        _remove_with_sidecars(unlocked)
        _remove_with_sidecars(path)


@contextlib.contextmanager
def _locked(unlocked: Path, named: Path) -> Iterator[None]:
    """Holds a lock on `unlocked`, renamed `named` once locked, while the block runs.

    Where the file system has no `flock` for a descriptor open for reading (NFS emulates
    it with byte-range locks, which need one open for writing: EBADF; or ENOLCK), the
    file goes unlocked, as before locks were taken: found by attack, every export and
    backup there failed. It is then never taken for abandoned either, since looking
    needs the same lock. (Opened for writing, NFS's lock would be a POSIX one, which
    SQLite's closing of its own descriptor of the file releases.)
    """
    descriptor = None if fcntl is None else os.open(unlocked, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        if descriptor is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(descriptor, fcntl.LOCK_EX)
        os.rename(unlocked, named)
        yield
    finally:
        if descriptor is not None:
            os.close(descriptor)


def _matching(directory: Path, start: str, pattern: str) -> list[Path]:
    """The entries of `directory` whose names are `start` (taken as it is) then `pattern`."""
    names = glob.glob(glob.escape(start) + pattern, root_dir=directory, include_hidden=True)
    return [directory / name for name in names]


def _ours(path: Path, kind: Callable[[int], bool]) -> bool:
    """Whether `path` is this user's, of `kind` (stat.S_ISDIR or S_ISREG), not a symlink."""
    if fcntl is None:
        return False
    try:
        status = path.lstat()
    except OSError:
        return False
    return kind(status.st_mode) and status.st_uid == os.getuid()


def _abandoned(lock: Path) -> bool:
    """Whether nobody holds `lock`'s lock (False if it cannot be opened)."""
    try:
        descriptor = os.open(lock, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return False  # gone meanwhile, or not one of these (no lock file)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False  # its process holds the lock: alive
    finally:
        os.close(descriptor)
    return True


def _remove_with_sidecars(path: Path) -> None:
    for leftover in (path, *(path.with_name(path.name + suffix) for suffix in SIDECARS)):
        with contextlib.suppress(FileNotFoundError):
            leftover.unlink()
