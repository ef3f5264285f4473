"""What a transfer reads from a store is checked by the models' own rules before it is
written anywhere else.

Reading builds models without validating them (they came from the store), yet a row
written outside persistence (a hand edit, another tool) can hold what the models
refuse: NaN, -0.0 or an integer past 64 bits in metadata, a `$` key, a NUL, an id or
model past 255 characters, a timestamp without an offset or below the millisecond.
Found by attack: `migrate_storage` wrote -0.0 into PostgreSQL as 0.0 and 1e300 as a
301-digit integer, committed, and only then reported `verified=False`; a big integer
was copied and reported verified; a NaN stopped it with the server's "invalid input
syntax for type json", naming no session; `export_to_json` wrote files its own import
refuses. `session_batches` now runs these checks on every session it reads, for
migrations and exports alike, so such a row is refused by name before its batch is
written. A full validation of every session (a restore's: `backup_rows`) costs 11-12.5 us
a message, a quarter of a copy's; these checks, the same rules without pydantic, 1.5
(scripts/measure_transfer_checks.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from datetime import datetime

from persistence.errors import InvalidDataError
from persistence.models import ROLES, STATUSES, ChatSession, UploadedFileRecord
from persistence.transfer.exchange_format import file_record_document, file_record_from_document
from persistence.validation import MAX_ID_LENGTH, check_json_object, check_text


async def checked_sessions(
    batches: AsyncIterator[list[ChatSession]],
) -> AsyncIterator[list[ChatSession]]:
    """`batches`, each session checked by `check_session` before its batch is yielded.

    Raises:
        InvalidDataError: naming the session, the message and the field.
    """
    async for batch in batches:
        for session in batch:
            check_session(session)
        yield batch


async def checked_file_records(
    batches: AsyncIterator[list[UploadedFileRecord]],
) -> AsyncIterator[list[UploadedFileRecord]]:
    """`batches`, each record checked by `check_file_record` before its batch is yielded.

    Raises:
        InvalidDataError: naming the record and the field.
    """
    index = 0
    async for batch in batches:
        for record in batch:
            try:
                check_file_record(record, index)
            except InvalidDataError as exc:
                raise InvalidDataError(f"{exc}; it was written outside persistence") from None
            index += 1
        yield batch


def check_session(session: ChatSession) -> None:
    """Refuses a session (as read from a store) that the models would refuse, or whose
    timestamps carry what no backend is given: no UTC offset, or a part below the
    millisecond.

    Raises:
        InvalidDataError: "session 'id': <field>: <problem>; it was written outside
            persistence".
    """
    label = f"session {session.session_id!r}"
    try:
        _check_identifier(session.session_id, "session_id")
        _check_identifier(session.model, "model")
        if session.status not in STATUSES:
            raise InvalidDataError(f"status: {session.status!r} is not one of {STATUSES}")
        if session.message_count != len(session.messages):
            # Found by attack: a message deleted by hand was exported into a file that
            # import refuses, and migrate blamed a partial load (`last=`) nobody made.
            raise InvalidDataError(
                f"message_count: the session row says {session.message_count}, but"
                f" {len(session.messages)} messages are stored"
            )
        check_times(((session.created_at, "created_at"), (session.updated_at, "updated_at")))
        check_json_object(session.metadata, "metadata")
        for message in session.messages:
            label = f"session {session.session_id!r}, message {message.message_id!r}"
            _check_identifier(message.message_id, "message_id")
            if message.role not in ROLES:
                raise InvalidDataError(f"role: {message.role!r} is not one of {ROLES}")
            _check_str(message.content, "content")
            check_times(((message.created_at, "created_at"),))
            if message.metadata:
                check_json_object(message.metadata, "metadata")
    except InvalidDataError as exc:
        raise InvalidDataError(f"{label}: {exc}; it was written outside persistence") from None


def check_file_record(record: UploadedFileRecord, index: int) -> None:
    """Refuses a file record (as read from a store) that an export of it could not
    import unchanged: the whole of the model's validation (records are few).

    Raises:
        InvalidDataError: naming the record (`file_records[index]`) and the field.
    """
    label = f"file_records[{index}] ({record.file_id!r})"
    for field in _FILE_TEXT_FIELDS:
        try:
            _check_str(getattr(record, field), field)
        except InvalidDataError as exc:
            raise InvalidDataError(f"{label}: {exc}") from None
    check_times(((record.uploaded_at, "uploaded_at"), (record.expires_at, "expires_at")), label)
    file_record_from_document(file_record_document(record), index)


def check_times(times: Iterable[tuple[datetime, str]], label: str = "") -> None:
    """Refuses a timestamp that no backend is given: naive, or below the millisecond
    (the models keep milliseconds; an export would drop the rest without a word).

    Raises:
        InvalidDataError: naming the field (after `label`, if given).
    """
    where = f"{label}: " if label else ""
    for value, field in times:
        if value.tzinfo is None or value.utcoffset() is None:
            raise InvalidDataError(
                f"{where}{field}: the timestamp {value.isoformat()} has no UTC offset"
            )
        if value.microsecond % 1000:
            raise InvalidDataError(
                f"{where}{field}: the timestamp {value.isoformat()} has a part below the"
                " millisecond, which persistence never writes"
            )


# The text fields of a file record: pydantic's validation takes bytes for text (found by
# attack: a BLOB written by hand was copied as it was, or failed the export's encoder).
_FILE_TEXT_FIELDS = ("file_id", "gemini_file_name", "gemini_file_uri", "display_name", "mime_type")


def _check_str(value: object, field: str) -> None:
    # Found by attack: a BLOB written by hand into a text column (sqlite3's readfile()
    # makes one) raised a bare TypeError, naming nothing.
    if not isinstance(value, str):
        raise InvalidDataError(f"{field}: {type(value).__name__} is not text (a BLOB?)")
    check_text(value, field)


def _check_identifier(value: str, field: str) -> None:
    _check_str(value, field)
    if not value or len(value) > MAX_ID_LENGTH:
        raise InvalidDataError(
            f"{field}: must be 1 to {MAX_ID_LENGTH} characters, got {len(value)}"
        )
