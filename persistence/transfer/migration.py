"""Copying sessions between stores in batches: migrate_storage and what import shares.

Every path sees the backends only as `SessionStorage`: sessions stream out through
`iter_sessions` in batches and go in through `batches.write_sessions`, a fixed
number of round trips per batch, so memory is bounded by `batch_size`, never by the
size of the store, and a failure leaves whole batches behind. Writes are additive
and idempotent: a session the destination already holds gets only the messages and
metadata keys it lacks, and keeps its own fields.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

from persistence.arguments import callback_argument, refuse_one_store, storage_argument
from persistence.errors import InvalidDataError
from persistence.models import ChatSession, UploadedFileRecord
from persistence.storage import SessionStorage, StorageCounts, check_batch_size
from persistence.transfer.batches import Tally, write_file_records, write_sessions
from persistence.transfer.copy_check import verify_copy
from persistence.transfer.ledger import Ledger
from persistence.transfer.sides import failing_store
from persistence.transfer.stored_values import checked_file_records, checked_sessions
from persistence.transfer.streams import read_ahead
from persistence.transfer.unfinished import CopySource, copy_begins, copy_finished
from persistence.transfer.verification import counts_summary

ProgressCallback = Callable[[int, int], object]
# How long a cancelled transfer lets the batch it is writing end, to count it.
BATCH_GRACE_SECONDS = 10.0
# The attribute of a stopped transfer's exception: Progress.unconfirmed.
UNCONFIRMED_SESSIONS = "persistence_unconfirmed_sessions"
DEFAULT_BATCH_SIZE = 500
T = TypeVar("T")


def elapsed(started: float) -> float:
    return round(time.perf_counter() - started, 3)


def session_batches(storage: SessionStorage, batch_size: int) -> AsyncIterator[list[ChatSession]]:
    """Yields every session of the store in batches, each read as one consistent state
    and checked by the models' rules (persistence.transfer.stored_values).

    Raises:
        InvalidDataError: a session holds what persistence never writes, named.
    """
    return checked_sessions(read_ahead(storage.iter_sessions(batch_size, with_messages=True)))


def file_record_batches(
    storage: SessionStorage, batch_size: int
) -> AsyncIterator[list[UploadedFileRecord]]:
    """Yields every file record of the store in batches, checked as session_batches'.

    Raises:
        InvalidDataError: a record holds what persistence never writes, named.
    """
    return checked_file_records(storage.iter_file_records(batch_size))


class Progress:
    """Counts what a transfer wrote and reports sessions to the caller's callback."""

    def __init__(self, callback: ProgressCallback | None, total: int) -> None:
        self._callback = callback
        self.total = total
        self.tally = Tally()
        # The sessions of a batch stopped while it wrote: stored or not, unknown.
        self.unconfirmed = 0
        self.report()

    @property
    def sessions_done(self) -> int:
        return self.tally.sessions + self.tally.sessions_present

    def report(self) -> None:
        if self._callback is not None:
            self._callback(self.sessions_done, max(self.total, self.sessions_done))

    def add(self, tally: Tally) -> None:
        """Adds a committed batch; the callback sees each of its sessions."""
        before = self.sessions_done
        self.tally.add(tally)
        if self._callback is not None:
            total = max(self.total, self.sessions_done)
            for done in range(before + 1, self.sessions_done + 1):
                self._callback(done, total)

    async def add_written(self, writing: Awaitable[Tally], sessions: int = 0) -> None:
        """Adds the batch that `writing` commits (of `sessions` sessions). A cancel
        (Ctrl-C, SIGTERM) lets the batch end, for BATCH_GRACE_SECONDS at most, and
        counts what it committed, then stops: what a stopped transfer says was done is
        what was written (found by attack: into SQLite, whose cancelled calls still
        commit, `2500 of 4000 sessions done` where 3,000 were). A batch that has not
        ended by then (waiting on another connection's lock), or a second cancel,
        stops it too, and the note says its sessions may be stored (found by attack:
        waited for to its end, a cancel waited as long as a lock was held)."""
        write = asyncio.ensure_future(writing)
        try:
            self.add(await asyncio.shield(write))
        except asyncio.CancelledError:
            try:
                await asyncio.wait([write], timeout=BATCH_GRACE_SECONDS)
            finally:
                if not write.done():
                    write.cancel()
                    self.unconfirmed = sessions
                elif not write.cancelled() and write.exception() is None:
                    self.add(write.result())
            raise

    def stopped(self, exc: BaseException) -> None:
        # Found by attack: a session the destination refuses (a message id it holds in
        # another session) stops every run at the same place, which "resumes" hid.
        again = (
            "running it again stops at the same session until the data it names is mended"
            if isinstance(exc, InvalidDataError)
            else "running the same transfer again resumes safely"
        )
        being_written = (
            f", and perhaps the {self.unconfirmed} being written when it stopped"
            if self.unconfirmed
            else ""
        )
        exc.add_note(
            f"{self.sessions_done} of {self.total} sessions were copied"
            f" ({self.tally.sessions} written, {self.tally.sessions_present} already present)"
            f"{being_written} before it stopped; {again}"
        )
        setattr(exc, UNCONFIRMED_SESSIONS, self.unconfirmed)

    def summary(self, verb: str) -> dict[str, int]:
        tally = self.tally
        return {
            f"sessions_{verb}": tally.sessions,
            f"messages_{verb}": tally.messages,
            f"files_{verb}": tally.files,
            "sessions_already_present": tally.sessions_present,
            "messages_already_present": tally.messages_present,
            "files_already_present": tally.files_present,
        }


async def copy_batches(
    batches: AsyncIterator[Sequence[T]],
    write: Callable[[Sequence[T]], Awaitable[Tally]],
    progress: Progress,
    *,
    of_sessions: bool,
) -> None:
    """Writes each batch the source gives; an error says which side it came from."""
    while True:
        with failing_store("source"):
            batch = await anext(batches, None)
        if batch is None:
            return
        with failing_store("destination"):
            await progress.add_written(write(batch), len(batch) if of_sessions else 0)


@dataclass
class Copy:
    """A finished copy of one store into another: what it wrote, and its ledger."""

    source: SessionStorage
    destination: SessionStorage
    batch_size: int
    progress: Progress
    ledger: Ledger
    started: float
    write_seconds: float
    source_counts: StorageCounts
    destination_counts_before: StorageCounts

    def close(self) -> None:
        """Deletes the ledger's temporary file; `verify_copied` needs it until then."""
        self.ledger.close()


async def copy_storage(
    source: SessionStorage,
    destination: SessionStorage,
    *,
    progress_callback: ProgressCallback | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    noted_as: CopySource | None = None,
) -> Copy:
    """The copy of migrate_storage, without its verification (`verify_copied` runs it).

    The command line runs the two apart, to show each its own progress bar. The
    destination notes the copy unfinished until its last batch commits
    (persistence.transfer.unfinished), naming the source as `noted_as` says, if given.

    Raises:
        InvalidDataError, PersistenceError: as migrate_storage.
    """
    storage_argument(source, "source")
    storage_argument(destination, "destination")
    callback_argument(progress_callback)
    check_batch_size(batch_size)
    started = time.perf_counter()
    with failing_store("source"):
        source_counts = await source.count()  # opened: each storage knows its store now
    await refuse_one_store(source, destination)
    with failing_store("destination"):
        before = await destination.count()
    progress = Progress(progress_callback, source_counts.total_sessions)
    ledger = Ledger()
    try:
        with failing_store("source"):
            noted = noted_as or await CopySource.of(source)
        with failing_store("destination"):
            note = await copy_begins(noted, destination)
        await copy_batches(
            session_batches(source, batch_size),
            partial(write_sessions, destination, ledger=ledger),
            progress,
            of_sessions=True,
        )
        await copy_batches(
            file_record_batches(source, batch_size),
            partial(write_file_records, destination, ledger=ledger),
            progress,
            of_sessions=False,
        )
        with failing_store("destination"):
            await copy_finished(noted, note, destination)
    except BaseException as exc:
        ledger.close()
        # Also on Ctrl-C (KeyboardInterrupt, or the task cancelled): say how far it got.
        progress.stopped(exc)
        raise
    return Copy(
        source,
        destination,
        batch_size,
        progress,
        ledger,
        started,
        elapsed(started),
        source_counts,
        before,
    )


async def verify_copied(
    copy: Copy, progress_callback: ProgressCallback | None = None
) -> dict[str, Any]:
    """Checks what `copy` wrote (copy_check.verify_copy).

    Raises:
        PersistenceError: if either store fails.
    """
    return await verify_copy(
        copy.ledger,
        copy.source,
        copy.destination,
        batch_size=copy.batch_size,
        progress_callback=progress_callback,
    )


async def copy_summary(copy: Copy, verification: dict[str, Any] | None) -> dict[str, Any]:
    """migrate_storage's result for `copy` and its verification (None: not verified)."""
    return {
        **copy.progress.summary("migrated"),
        "duration_seconds": elapsed(copy.started),
        "write_seconds": copy.write_seconds,
        "verified": bool(verification and verification["ok"]),
        "verification": verification,
        "source_counts": counts_summary(copy.source_counts),
        "destination_counts_before": counts_summary(copy.destination_counts_before),
        "destination_counts": counts_summary(await copy.destination.count()),
    }


async def migrate_storage(
    source: SessionStorage,
    destination: SessionStorage,
    verify: bool = True,
    progress_callback: ProgressCallback | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> dict[str, Any]:
    """Copies every session, message and file record of `source` into `destination`.

    Additive and idempotent: what the destination holds is kept, running it twice
    stores nothing twice, and a session on both sides gets the messages and metadata
    keys it lacks, keeping its own fields (model, status, metadata values).
    Each batch of `batch_size` sessions is written in one transaction, the sessions
    the destination lacks as one bulk insert. `progress_callback(done, total)` sees
    each session once its batch has committed.

    The verification checks what this migration wrote or found, session by session
    (copy_check.verify_copy): what live writers of either store changed since the copy
    read or wrote a session is counted and named there, not compared.

    Returns:
        {"sessions_migrated", "messages_migrated", "files_migrated" (what was
        written), "sessions_already_present", "messages_already_present",
        "files_already_present" (what the destination held already: it keeps
        its own fields and file records), "duration_seconds", "write_seconds",
        "verified", "verification" (the verify_copy report, or None),
        "source_counts", "destination_counts_before", "destination_counts"}.

    Raises:
        InvalidDataError: for a bad batch_size, the same store on both sides, or a
            record the destination refuses (a message id it holds in another session).
        PersistenceError: if either store fails; batches already written stay, and
            the error's notes say how far it got.
    """
    return await copy_and_verify(source, destination, verify, progress_callback, batch_size)


async def copy_and_verify(
    source: SessionStorage,
    destination: SessionStorage,
    verify: bool = True,
    progress_callback: ProgressCallback | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    noted_as: CopySource | None = None,
) -> dict[str, Any]:
    """migrate_storage, naming its source in the destination's note of an unfinished
    copy as `noted_as` says (copy_storage)."""
    copy = await copy_storage(
        source,
        destination,
        progress_callback=progress_callback,
        batch_size=batch_size,
        noted_as=noted_as,
    )
    try:
        return await copy_summary(copy, await verify_copied(copy) if verify else None)
    finally:
        copy.close()
