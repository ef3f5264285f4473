"""export_to_json and import_from_json: the whole store to and from one JSON file."""

from __future__ import annotations

import asyncio
import os
import stat
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import IO, Any

from persistence.arguments import callback_argument, path_argument, storage_argument
from persistence.clock import utc_now
from persistence.errors import InvalidDataError
from persistence.models import ChatSession, UploadedFileRecord
from persistence.storage import SessionStorage, check_batch_size
from persistence.store_files import refuse_own_file
from persistence.transfer.batches import Tally, write_file_records, write_sessions
from persistence.transfer.exchange_format import (
    DocumentCounts,
    DocumentSummary,
    DocumentWriter,
    iter_records,
)
from persistence.transfer.exchange_format import validate_document as _validate_document
from persistence.transfer.files import file_error, output_file, output_kind
from persistence.transfer.migration import (
    DEFAULT_BATCH_SIZE,
    Progress,
    ProgressCallback,
    elapsed,
    file_record_batches,
    session_batches,
)
from persistence.transfer.streams import read_ahead

_NOT_REGULAR = (
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def open_input(path: Path) -> IO[bytes]:
    """Opens an input file, which must be a regular file (followed through symlinks).

    Found by attack: a symlink to /dev/zero was scanned forever, and a FIFO waited for
    a writer, then failed with a bare "Illegal seek": an import reads its input twice.

    Raises:
        InvalidDataError: no such file, or not a regular file.
        MigrationError: naming `path`, if it cannot be read.
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise InvalidDataError(f"{path}: no such file") from None
    except OSError as exc:
        raise file_error("cannot read", path, exc) from exc
    for is_kind, kind in _NOT_REGULAR:
        if is_kind(mode):
            raise InvalidDataError(
                f"{path}: not a regular file ({kind}); an import reads its input twice:"
                " give a file, or pipe it to standard input (-)"
            )
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise InvalidDataError(f"{path}: no such file") from None
    except OSError as exc:
        raise file_error("cannot read", path, exc) from exc


class _CountingStream:
    """A text stream's `write`, counting the UTF-8 bytes that went through."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream
        self.bytes = 0

    def write(self, text: str) -> int:
        self.bytes += len(text.encode("utf-8", "surrogatepass"))
        return self._stream.write(text)


async def write_document(
    storage: SessionStorage,
    stream: IO[str],
    batch_size: int,
    progress_callback: ProgressCallback | None,
    *,
    escape_controls: bool = False,
) -> tuple[DocumentCounts, str, int]:
    """Streams the store into an export document on `stream`.

    Returns:
        What was written, when the export started (ISO 8601), and how many bytes.
    """
    exported_at = utc_now()
    progress = Progress(progress_callback, (await storage.count()).total_sessions)
    counting = _CountingStream(stream)
    writer = DocumentWriter(
        counting,  # type: ignore[arg-type]
        backend=storage.backend_name,
        exported_at=exported_at,
        escape_controls=escape_controls,
    )
    async for batch in session_batches(storage, batch_size):
        writer.write_sessions(batch)
        progress.add(Tally(sessions=len(batch), messages=sum(len(s.messages) for s in batch)))
    writer.start_file_records()
    async for records in file_record_batches(storage, batch_size):
        writer.write_file_records(records)
    writer.finish()
    stream.flush()
    return writer.counts, exported_at.isoformat(timespec="milliseconds"), counting.bytes


async def export_to_json(
    storage: SessionStorage,
    output_path: str | Path,
    *,
    progress_callback: ProgressCallback | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> dict[str, Any]:
    """Writes the whole store to one JSON export document, atomically, mode 0600.

    A symlink at `output_path` is refused; a FIFO or character device is written
    through (not atomically: what it received stays if the export fails).

    Returns:
        {"path", "sessions", "messages", "files", "bytes", "exported_at", "duration_seconds"}.

    Raises:
        MigrationError: naming `output_path`, if it cannot be written (a file is
            then left as it was).
        InvalidDataError: if `output_path` is one of the store's own files (a SQLite
            store's database or journals).
        PersistenceError: if the store fails.
    """
    storage_argument(storage, "storage")
    callback_argument(progress_callback)
    check_batch_size(batch_size)
    target = path_argument(output_path, "output_path")
    output_kind(target)  # refuses a symlink or a directory before reading the store
    refuse_own_file(storage, target)
    started = time.perf_counter()
    with output_file(target) as stream:
        counts, exported_at, size = await write_document(
            storage, stream, batch_size, progress_callback
        )
    return {
        "path": str(target),
        **counts.as_dict(),
        "bytes": size,
        "exported_at": exported_at,
        "duration_seconds": elapsed(started),
    }


async def export_to_stream(
    storage: SessionStorage,
    stream: IO[str],
    *,
    progress_callback: ProgressCallback | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    escape_controls: bool = False,
) -> dict[str, Any]:
    """Writes the whole store as one JSON export document to an open text stream.

    With `escape_controls` (a terminal may read it), DEL, the C1 controls, the
    bidirectional embeddings, overrides and isolates and U+2028/U+2029 are written as
    `\\u` escapes: the same document to a JSON reader.

    Returns:
        {"sessions", "messages", "files", "bytes", "exported_at", "duration_seconds"}.

    Raises:
        OSError: if the stream fails.
        PersistenceError: if the store fails.
    """
    storage_argument(storage, "storage")
    callback_argument(progress_callback)
    check_batch_size(batch_size)
    started = time.perf_counter()
    counts, exported_at, size = await write_document(
        storage, stream, batch_size, progress_callback, escape_controls=escape_controls
    )
    return {
        **counts.as_dict(),
        "bytes": size,
        "exported_at": exported_at,
        "duration_seconds": elapsed(started),
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
        {"sessions_imported", "messages_imported", "files_imported" (what was
        written), "sessions_already_present", "messages_already_present",
        "files_already_present", "format_version", "exported_at", "duration_seconds"}.

    Raises:
        InvalidDataError: for a missing, truncated or malformed file, a foreign or
            newer format, a record failing validation or a duplicate id; nothing
            is written then.
        PersistenceError: if the store fails; batches already written stay.
    """
    storage_argument(storage, "storage")
    callback_argument(progress_callback)
    check_batch_size(batch_size)
    with open_input(path_argument(input_path, "input_path")) as stream:
        return await import_from_stream(
            storage, stream, progress_callback=progress_callback, batch_size=batch_size
        )


async def import_from_stream(
    storage: SessionStorage,
    stream: IO[bytes],
    *,
    progress_callback: ProgressCallback | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    checked: DocumentSummary | None = None,
) -> dict[str, Any]:
    """`import_from_json` from an open, seekable binary stream (read twice: checked, then
    written), from where it stands: the document need not start at byte 0.

    `checked` is the stream's `validate_document` summary where the caller has already
    checked it (the command line does, before it opens the store), the stream put back
    where that check started: it is not checked again.

    Raises:
        InvalidDataError, PersistenceError: as `import_from_json`.
    """
    storage_argument(storage, "storage")
    callback_argument(progress_callback)
    check_batch_size(batch_size)
    started = time.perf_counter()
    # One open file for both passes: the second reads what the first validated, from
    # the same offset (found by attack: a seek to 0 wrote what stdin held before it).
    start = stream.tell()
    summary = checked
    if summary is None:
        summary = await asyncio.to_thread(_validate_document, stream)
    stream.seek(start)
    progress = Progress(progress_callback, summary.counts.sessions)
    try:
        async for sessions, records in read_ahead(_file_batches(stream, batch_size)):
            if sessions:
                await progress.add_written(write_sessions(storage, sessions), len(sessions))
            if records:
                await progress.add_written(write_file_records(storage, records))
    except BaseException as exc:
        # Also on Ctrl-C (KeyboardInterrupt, or the task cancelled): say how far it got.
        progress.stopped(exc)
        raise
    return {
        **progress.summary("imported"),
        "format_version": summary.version,
        "exported_at": summary.exported_at.isoformat(timespec="milliseconds"),
        "duration_seconds": elapsed(started),
    }


def _take_batch(
    records: Iterator[ChatSession | UploadedFileRecord], batch_size: int
) -> tuple[list[ChatSession], list[UploadedFileRecord]]:
    sessions: list[ChatSession] = []
    files: list[UploadedFileRecord] = []
    for record in records:
        if isinstance(record, ChatSession):
            sessions.append(record)
            if len(sessions) >= batch_size:
                break
        else:
            files.append(record)
            if len(files) >= batch_size:
                break
    return sessions, files


async def _file_batches(
    stream: IO[bytes], batch_size: int
) -> AsyncIterator[tuple[list[ChatSession], list[UploadedFileRecord]]]:
    """Yields the validated records of the file in batches, parsed in a worker thread."""
    records = iter_records(stream)
    while True:
        sessions, files = await asyncio.to_thread(_take_batch, records, batch_size)
        if not sessions and not files:
            return
        yield sessions, files


def validate_export_file(input_path: str | Path) -> dict[str, Any]:
    """Checks an export document without writing anything; returns what it holds.

    Raises:
        InvalidDataError: as `import_from_json` would, before writing.
    """
    with open_input(Path(input_path)) as stream:
        summary = _validate_document(stream)
    return {"format_version": summary.version, **summary.counts.as_dict()}
