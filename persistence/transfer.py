"""Moving data: migrate between stores, export and import files, back up and restore.

Every path sees the backends only as `SessionStorage`: sessions stream out through
`iter_sessions` in batches and go in through one unit of work per batch, so memory
is bounded by `batch_size`, never by the size of the store, and a failure leaves whole
batches behind. Writes are additive and idempotent: a session the destination already
holds gets only the messages it lacks, and keeps its own fields if it was updated
after the incoming copy.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sqlite3
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import IO, Any

from persistence.atomic_files import (
    file_error,
    link_new_name,
    private_directory,
    replace_with,
    temp_file,
)
from persistence.clock import utc_now
from persistence.errors import InvalidDataError, MigrationError, PersistenceError
from persistence.exchange_format import DocumentCounts, DocumentWriter, iter_records
from persistence.exchange_format import validate_document as _validate_document
from persistence.models import ChatSession, UploadedFileRecord
from persistence.storage import SessionStorage
from persistence.verification import counts_summary, same_value, verify_migration

__all__ = [
    "backup_storage",
    "export_to_json",
    "import_from_json",
    "migrate_storage",
    "restore_backup",
    "verify_migration",
]

ProgressCallback = Callable[[int, int], object]
DEFAULT_BATCH_SIZE = 500
_SQLITE_MAGIC = b"SQLite format 3\x00"
_RELOAD_ATTEMPTS = 3
_SESSION_FIELDS = ("model", "created_at", "updated_at", "metadata", "status")


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise InvalidDataError(f"batch_size: must be a positive integer, got {batch_size!r}")


def _elapsed(started: float) -> float:
    return round(time.perf_counter() - started, 3)


def _as_of_row(session: ChatSession) -> ChatSession | None:
    """The session as its row was read, or None if its messages were read too early.

    A backend may read a session's row and its messages in separate statements while
    writers append. Messages are append-only and ordered, so the first
    `message_count` of them are exactly what the row describes.
    """
    if len(session.messages) == session.message_count:
        return session
    if len(session.messages) < session.message_count:
        return None
    return ChatSession.model_construct(
        **{name: getattr(session, name) for name in (*_SESSION_FIELDS, "session_id")},
        message_count=session.message_count,
        messages=session.messages[: session.message_count],
    )


async def _consistent(storage: SessionStorage, batch: list[ChatSession]) -> list[ChatSession]:
    """Returns the batch with every session as one consistent state (never half of one).

    Raises:
        MigrationError: if a session keeps counting more messages than it holds.
    """
    result: list[ChatSession] = []
    pending: list[ChatSession] = batch
    for _ in range(_RELOAD_ATTEMPTS + 1):
        retry: list[str] = []
        for session in pending:
            settled = _as_of_row(session)
            if settled is None:
                retry.append(session.session_id)
            else:
                result.append(settled)
        if not retry:
            return result
        # Sessions deleted meanwhile simply do not come back.
        pending = await storage.load_sessions(retry)
    raise MigrationError(
        f"session {pending[0].session_id!r}: message_count says {pending[0].message_count}"
        f" but only {len(pending[0].messages)} messages are stored"
    )


async def _session_batches(
    storage: SessionStorage, batch_size: int
) -> AsyncIterator[list[ChatSession]]:
    async for batch in storage.iter_sessions(batch_size, with_messages=True):
        yield await _consistent(storage, batch)


def _merged(incoming: ChatSession, stored: ChatSession | None) -> ChatSession | None:
    """What to save for `incoming` given the destination's copy; None if nothing to do."""
    if stored is None:
        return incoming
    known = {message.message_id for message in stored.messages}
    missing = [message for message in incoming.messages if message.message_id not in known]
    if stored.updated_at > incoming.updated_at:
        if not missing:
            return None
        # `stored` was loaded from the destination, so its save sends only these.
        stored.messages.extend(missing)
        stored.message_count = len(stored.messages)
        return stored
    same_fields = all(same_value(getattr(incoming, n), getattr(stored, n)) for n in _SESSION_FIELDS)
    return None if same_fields and not missing else incoming


async def _write_sessions(destination: SessionStorage, sessions: Sequence[ChatSession]) -> None:
    """Adds one batch of sessions to the destination in one unit of work."""
    stored = {
        session.session_id: session
        for session in await destination.load_sessions([s.session_id for s in sessions])
    }
    changes = [_merged(session, stored.get(session.session_id)) for session in sessions]
    if not any(change is not None for change in changes):
        return
    async with destination.unit_of_work() as uow:
        for change in changes:
            if change is not None:
                await uow.sessions.add(change)
        await uow.commit()


async def _write_file_records(
    destination: SessionStorage, records: Sequence[UploadedFileRecord]
) -> None:
    async with destination.unit_of_work() as uow:
        for record in records:
            await uow.files.add(record)
        await uow.commit()


class _Progress:
    def __init__(self, callback: ProgressCallback | None, total: int) -> None:
        self._callback = callback
        self.total = total
        self.sessions = self.messages = self.files = 0
        self.report()

    def report(self) -> None:
        if self._callback is not None:
            self._callback(self.sessions, max(self.total, self.sessions))

    def add_sessions(self, batch: Sequence[ChatSession]) -> None:
        self.sessions += len(batch)
        self.messages += sum(len(session.messages) for session in batch)
        self.report()

    def stopped(self, exc: BaseException) -> None:
        exc.add_note(
            f"{self.sessions} of {self.total} sessions were written before the error;"
            " running the same transfer again resumes safely"
        )


async def migrate_storage(
    source: SessionStorage,
    destination: SessionStorage,
    verify: bool = True,
    progress_callback: ProgressCallback | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> dict[str, Any]:
    """Copies every session, message and file record of `source` into `destination`.

    Additive and idempotent: what the destination holds is kept, running it twice
    stores nothing twice, and a session on both sides gets the messages it lacks.
    Each batch of `batch_size` sessions is written in one unit of work.

    Returns:
        {"sessions_migrated", "messages_migrated", "files_migrated", "duration_seconds",
        "verified", "verification" (the additive verify_migration report, or None),
        "source_counts", "destination_counts_before", "destination_counts"}.

    Raises:
        InvalidDataError: for a bad batch_size, the same store on both sides, or a
            record the destination refuses (a message id it holds in another session).
        PersistenceError: if either store fails; batches already written stay.
    """
    _check_batch_size(batch_size)
    if source is destination:
        raise InvalidDataError("source and destination are the same storage")
    started = time.perf_counter()
    source_counts = await source.count()
    before = await destination.count()
    progress = _Progress(progress_callback, source_counts.total_sessions)
    try:
        async for batch in _session_batches(source, batch_size):
            await _write_sessions(destination, batch)
            progress.add_sessions(batch)
        async for records in source.iter_file_records(batch_size):
            await _write_file_records(destination, records)
            progress.files += len(records)
    except PersistenceError as exc:
        progress.stopped(exc)
        raise
    written = _elapsed(started)
    verification = None
    if verify:
        verification = await verify_migration(
            source, destination, additive=True, batch_size=batch_size
        )
    return {
        "sessions_migrated": progress.sessions,
        "messages_migrated": progress.messages,
        "files_migrated": progress.files,
        "duration_seconds": _elapsed(started),
        "write_seconds": written,
        "verified": bool(verification and verification["ok"]),
        "verification": verification,
        "source_counts": counts_summary(source_counts),
        "destination_counts_before": counts_summary(before),
        "destination_counts": counts_summary(await destination.count()),
    }


def _open_no_follow(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_NOFOLLOW, 0o600)


def _open_output(path: Path) -> IO[str]:
    # Opening a local file does not wait on anything worth a thread hop.
    try:
        return open(path, "w", encoding="utf-8", opener=_open_no_follow)
    except OSError as exc:
        raise file_error("cannot write", path, exc) from exc


def _open_input(path: Path) -> IO[bytes]:
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise InvalidDataError(f"{path}: no such file") from None
    except OSError as exc:
        raise file_error("cannot read", path, exc) from exc


async def _write_document(
    storage: SessionStorage,
    path: Path,
    batch_size: int,
    progress_callback: ProgressCallback | None,
) -> tuple[DocumentCounts, str]:
    """Streams the store into an export document at `path` (a fresh temp file)."""
    exported_at = utc_now()
    progress = _Progress(progress_callback, (await storage.count()).total_sessions)
    try:
        with _open_output(path) as stream:
            writer = DocumentWriter(stream, backend=storage.backend_name, exported_at=exported_at)
            async for batch in _session_batches(storage, batch_size):
                writer.write_sessions(batch)
                progress.add_sessions(batch)
            writer.start_file_records()
            async for records in storage.iter_file_records(batch_size):
                writer.write_file_records(records)
            writer.finish()
    except OSError as exc:
        raise file_error("cannot write", path, exc) from exc
    return writer.counts, exported_at.isoformat(timespec="milliseconds")


async def export_to_json(
    storage: SessionStorage,
    output_path: str | Path,
    *,
    progress_callback: ProgressCallback | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> dict[str, Any]:
    """Writes the whole store to one JSON export document, atomically, mode 0600.

    Returns:
        {"path", "sessions", "messages", "files", "bytes", "exported_at", "duration_seconds"}.

    Raises:
        MigrationError: if the file cannot be written (nothing is left behind).
        PersistenceError: if the store fails.
    """
    _check_batch_size(batch_size)
    started = time.perf_counter()
    target = Path(output_path)
    if not target.parent.is_dir():
        raise MigrationError(f"cannot write {target}: {target.parent} is not a directory")
    with temp_file(target.parent, target.name) as temp:
        counts, exported_at = await _write_document(storage, temp, batch_size, progress_callback)
        size = temp.stat().st_size
        replace_with(temp, target)
    return {
        "path": str(target),
        **counts.as_dict(),
        "bytes": size,
        "exported_at": exported_at,
        "duration_seconds": _elapsed(started),
    }


async def import_from_json(
    storage: SessionStorage,
    input_path: str | Path,
    *,
    progress_callback: ProgressCallback | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> dict[str, Any]:
    """Loads an export document into the store: validated whole first, then written.

    Additive and idempotent like `migrate_storage`.

    Returns:
        {"sessions_imported", "messages_imported", "files_imported", "format_version",
        "exported_at", "duration_seconds"}.

    Raises:
        InvalidDataError: for a missing, truncated or malformed file, a foreign or
            newer format, a record failing validation or a duplicate id; nothing
            is written then.
        PersistenceError: if the store fails; batches already written stay.
    """
    _check_batch_size(batch_size)
    started = time.perf_counter()
    path = Path(input_path)
    with _open_input(path) as stream:
        # One open file for both passes: the second reads what the first validated.
        summary = await asyncio.to_thread(_validate_document, stream)
        stream.seek(0)
        progress = _Progress(progress_callback, summary.counts.sessions)
        sessions: list[ChatSession] = []
        records: list[UploadedFileRecord] = []
        try:
            for record in iter_records(stream):
                if isinstance(record, ChatSession):
                    sessions.append(record)
                    if len(sessions) >= batch_size:
                        await _write_sessions(storage, sessions)
                        progress.add_sessions(sessions)
                        sessions = []
                else:
                    records.append(record)
                    if len(records) >= batch_size:
                        await _write_file_records(storage, records)
                        progress.files += len(records)
                        records = []
            if sessions:
                await _write_sessions(storage, sessions)
                progress.add_sessions(sessions)
            if records:
                await _write_file_records(storage, records)
                progress.files += len(records)
        except PersistenceError as exc:
            progress.stopped(exc)
            raise
    return {
        "sessions_imported": progress.sessions,
        "messages_imported": progress.messages,
        "files_imported": progress.files,
        "format_version": summary.version,
        "exported_at": summary.exported_at.isoformat(timespec="milliseconds"),
        "duration_seconds": _elapsed(started),
    }


def validate_export_file(input_path: str | Path) -> dict[str, Any]:
    """Checks an export document without writing anything; returns what it holds.

    Raises:
        InvalidDataError: as `import_from_json` would, before writing.
    """
    with _open_input(Path(input_path)) as stream:
        summary = _validate_document(stream)
    return {"format_version": summary.version, **summary.counts.as_dict()}


async def _sqlite_file_counts(path: Path) -> dict[str, Any]:
    from persistence.sql.backend import SQLiteSessionStorage

    async with SQLiteSessionStorage(path) as copy:
        return counts_summary(await copy.count())


async def backup_storage(
    storage: SessionStorage,
    backup_dir: str | Path,
    *,
    progress_callback: ProgressCallback | None = None,
) -> dict[str, Any]:
    """Writes a consistent, timestamped backup file of the whole store into `backup_dir`.

    SQLite copies itself with its online backup API (consistent while writers run);
    other backends write the export document. The directory is created 0700 if
    missing, the file is 0600, and an existing entry (a planted symlink included) is
    never overwritten or followed: the backup then takes the next free name.

    Returns:
        {"path", "kind" ("sqlite" or "json"), "sessions", "messages", "files",
        "bytes", "created_at", "duration_seconds"}.

    Raises:
        MigrationError: if the directory or file cannot be written.
        PersistenceError: if the store fails.
    """
    started = time.perf_counter()
    directory = private_directory(Path(backup_dir))
    now = utc_now()
    stem = f"persistence-{storage.backend_name}-{now:%Y%m%dT%H%M%S}{now.microsecond // 1000:03d}Z"
    with temp_file(directory, "backup") as temp:
        if await storage.copy_to_file(temp):
            kind, suffix = "sqlite", ".sqlite3"
            counts = await _sqlite_file_counts(temp)
        else:
            kind, suffix = "json", ".json"
            written, _ = await _write_document(storage, temp, DEFAULT_BATCH_SIZE, progress_callback)
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
        "duration_seconds": _elapsed(started),
    }


def _backup_kind(path: Path) -> str:
    with _open_input(path) as stream:
        head = stream.read(len(_SQLITE_MAGIC))
    if head == _SQLITE_MAGIC:
        return "sqlite"
    if head.lstrip()[:1] == b"{":
        return "json"
    raise InvalidDataError(f"{path}: not a backup (neither a SQLite database nor an export file)")


def _check_sqlite_backup(path: Path) -> None:
    """Refuses a corrupt SQLite file, or one that is not a persistence store."""
    try:
        with sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True) as db:
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
            check = db.execute("PRAGMA quick_check").fetchone()
        db.close()
    except sqlite3.DatabaseError as exc:
        raise InvalidDataError(f"not a readable SQLite backup: {exc}") from exc
    if not {"alembic_version", "chat_sessions", "chat_messages"} <= tables:
        raise InvalidDataError("a SQLite database, but not a persistence backup")
    if check is None or check[0] != "ok":
        raise InvalidDataError(f"the SQLite backup is corrupt: {check[0] if check else '?'}")


async def _restore_sqlite(
    storage: SessionStorage, path: Path, progress_callback: ProgressCallback | None
) -> dict[str, Any]:
    from persistence.sql.backend import SQLiteSessionStorage

    # Opening a database may bring its schema to head: work on a copy, never the backup.
    with tempfile.TemporaryDirectory(prefix="persistence-restore-") as scratch:
        copy = Path(scratch) / "backup.sqlite3"
        try:
            await asyncio.to_thread(shutil.copyfile, path, copy)
        except OSError as exc:
            raise file_error("cannot read", path, exc) from exc
        _check_sqlite_backup(copy)
        async with SQLiteSessionStorage(copy) as source:
            return await migrate_storage(source, storage, True, progress_callback)


async def restore_backup(
    storage: SessionStorage,
    backup_path: str | Path,
    *,
    progress_callback: ProgressCallback | None = None,
) -> dict[str, Any]:
    """Loads a `backup_storage` file (either kind) into `storage`, additively.

    The backup file itself is never modified.

    Returns:
        {"path", "kind", "sessions_restored", "messages_restored", "files_restored",
        "verified" (SQLite backups are verified against the restored store),
        "duration_seconds"}.

    Raises:
        InvalidDataError: for a missing, corrupt or foreign file; nothing is written.
        SchemaVersionError: for a SQLite backup written by a newer version.
        PersistenceError: if the store fails.
    """
    started = time.perf_counter()
    path = Path(backup_path)
    kind = _backup_kind(path)
    if kind == "json":
        imported = await import_from_json(storage, path, progress_callback=progress_callback)
        counts = [imported[f"{name}_imported"] for name in ("sessions", "messages", "files")]
        verified = None
    else:
        migrated = await _restore_sqlite(storage, path, progress_callback)
        counts = [migrated[f"{name}_migrated"] for name in ("sessions", "messages", "files")]
        verified = migrated["verified"]
    return {
        "path": str(path),
        "kind": kind,
        "sessions_restored": counts[0],
        "messages_restored": counts[1],
        "files_restored": counts[2],
        "verified": verified,
        "duration_seconds": _elapsed(started),
    }
