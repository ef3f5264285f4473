"""Copying sessions between stores in batches: migrate_storage and what import shares.

Every path sees the backends only as `SessionStorage`: sessions stream out through
`iter_sessions` in batches and go in through one unit of work per batch, so memory
is bounded by `batch_size`, never by the size of the store, and a failure leaves whole
batches behind. Writes are additive and idempotent: a session the destination already
holds gets only the messages it lacks, and keeps its own fields if it was updated
after the incoming copy.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from persistence.errors import InvalidDataError, PersistenceError
from persistence.models import ChatSession, UploadedFileRecord
from persistence.storage import SessionStorage
from persistence.transfer.verification import counts_summary, same_value, verify_migration

ProgressCallback = Callable[[int, int], object]
DEFAULT_BATCH_SIZE = 500
_SESSION_FIELDS = ("model", "created_at", "updated_at", "metadata", "status")


def check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise InvalidDataError(f"batch_size: must be a positive integer, got {batch_size!r}")


def elapsed(started: float) -> float:
    return round(time.perf_counter() - started, 3)


def _as_of_row(row: ChatSession, loaded: ChatSession) -> ChatSession:
    """The session as `row` (read without messages) describes it, history included.

    A backend may read a session's fields and its messages in separate statements
    while writers append, so a loaded session can pair older fields with newer
    messages. `row` was read first, and messages are append-only and ordered: the
    first `row.message_count` of the later-loaded history are exactly the messages
    the row describes.
    """
    if len(loaded.messages) < row.message_count:
        # Deleted and saved again meanwhile: the loaded state is the only one left.
        return loaded
    return ChatSession.model_construct(
        **{name: getattr(row, name) for name in (*_SESSION_FIELDS, "session_id")},
        message_count=row.message_count,
        messages=loaded.messages[: row.message_count],
    )


async def session_batches(
    storage: SessionStorage, batch_size: int
) -> AsyncIterator[list[ChatSession]]:
    """Yields every session of the store in batches, each as one consistent state."""
    async for rows in storage.iter_sessions(batch_size, with_messages=False):
        loaded = {
            session.session_id: session
            for session in await storage.load_sessions([row.session_id for row in rows])
        }
        # A session deleted between the two reads is simply gone.
        yield [_as_of_row(row, loaded[row.session_id]) for row in rows if row.session_id in loaded]


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


async def write_sessions(destination: SessionStorage, sessions: Sequence[ChatSession]) -> None:
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


async def write_file_records(
    destination: SessionStorage, records: Sequence[UploadedFileRecord]
) -> None:
    async with destination.unit_of_work() as uow:
        for record in records:
            await uow.files.add(record)
        await uow.commit()


class Progress:
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
    check_batch_size(batch_size)
    if source is destination:
        raise InvalidDataError("source and destination are the same storage")
    started = time.perf_counter()
    source_counts = await source.count()
    before = await destination.count()
    progress = Progress(progress_callback, source_counts.total_sessions)
    try:
        async for batch in session_batches(source, batch_size):
            await write_sessions(destination, batch)
            progress.add_sessions(batch)
        async for records in source.iter_file_records(batch_size):
            await write_file_records(destination, records)
            progress.files += len(records)
    except PersistenceError as exc:
        progress.stopped(exc)
        raise
    written = elapsed(started)
    verification = None
    if verify:
        verification = await verify_migration(
            source, destination, additive=True, batch_size=batch_size
        )
    return {
        "sessions_migrated": progress.sessions,
        "messages_migrated": progress.messages,
        "files_migrated": progress.files,
        "duration_seconds": elapsed(started),
        "write_seconds": written,
        "verified": bool(verification and verification["ok"]),
        "verification": verification,
        "source_counts": counts_summary(source_counts),
        "destination_counts_before": counts_summary(before),
        "destination_counts": counts_summary(await destination.count()),
    }
