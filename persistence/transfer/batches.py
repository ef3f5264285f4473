"""Writing batches into a destination store: what migration, import and restore share.

A batch of sessions costs a fixed number of round trips, whatever it holds: one
read of what the destination already has of them, then one bulk insert of the
sessions it lacks (`SessionStorage.insert_sessions`). Sessions the destination
already holds are merged the careful way, in one unit of work. A merge only adds:
the destination keeps its own fields (model, status, created_at, the values of the
metadata keys it holds) and gets only the messages and metadata keys it lacks.

A batch is written in one transaction. Everything is counted as written only once
its transaction has committed, and a session or file record the destination held
already is counted as present, not as written (a file record it holds keeps its
values, as a session keeps its fields).

Live service instances may write the destination between a batch's read and its
write. A batch never writes over them: a save that finds the session changed
(SessionConflictError), deleted (SessionDeletedError) or created (a session the batch
read as absent) since its read rolls the whole batch back, and the batch reads again
and merges against what the destination holds then.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from persistence.errors import SessionConflictError, SessionDeletedError
from persistence.models import ChatMessage, ChatSession, UploadedFileRecord
from persistence.storage import SessionStorage
from persistence.transfer.ledger import HELD, INSERTED, MERGED, Entry, Ledger


@dataclass
class Tally:
    """What a transfer wrote, and what the destination already held."""

    sessions: int = 0
    messages: int = 0
    files: int = 0
    sessions_present: int = 0
    messages_present: int = 0
    files_present: int = 0

    def add(self, other: Tally) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass
class _Merge:
    stored: ChatSession  # the destination's copy, as loaded (then merged, if changed)
    changed: bool  # False: the destination's copy already has it all
    added: list[ChatMessage]
    present: int


def _merged(incoming: ChatSession, stored: ChatSession) -> _Merge:
    """What to save for `incoming`, given the destination's copy: only what it lacks."""
    known = {message.message_id for message in stored.messages}
    missing = [message for message in incoming.messages if message.message_id not in known]
    present = len(incoming.messages) - len(missing)
    # Found by review: deciding by updated_at let a second migration undo an archive or
    # a model change made in the destination, as those do not move updated_at.
    added_keys = {k: v for k, v in incoming.metadata.items() if k not in stored.metadata}
    if not missing and not added_keys:
        return _Merge(stored, False, [], present)
    # `stored` was loaded from the destination, so its save sends only these.
    stored.messages.extend(missing)
    stored.message_count = len(stored.messages)
    if added_keys:
        stored.metadata = {**stored.metadata, **added_keys}
    stored.updated_at = max(stored.updated_at, incoming.updated_at)
    return _Merge(stored, True, missing, present)


async def _plan(
    destination: SessionStorage, sessions: Sequence[ChatSession]
) -> tuple[list[ChatSession], list[_Merge]]:
    """The sessions the destination lacks, and the merges of those it holds."""
    stored = {
        session.session_id: session
        for session in await destination.load_sessions([s.session_id for s in sessions])
    }
    new = [session for session in sessions if session.session_id not in stored]
    merges = [
        _merged(session, stored[session.session_id])
        for session in sessions
        if session.session_id in stored
    ]
    return new, merges


async def _save_in_one_unit(
    destination: SessionStorage, new: Sequence[ChatSession], merges: Sequence[_Merge]
) -> Tally:
    """The careful path: every session saved through one unit of work."""
    saves = [merge.stored for merge in merges if merge.changed]
    if new or saves:
        async with destination.unit_of_work() as uow:
            for session in new:
                await uow.sessions.add(session)
                if session.revision != 1:
                    # Found by attack: created by another writer since the batch read
                    # the destination, and the unit's create merged this copy over it,
                    # its model, status and metadata values winning. Rolled back.
                    raise _CreatedMeanwhile(session.session_id)
            for save in saves:
                await uow.sessions.add(save)
            await uow.commit()
    changed = [merge for merge in merges if merge.changed]
    return Tally(
        sessions=len(new) + len(changed),
        messages=sum(len(s.messages) for s in new) + sum(len(m.added) for m in changed),
        sessions_present=len(merges) - len(changed),
        messages_present=sum(merge.present for merge in merges),
    )


class _CreatedMeanwhile(SessionConflictError):
    """A session the batch read as absent was created by another writer before its write."""

    def __init__(self, session_id: str) -> None:
        super().__init__(session_id, ["created by another writer"])


# Plans a batch may take: a session that a writer of the destination changed, deleted
# or created between the batch's read and its write makes the batch plan again.
PLANS = 5


async def write_sessions(
    destination: SessionStorage, sessions: Sequence[ChatSession], ledger: Ledger | None = None
) -> Tally:
    """Adds one batch of sessions to the destination, in one transaction.

    `ledger`, if given, records what became of each session once the batch committed
    (what migrate_storage's verification checks).

    Returns:
        What was written and what the destination held already.

    Raises:
        InvalidDataError: if the destination refuses a record (a message id it
            holds in another session); nothing of the batch is written then.
        SessionConflictError, SessionDeletedError: if writers of the destination
            changed the batch's sessions under it PLANS times in a row; nothing of the
            batch is written then.
        PersistenceError: if the destination fails; nothing of the batch is written.
    """
    # Read first: a save through a unit of work sets an object's revision to the
    # destination's.
    read_at = {session.session_id: session.revision for session in sessions}
    plans_left = PLANS
    while True:
        plans_left -= 1
        try:
            tally, new, merges = await _write_planned(destination, sessions)
        except (SessionDeletedError, SessionConflictError):
            # Found by attack: a live service deleting a session the batch was merging,
            # or setting a metadata key the merge adds, stopped the whole import,
            # restore or migration. Nothing of the batch was written: read again.
            if plans_left == 0:
                raise
            continue
        if ledger is not None:
            ledger.record_sessions(_outcomes(new, merges, read_at))
        return tally


def _outcomes(
    new: Sequence[ChatSession], merges: Sequence[_Merge], read_at: dict[str, int | None]
) -> list[tuple[str, Entry]]:
    """What a committed batch did with each session, as the ledger records it."""
    entries = [
        (session.session_id, Entry(INSERTED, 1, read_at[session.session_id])) for session in new
    ]
    for merge in merges:
        session_id, outcome = merge.stored.session_id, MERGED if merge.changed else HELD
        entries.append((session_id, Entry(outcome, merge.stored.revision, read_at[session_id])))
    return entries


async def _write_planned(
    destination: SessionStorage, sessions: Sequence[ChatSession]
) -> tuple[Tally, list[ChatSession], list[_Merge]]:
    """Writes the batch; returns the tally, the sessions inserted and the merges."""
    new, merges = await _plan(destination, sessions)
    if any(merge.changed for merge in merges):
        return await _save_in_one_unit(destination, new, merges), new, merges
    if new and not await destination.insert_sessions(new):
        # Another writer created one of them meanwhile, or one of their message ids
        # is taken: the careful path merges the one and names the other.
        new, merges = await _plan(destination, sessions)
        return await _save_in_one_unit(destination, new, merges), new, merges
    tally = Tally(
        sessions=len(new),
        messages=sum(len(session.messages) for session in new),
        sessions_present=len(merges),
        messages_present=sum(merge.present for merge in merges),
    )
    return tally, new, merges


async def write_file_records(
    destination: SessionStorage, records: Sequence[UploadedFileRecord], ledger: Ledger | None = None
) -> Tally:
    """Adds the records the destination lacks, in one transaction; keeps the others.

    Found by attack: a record the destination held with other values (a service's
    re-upload, with its new URI and expiry) was overwritten, so an older file put back
    an expired upload. Like a session's fields, the destination's values are its own.
    """
    held = {
        record.file_id
        for record in await destination.load_file_records([r.file_id for r in records])
    }
    new = [record for record in records if record.file_id not in held]
    # Found by attack: the records were saved (upserts), so a record a service wrote
    # between the look above and this write was replaced by the source's older one.
    inserted = set(await destination.insert_file_records(new))
    if ledger is not None:
        ledger.record_files([(record.file_id, record.file_id in inserted) for record in records])
    return Tally(files=len(inserted), files_present=len(records) - len(inserted))
