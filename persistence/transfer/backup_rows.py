"""Checks every row of a SQLite backup as an import checks an export's records.

A SQLite file holds what its rows hold: a hand edit, or a store written by a tool
other than persistence, can leave values the domain models refuse (a NUL in content,
NaN in metadata, an id longer than 255 characters, a timestamp with microseconds)
or cannot read at all. Reading builds models without validating them (they came
from the store), so a restore wrote such rows as they were, or stopped at the first
unreadable one after the batches before it were written (found by attack). Restoring
a backup now reads it whole first, each session through the export's record
validation, and writes nothing when one fails.
"""

from __future__ import annotations

from pathlib import Path

from persistence.errors import InvalidDataError, PersistenceError
from persistence.storage import SessionStorage
from persistence.transfer.exchange_format import session_document, session_from_document
from persistence.transfer.migration import DEFAULT_BATCH_SIZE
from persistence.transfer.stored_values import check_file_record, check_times


async def check_backup_rows(source: SessionStorage, named: Path) -> None:
    """Refuses a backup (`source`, opened on a copy of the file `named`) holding a row
    that an export of it could not import unchanged.

    Raises:
        InvalidDataError: naming the file, the record and the field.
    """
    index = 0
    try:
        async for sessions in source.iter_sessions(DEFAULT_BATCH_SIZE):
            for session in sessions:
                times = [(session.created_at, "created_at"), (session.updated_at, "updated_at")]
                times += [(message.created_at, "created_at") for message in session.messages]
                check_times(times, f"sessions[{index}] ({session.session_id!r})")
                session_from_document(session_document(session), index)
                index += 1
        index = 0
        async for records in source.iter_file_records(DEFAULT_BATCH_SIZE):
            for record in records:
                check_file_record(record, index)
                index += 1
    except InvalidDataError as exc:
        raise InvalidDataError(f"{named}: {exc}; nothing was restored") from exc
    except (PersistenceError, RecursionError) as exc:
        # A value the store cannot read back, or metadata nested past the parser's
        # reach: the backup holds rows persistence did not write.
        problem = "nested too deep to read" if isinstance(exc, RecursionError) else str(exc)
        raise InvalidDataError(
            f"{named}: a row cannot be read ({problem}); nothing was restored"
        ) from exc
