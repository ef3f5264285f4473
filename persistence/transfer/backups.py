"""backup_storage and restore_backup: a timestamped file of the whole store."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import sqlite3
import time
from pathlib import Path
from typing import Any

from persistence.arguments import callback_argument, path_argument, storage_argument
from persistence.clock import utc_now
from persistence.errors import InvalidDataError, MigrationError, PersistenceError
from persistence.event_loops import in_thread_to_the_end, to_the_end
from persistence.storage import SessionStorage
from persistence.store_files import journal_is_hot
from persistence.transfer.backup_rows import check_backup_rows
from persistence.transfer.exchange import (
    import_from_json,
    open_input,
    validate_export_file,
    write_document,
)
from persistence.transfer.files import (
    NO_ROOM,
    file_error,
    link_new_name,
    private_directory,
    temp_file,
)
from persistence.transfer.json_stream import SCAN_CHUNK, UTF8_BOM
from persistence.transfer.migration import (
    DEFAULT_BATCH_SIZE,
    ProgressCallback,
    copy_and_verify,
    elapsed,
)
from persistence.transfer.scratch import scratch_directory
from persistence.transfer.unfinished import CopySource

_SQLITE_MAGIC = b"SQLite format 3\x00"


# What the copy holds, counted row by row: the stored message_count is what a session
# says it has, which a hand edit can make wrong (found by attack: a backup reported the
# sum of message_count instead of the rows it copied). A message of no session (left by
# a delete in the sqlite3 shell) is no message of the store: restore skips it too.
_COPIED = (
    "SELECT (SELECT count(*) FROM chat_sessions),"
    " (SELECT count(*) FROM chat_messages"
    "  WHERE session_id IN (SELECT session_id FROM chat_sessions)),"
    " (SELECT count(*) FROM uploaded_files)"
)


def _sqlite_copy_counts(copy: Path, directory: Path) -> dict[str, Any]:
    """Counts what a SQLite backup copy holds, reading it with sqlite3 (blocking); errors
    name the backup directory, never the temp file.

    Found by attack: the copy was counted by opening it as a storage, so an error there
    (the store's own check refusing it) named `.backup.xxxx.tmp`.

    Raises:
        MigrationError: the copy cannot be read.
    """
    try:
        with contextlib.closing(sqlite3.connect(copy)) as db:
            sessions, messages, files = db.execute(_COPIED).fetchone()
    except sqlite3.Error as exc:
        raise MigrationError(f"cannot read back the backup written in {directory}: {exc}") from exc
    return {"sessions": sessions, "messages": messages, "files": files}


def backup_directory(backup_dir: str | Path) -> Path:
    """`backup_dir` as a path; refuses an empty one, which Path reads as the current
    directory (give "." for that).

    Raises:
        MigrationError: if `backup_dir` is empty.
    """
    if isinstance(backup_dir, str) and not backup_dir:
        raise MigrationError(
            "the backup directory is an empty path: name a directory (. for the current one)"
        )
    return path_argument(backup_dir, "backup_dir")


async def backup_storage(
    storage: SessionStorage,
    backup_dir: str | Path,
    *,
    progress_callback: ProgressCallback | None = None,
) -> dict[str, Any]:
    """Writes a timestamped backup file of the whole store into `backup_dir`.

    SQLite copies itself with its online backup API: one consistent state while writers
    run. Other backends write the export document, read in batches of sessions, each
    batch one consistent state: a unit of work that commits between two batches may
    show in one and not the other (found by attack; for one consistent PostgreSQL
    state, use pg_dump). The directory is created 0700 if
    missing, the file is 0600, and an existing entry (a planted symlink included) is
    never overwritten or followed: the backup then takes the next free name.

    Returns:
        {"path", "kind" ("sqlite" or "json"), "sessions", "messages", "files",
        "bytes", "created_at", "duration_seconds"}.

    Raises:
        MigrationError: if the directory is an empty path, or the directory or file
            cannot be written.
        PersistenceError: if the store fails.
    """
    storage_argument(storage, "storage")
    callback_argument(progress_callback)
    started = time.perf_counter()
    directory = private_directory(backup_directory(backup_dir))
    now = utc_now()
    stem = f"persistence-{storage.backend_name}-{now:%Y%m%dT%H%M%S}{now.microsecond // 1000:03d}Z"
    with temp_file(directory, "backup") as temp:
        try:
            native = await storage.copy_to_file(temp)
        except PersistenceError as exc:
            # Found by attack: "back up database failed: the disk is full" named no file.
            exc.add_note(f"no backup was written into {directory}")
            raise
        if native:
            kind, suffix = "sqlite", ".sqlite3"
            counts = await in_thread_to_the_end(_sqlite_copy_counts, temp, directory)
        else:
            kind, suffix = "json", ".json"
            try:
                # Opening a local file does not wait on anything worth a thread hop.
                with open(temp, "w", encoding="utf-8", newline="") as stream:  # noqa: ASYNC230
                    written, _, _ = await write_document(
                        storage, stream, DEFAULT_BATCH_SIZE, progress_callback
                    )
            except OSError as exc:
                raise file_error("cannot write a backup in", directory, exc) from exc
            counts = written.as_dict()
        size = temp.stat().st_size
        path = link_new_name(temp, directory, stem, suffix)
    return {
        "path": str(path),
        "kind": kind,
        "sessions": counts["sessions"],
        "messages": counts["messages"],
        "files": counts["files"],
        "bytes": size,
        "created_at": now.isoformat(timespec="milliseconds"),
        "duration_seconds": elapsed(started),
    }


# How far into a file its kind is looked for: an export may begin with a byte order mark
# and whitespace, which `import` skips too, as far (found by attack: restore refused
# such a file as "not a backup" from 16 bytes of whitespace on, then from 64 KiB on,
# then with a byte order mark from 1 MiB less 3 bytes on).
_KIND_HEAD = len(UTF8_BOM) + SCAN_CHUNK


def _backup_kind(path: Path) -> str:
    with open_input(path) as stream:
        head = stream.read(_KIND_HEAD)
    if head.startswith(_SQLITE_MAGIC):
        _refuse_pending_journals(path)
        return "sqlite"
    if head.removeprefix(UTF8_BOM).lstrip(b" \t\r\n")[:1] == b"{":
        return "json"
    raise InvalidDataError(f"{path}: not a backup (neither a SQLite database nor an export file)")


def _refuse_pending_journals(path: Path) -> None:
    """Refuses a SQLite file whose -wal beside it holds writes, or whose -journal holds
    a transaction that was never committed.

    Found by attack: the restore copied the main file alone, so what a program with the
    file open (or one that crashed) had in the -wal was lost, and the verification,
    made against that copy, passed. The journals are looked for beside the file a
    symlink names, where SQLite keeps them (found by attack: through a symlink, the
    check looked beside the link, and the restore dropped the -wal's sessions). A hard
    link cannot be followed so: SQLite's own documentation warns against hard-linked
    databases.

    Found by attack: a store in rollback-journal mode whose writer was killed before
    its COMMIT holds pages of that transaction in the main file, which SQLite rolls
    back from the -journal when it next opens it; the restore copied the main file
    alone and restored the uncommitted changes, and reported them verified.
    """
    real = Path(os.path.realpath(path))
    try:
        pending_wal = real.with_name(real.name + "-wal").stat().st_size > 0
    except OSError:
        pending_wal = False
    if pending_wal:
        raise InvalidDataError(
            f"{path}: its -wal file holds writes the file does not (a program has it open,"
            " or one that had it open stopped): back it up with `persistence backup"
            " DIRECTORY --url sqlite:///PATH`, which reads both, and restore that copy"
        )
    # A regular file only, opened without blocking: opening a FIFO would wait for a
    # writer for good (found by attack: the event loop froze).
    if journal_is_hot(real):
        raise InvalidDataError(
            f"{path}: its -journal file holds a transaction that was not committed (a"
            " program is writing the file, or one that was stopped mid-write), and the"
            " file holds part of it: open it once with a program that writes SQLite files"
            " (`sqlite3 PATH 'PRAGMA quick_check'`), which rolls that transaction back,"
            " then restore it"
        )


def validate_backup_file(backup_path: str | Path) -> str:
    """Checks a backup file without writing anything (not even beside it); returns its kind.

    Raises:
        InvalidDataError: for a missing, corrupt, truncated or foreign file, as
            `restore_backup` would before writing.
        SchemaVersionError: for a SQLite backup written by a newer version.
    """
    path = path_argument(backup_path, "backup_path")
    kind = _backup_kind(path)
    if kind == "json":
        try:
            validate_export_file(path)
        except InvalidDataError as exc:
            # As `import` names its file; found by attack: restore's errors named none.
            raise InvalidDataError(f"{path}: {exc}") from exc
    else:
        _check_sqlite_backup(path, path, immutable=True)
    return kind


def _check_sqlite_backup(path: Path, named: Path, *, immutable: bool = False) -> None:
    """Refuses a corrupt SQLite file, one that is not a persistence store, or one at a
    schema revision this version does not know; errors name `named` (the user's file,
    where `path` is a copy of it).

    `immutable`: read the file as it is, creating no -wal or -shm beside it.
    """
    # Imported here: the CLI imports this module, and --help loads no database library.
    from sqlalchemy.exc import SQLAlchemyError

    from persistence.sql.schema import examine_sqlite_file

    uri = f"{path.absolute().as_uri()}?mode=ro" + ("&immutable=1" if immutable else "")
    try:
        with sqlite3.connect(uri, uri=True) as db:
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
            check = db.execute("PRAGMA quick_check").fetchone()
        db.close()
    except sqlite3.DatabaseError as exc:
        raise InvalidDataError(f"{named}: not a readable SQLite backup: {exc}") from exc
    # Version table: our own, or alembic's default in stores made before it had one.
    versioned = bool(tables & {"persistence_alembic_version", "alembic_version"})
    if not versioned or not {"chat_sessions", "chat_messages"} <= tables:
        raise InvalidDataError(f"{named}: a SQLite database, but not a persistence backup")
    if check is None or check[0] != "ok":
        raise InvalidDataError(
            f"{named}: the SQLite backup is corrupt: {check[0] if check else '?'}"
        )
    # A backup of a newer version: refused here, before the destination is opened.
    try:
        examine_sqlite_file(uri, where=str(named))
    except (SQLAlchemyError, sqlite3.Error) as exc:
        raise InvalidDataError(f"{named}: not a readable SQLite backup: {exc}") from exc


async def _restore_sqlite(
    storage: SessionStorage, path: Path, progress_callback: ProgressCallback | None
) -> dict[str, Any]:
    from persistence.sql.backend import SQLiteSessionStorage

    # Opening a database may bring its schema to head: work on a copy, never the backup.
    # Nothing may write into the scratch directory once its block ends: a cancel waits
    # for the copy's thread and the copy's storage to close (found by attack: the
    # directory's removal met their files, and its OSError replaced the CancelledError,
    # the directory left for good).
    with scratch_directory("persistence-restore-") as scratch:
        copy = scratch / "backup.sqlite3"
        try:
            await in_thread_to_the_end(shutil.copyfile, path, copy)
        except OSError as exc:
            raise _copy_error(path, scratch, exc) from exc
        _check_sqlite_backup(copy, path)
        # Named by the backup, keyed by its content: a restore run again from that file,
        # by any path, link or copy, takes the note over; another backup of the store
        # (older, newer) does not (found by attack: keyed by the store, a finished
        # restore of Monday's backup cleared the note of a stopped one of Tuesday's).
        # Read before initialize(), which may bring the copy to head (an attack saw the
        # digest survive that only because the upgrade stayed in the -wal).
        digest = await in_thread_to_the_end(_digest, copy)
        noted = CopySource(f"the backup {path}", f"backup {digest}")
        source = SQLiteSessionStorage(copy)
        try:
            await source.initialize()
            await check_backup_rows(source, path)
            return await copy_and_verify(source, storage, True, progress_callback, noted_as=noted)
        finally:
            await to_the_end(source.close())


def _copy_error(path: Path, scratch: Path, exc: OSError) -> MigrationError:
    """The error of copying the backup `path` into the directory `scratch`: reading it,
    or (found by attack: a full temporary directory was "cannot read BACKUP") writing."""
    if exc.errno not in NO_ROOM:
        return file_error("cannot read", path, exc)
    try:
        size = f"about {path.stat().st_size:,} bytes"
    except OSError:
        size = "the backup's size"
    said = f"cannot copy the backup {path} into the temporary directory {scratch.parent}"
    if exc.errno == errno.EFBIG:
        # Found by attack: a file size limit was said to be a lack of room, and TMPDIR,
        # which cannot help, was suggested.
        return MigrationError(
            f"{said}: {exc.strerror}: this process may not write a file of {size}"
            " (its file size limit, `ulimit -f`)"
        )
    return MigrationError(
        f"{said}: {exc.strerror}; a restore works on a copy of the backup and needs {size}"
        " free there (TMPDIR names another directory)"
    )


def _digest(path: Path) -> str:
    """A digest of a file's content (BLAKE2b: 200 MB in 0.26 s here)."""
    with open(path, "rb") as stream:
        return hashlib.file_digest(stream, "blake2b").hexdigest()


def _refuse_own_file(storage: SessionStorage, path: Path) -> None:
    """Refuses to restore a SQLite store's own database file into it.

    Found by attack: it was refused as "a program has it open" (the program being the
    caller, through `storage`), which sent the user to back the store up and restore
    that copy: into itself, where it could only add nothing.
    """
    from persistence.sql.backend import SQLiteSessionStorage

    if isinstance(storage, SQLiteSessionStorage) and storage.is_database_file(path):
        raise InvalidDataError(
            f"{path}: this is the database file of the store being restored into; a store"
            " holds everything its own file does, so there is nothing to restore"
        )


async def restore_backup(
    storage: SessionStorage,
    backup_path: str | Path,
    *,
    progress_callback: ProgressCallback | None = None,
) -> dict[str, Any]:
    """Loads a `backup_storage` file (either kind) into `storage`, additively.

    The backup file itself is never modified.

    Returns:
        {"path", "kind", "sessions_restored", "messages_restored", "files_restored"
        (what was written), "sessions_already_present", "messages_already_present",
        "files_already_present", "verified" (SQLite backups are verified against the
        restored store: True, or False with the mismatches in "verification"; None
        for JSON backups, validated whole before anything is written),
        "duration_seconds"}.

    Raises:
        InvalidDataError: for a missing, corrupt or foreign file, the SQLite store's
            own file, or a SQLite file whose -wal or -journal holds writes the file
            does not; nothing is written.
        SchemaVersionError: for a SQLite backup written by a newer version.
        PersistenceError: if the store fails.
    """
    storage_argument(storage, "storage")
    callback_argument(progress_callback)
    started = time.perf_counter()
    path = path_argument(backup_path, "backup_path")
    _refuse_own_file(storage, path)
    kind = _backup_kind(path)
    if kind == "json":
        result = await import_from_json(storage, path, progress_callback=progress_callback)
        verb, verified = "imported", None
    else:
        result = await _restore_sqlite(storage, path, progress_callback)
        verb, verified = "migrated", result["verified"]
    return {
        "path": str(path),
        "kind": kind,
        **{
            f"{name}_restored": result[f"{name}_{verb}"]
            for name in ("sessions", "messages", "files")
        },
        **{
            f"{name}_already_present": result[f"{name}_already_present"]
            for name in ("sessions", "messages", "files")
        },
        "verified": verified,
        # Found by attack: a failed verification was dropped here, so the CLI said
        # "Restored" and exited 0.
        **({"verification": result["verification"]} if result.get("verification") else {}),
        "duration_seconds": elapsed(started),
    }
