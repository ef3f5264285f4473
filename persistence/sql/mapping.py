"""Rows <-> domain models, as pure functions.

On the way out, rows become domain objects without re-validation: the schema and the
validation on the way in already guarantee every value. Loading a history builds
thousands of messages, so they are built the way pydantic's `model_construct` builds
them, without its per-call overhead (tests/sql/test_mapping.py holds the two equal).
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable, Iterable, Sequence
from itertools import accumulate
from typing import Any, TypeVar, overload

from pydantic import BaseModel
from sqlalchemy import Text, cast

from persistence.changes import Base, MessageList, Snapshot
from persistence.errors import PersistenceError
from persistence.garbage_collection import collection_paused
from persistence.identifiers import new_incarnation
from persistence.model_slots import set_dict, set_extra, set_fields_set, set_private
from persistence.models import ChatMessage, ChatSession, UploadedFileRecord
from persistence.search import search_document
from persistence.sql.tables import FileRow, MessageRow, SessionRow
from persistence.sql.types import frozen_json_loads, json_loads
from persistence.validation import shown

# Metadata comes as its JSON text: the object parses it, and its bookkeeping keeps the
# text as the stored snapshot, so a load copies nothing for it.
SESSION_METADATA_TEXT = cast(SessionRow.metadata_, Text).label("metadata_text")
SESSION_COLUMNS = (
    SessionRow.session_id,
    SessionRow.model,
    SessionRow.created_at,
    SessionRow.updated_at,
    SessionRow.message_count,
    SESSION_METADATA_TEXT,
    SessionRow.status,
    SessionRow.revision,
    SessionRow.incarnation,
    SessionRow.next_position,
)
# A message's metadata too: on PostgreSQL the driver's JSONB codec called a Python
# function per row; json_loads answers the empty object of most messages at once.
MESSAGE_METADATA_TEXT = cast(MessageRow.metadata_, Text).label("metadata_text")
MESSAGE_COLUMNS = (
    MessageRow.message_id,
    MessageRow.session_id,
    MessageRow.role,
    MessageRow.content,
    MessageRow.created_at,
    MESSAGE_METADATA_TEXT,
)
# One session's history: every row's session_id is the one asked for, so it is not read
# (a column fewer to fetch, and one string shared by the messages instead of one each).
HISTORY_COLUMNS = tuple(column for column in MESSAGE_COLUMNS if column is not MessageRow.session_id)
FILE_COLUMNS = (
    FileRow.file_id,
    FileRow.gemini_file_name,
    FileRow.gemini_file_uri,
    FileRow.display_name,
    FileRow.size,
    FileRow.mime_type,
    FileRow.uploaded_at,
    FileRow.expires_at,
    FileRow.metadata_,
)

Model = TypeVar("Model", bound=BaseModel)
_MESSAGE_FIELDS = frozenset(ChatMessage.model_fields)
_SESSION_FIELDS = frozenset(ChatSession.model_fields)
_FILE_FIELDS = frozenset(UploadedFileRecord.model_fields)


def _private_defaults(cls: type[BaseModel]) -> Callable[[], dict[str, Any] | None]:
    """What model_construct gives a model's private attributes, resolved once per class."""
    attributes = dict(cls.__private_attributes__)
    if not attributes:
        return lambda: None
    factories = {
        name: attr.default_factory or (lambda value=attr.default: value)
        for name, attr in attributes.items()
    }
    return lambda: {name: make() for name, make in factories.items()}  # type: ignore[call-arg]


_PRIVATE: dict[type[BaseModel], Callable[[], dict[str, Any] | None]] = {
    model: _private_defaults(model) for model in (ChatMessage, ChatSession, UploadedFileRecord)
}


def _trusted(cls: type[Model], fields: frozenset[str], values: dict[str, Any]) -> Model:
    """Builds a model from values the database guarantees valid, as model_construct does."""
    instance = cls.__new__(cls)
    set_dict(instance, values)
    set_fields_set(instance, set(fields))
    set_extra(instance, None)
    set_private(instance, _PRIVATE[cls]())
    return instance


def _message(
    message_id: str, session_id: str, role: str, content: str, created_at: Any, metadata: str
) -> ChatMessage:
    # The hottest builder (a history is thousands of them), so _trusted is inlined; a
    # frozen model never changes its fields-set, so every message may share one.
    # `metadata` is the column's JSON text.
    if content.__class__ is not str:
        raise TypeError(_NOT_TEXT)  # named by _unreadable_message
    message = _new_message(ChatMessage)
    set_dict(
        message,
        {
            "message_id": message_id,
            "session_id": session_id,
            "role": role,
            "content": content,
            "created_at": created_at,
            "metadata": frozen_json_loads(metadata),
        },
    )
    set_fields_set(message, _MESSAGE_FIELDS_SET)
    set_extra(message, None)
    set_private(message, None)
    return message


def messages_from_rows(rows: Iterable[Sequence[Any]]) -> list[ChatMessage]:
    """The messages of `rows` (MESSAGE_COLUMNS first; a search's rows carry more), in
    order, built with the cyclic collector paused (persistence.garbage_collection: a
    history is thousands of tracked objects).

    Raises:
        PersistenceError: a row's content is not text or its metadata is not a JSON
            object (written outside persistence).
    """
    try:
        with collection_paused():
            return [_message(row[0], row[1], row[2], row[3], row[4], row[5]) for row in rows]
    except (ValueError, TypeError, RecursionError) as exc:
        raise _unreadable_message(rows, 3, None, exc) from exc


def history_from_rows(session_id: str, rows: Iterable[Sequence[Any]]) -> list[ChatMessage]:
    """The messages of one session from rows of HISTORY_COLUMNS (more may follow), in
    order, as messages_from_rows builds them; every message holds the one `session_id`.

    Raises:
        PersistenceError: a row's content is not text or its metadata is not a JSON
            object (written outside persistence).
    """
    try:
        with collection_paused():
            return [_message(row[0], session_id, row[1], row[2], row[3], row[4]) for row in rows]
    except (ValueError, TypeError, RecursionError) as exc:
        raise _unreadable_message(rows, 2, session_id, exc) from exc


def _unreadable_message(
    rows: Iterable[Sequence[Any]],
    content: int,
    session_id: str | None,
    exc: ValueError | TypeError | RecursionError,
) -> PersistenceError:
    """Names the first row whose content (column `content`) is not text or whose
    metadata (the column after it, as json_loads reads it) is not a JSON object, and
    its session (`session_id`, else the row's second column).

    Found by attack: one message whose metadata a hand edit left invalid made loads,
    searches, exports and SessionManager.startup raise a bare JSONDecodeError naming
    nothing; content a hand edit set to a BLOB (sqlite3's readfile() makes one) loaded
    as bytes, and searches and exports then raised a bare TypeError. The rows are
    walked again only on that failure, so the hot path tries nothing per row; rows
    given as an iterator are spent, and then no row is named.
    """
    where = "" if session_id is None else f"session {session_id!r}: "
    metadata = content + 2  # created_at lies between them
    for row in rows if isinstance(rows, Sequence) else ():
        problem = None
        if not isinstance(row[content], str):
            problem = (
                f"the stored chat_messages.content is not text ({shown(row[content])});"
                " CAST(content AS TEXT) makes it text again"
            )
        else:
            try:
                json_loads(row[metadata])
            except (ValueError, TypeError, RecursionError):
                problem = (
                    "the stored chat_messages.metadata is not a JSON object"
                    f" ({shown(row[metadata])})"
                )
        if problem is not None:
            return PersistenceError(
                f"session {session_id or row[1]!r}, message {row[0]!r}: {problem}; it was"
                " written outside persistence"
            )
    column = "content is not text" if str(exc) == _NOT_TEXT else "metadata is not a JSON object"
    return PersistenceError(
        f"{where}a stored chat_messages.{column} ({exc}); it was written outside persistence"
    )


_NOT_TEXT = "a BLOB"
_new_message = ChatMessage.__new__
_MESSAGE_FIELDS_SET = set(ChatMessage.model_fields)


def session_from_row(
    row: Sequence[Any], messages: list[ChatMessage] | None, token: str
) -> ChatSession:
    """A session as storage `token` holds it, with the bookkeeping of that load.

    `messages` None means a listing (no history); fewer messages than the row's count
    means a partial load (`last=`): `message_count` is always the stored count.
    """
    try:
        metadata = json_loads(row[5])
    except (ValueError, TypeError, RecursionError) as exc:
        # A try costs nothing until it catches (Python 3.11), and a page is 100 rows.
        raise PersistenceError(
            f"session {row[0]!r}: the stored chat_sessions.metadata is not a JSON object"
            f" ({shown(row[5])}); it was written outside persistence"
        ) from exc
    return ChatSession.from_store(
        {
            "session_id": row[0],
            "model": row[1],
            "created_at": row[2],
            "updated_at": row[3],
            "message_count": row[4],
            "messages": MessageList() if messages is None else MessageList(messages),
            "metadata": metadata,
            "status": row[6],
        },
        token,
        row[7],
        _base_of_row,
        row,
        (row[3], row[0]) if messages is None else None,
    )


def _base_of_row(row: Sequence[Any], synced: int, foreign_at: int) -> Base:
    """The base session_from_row records: the row as read (its metadata's JSON text is
    the snapshot, parsed only if a save needs it)."""
    return Base(
        session_id=row[0],
        revision=row[7],
        incarnation=row[8],
        exact=True,
        certain=True,
        model=row[1],
        status=row[6],
        created_at=row[2],
        updated_at=row[3],
        metadata=Snapshot(text=row[5]),
        synced=synced,
        log_at=0,
        foreign_at=foreign_at,
        # Positions are never reused: those the count lacks were removed.
        removals=row[9] - row[4],
    )


def file_record_from_row(row: Sequence[Any]) -> UploadedFileRecord:
    """A file record from a row of FILE_COLUMNS.

    Raises:
        PersistenceError: its metadata is JSON but not an object (written outside
            persistence).
    """
    if type(row[8]) is not dict:
        raise PersistenceError(
            f"file {row[0]!r}: the stored uploaded_files.metadata is not a JSON object"
            f" ({shown(row[8])}); it was written outside persistence"
        )
    return _trusted(
        UploadedFileRecord,
        _FILE_FIELDS,
        dict(
            zip(
                (
                    "file_id",
                    "gemini_file_name",
                    "gemini_file_uri",
                    "display_name",
                    "size",
                    "mime_type",
                    "uploaded_at",
                    "expires_at",
                    "metadata",
                ),
                row,
                strict=True,
            )
        ),
    )


def row_from_session(session: ChatSession, message_count: int) -> dict[str, Any]:
    """A new session's row (the caller sets `revision` and `next_position`)."""
    return {
        "session_id": session.session_id,
        "model": session.model,
        "created_at": session.created_at,
        "updated_at": session.updated_at,
        "message_count": message_count,
        "metadata": session.metadata,
        "status": session.status,
        # Drawn when the row is created: a session deleted and created again is another.
        "incarnation": new_incarnation(),
    }


def rows_from_messages(
    session_id: str, messages: Sequence[ChatMessage], first_position: int, *, documents: bool
) -> list[dict[str, Any]]:
    """Message rows; without `documents`, pending (search documents written later:
    persistence.sql.indexing)."""
    return [
        {
            "message_id": message.message_id,
            "session_id": session_id,
            "position": first_position + offset,
            "role": message.role,
            "content": message.content,
            "created_at": message.created_at,
            "metadata": message.metadata,
            "search_text": search_document(message.content) if documents else None,
        }
        for offset, message in enumerate(messages)
    ]


class MessageRows(Sequence[dict[str, Any]]):
    """The rows of `rows_from_messages` for one or more histories, each slice built when
    it is read.

    `histories` are (session_id, messages, first position) triples. A PostgreSQL bulk
    insert sends its rows in parts and builds the next part, search documents and all,
    while the server stores the one before (runner.py); a SQLite one builds each
    multi-row statement's rows as it sends it.
    """

    def __init__(
        self,
        histories: Iterable[tuple[str, Sequence[ChatMessage], int]],
        *,
        documents: bool,
    ) -> None:
        # The non-empty histories, and the index of each one's first row.
        self._histories = [history for history in histories if history[1]]
        self._starts = list(accumulate((len(h[1]) for h in self._histories[:-1]), initial=0))
        self._length = sum(len(history[1]) for history in self._histories)
        self._documents = documents

    def __len__(self) -> int:
        return self._length

    @overload
    def __getitem__(self, index: int) -> dict[str, Any]: ...

    @overload
    def __getitem__(self, index: slice) -> list[dict[str, Any]]: ...

    def __getitem__(self, index: int | slice) -> dict[str, Any] | list[dict[str, Any]]:
        if isinstance(index, int):
            row = range(self._length)[index]  # IndexError when out of range
            return self[row : row + 1][0]
        start, stop, stride = index.indices(self._length)
        if stride != 1:
            raise ValueError("message rows are sliced in order")
        rows: list[dict[str, Any]] = []
        part = bisect_right(self._starts, start) - 1
        while start < stop:
            first_row = self._starts[part]
            session_id, messages, first_position = self._histories[part]
            begin, end = start - first_row, min(len(messages), stop - first_row)
            rows += rows_from_messages(
                session_id, messages[begin:end], first_position + begin, documents=self._documents
            )
            start, part = first_row + end, part + 1
        return rows


def row_from_file_record(record: UploadedFileRecord) -> dict[str, Any]:
    return {
        "file_id": record.file_id,
        "gemini_file_name": record.gemini_file_name,
        "gemini_file_uri": record.gemini_file_uri,
        "display_name": record.display_name,
        "size": record.size,
        "mime_type": record.mime_type,
        "uploaded_at": record.uploaded_at,
        "expires_at": record.expires_at,
        "metadata": record.metadata,
    }
