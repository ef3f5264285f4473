"""Reads and writes of sessions and file records through Beanie queries.

Every function takes the `AsyncClientSession` of the caller (None outside a unit of
work) and passes it to every Beanie call, so a plain save and a unit of work send
exactly the same commands.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from beanie import SortDirection
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.errors import DuplicateKeyError
from pymongo.results import UpdateResult

from persistence.errors import InvalidDataError, PersistenceError
from persistence.models import STATUSES, ChatMessage, ChatSession, Status, UploadedFileRecord
from persistence.mongo.documents import (
    DocumentSet,
    FileRecordView,
    MessageDocument,
    SessionSummary,
    SessionView,
)
from persistence.mongo.mapping import (
    check_save_size,
    document_from_file_record,
    file_record_from_view,
    message_from_document,
    save_filter,
    save_update,
    session_from_view,
)
from persistence.storage import StorageCounts, search_words

# Ids per `$in`: commands stay far below the 16 MiB message limit.
_IN_CHUNK = 1000
# A save that collided with a concurrent writer re-reads what is stored and tries again.
_SAVE_ATTEMPTS = 3
# The server refuses longer regular expressions; no message is searched for a longer word.
MAX_WORD_LENGTH = 1000
# Python's \w, spelled so the server's PCRE reads it the same way: MongoDB's \w and \b
# know only ASCII (SERVER-23881), while \p{L} and \p{N} are Unicode properties.
_WORD_CHAR = r"[\p{L}\p{N}_]"
_NEWEST_UPDATED = [("updated_at", SortDirection.DESCENDING), ("_id", SortDirection.DESCENDING)]
_NEWEST_UPLOADED = [("uploaded_at", SortDirection.DESCENDING), ("_id", SortDirection.DESCENDING)]
_BY_ID = [("_id", SortDirection.ASCENDING)]


def _chunks(items: Sequence[str]) -> list[Sequence[str]]:
    return [items[i : i + _IN_CHUNK] for i in range(0, len(items), _IN_CHUNK)]


def check_messages(session: ChatSession, new: Sequence[ChatMessage]) -> None:
    """Refuses, before any I/O, messages a save of `session` could never store.

    Raises:
        InvalidDataError: if a message belongs to another session or repeats an id.
    """
    seen: set[str] = set()
    for message in new:
        if message.session_id != session.session_id:
            raise InvalidDataError(
                f"message {message.message_id!r} has session_id {message.session_id!r},"
                f" not {session.session_id!r}"
            )
        if message.message_id in seen:
            raise InvalidDataError(f"message_id {message.message_id!r} appears twice")
        seen.add(message.message_id)


async def _messages_not_stored(
    docs: DocumentSet,
    client_session: AsyncClientSession | None,
    session_id: str,
    candidates: Sequence[ChatMessage],
) -> list[ChatMessage]:
    """Returns the candidates not stored yet; only matching ids cross the network.

    Raises:
        InvalidDataError: if a message id is already stored in another session.
    """
    stored: set[str] = set()
    for chunk in _chunks([message.message_id for message in candidates]):
        ids = list(chunk)
        rows = (
            await docs.sessions.find({"messages.message_id": {"$in": ids}}, session=client_session)
            .aggregate(
                [
                    {
                        "$project": {
                            "ids": {
                                "$filter": {
                                    "input": "$messages.message_id",
                                    "cond": {"$in": ["$$this", ids]},
                                }
                            }
                        }
                    }
                ],
                session=client_session,
            )
            .to_list()
        )
        for row in rows:
            if row["_id"] != session_id:
                raise InvalidDataError(
                    f"message_id {row['ids'][0]!r} is already stored in another session"
                    f" ({row['_id']!r})"
                )
            stored.update(row["ids"])
    return [message for message in candidates if message.message_id not in stored]


async def _update(
    docs: DocumentSet,
    client_session: AsyncClientSession | None,
    session: ChatSession,
    new: Sequence[ChatMessage],
    stored_before: int,
) -> bool:
    """Sends one save; False if the session did not hold what `stored_before` says.

    With nothing stored before, the update may create the session (an upsert).
    """
    update = save_update(session, new)
    check_save_size(session.session_id, update)
    result = await docs.sessions.find_one(
        save_filter(session.session_id, new, stored_before), session=client_session
    ).update(update, session=client_session, upsert=stored_before == 0)
    if not isinstance(result, UpdateResult):
        raise PersistenceError(f"save session: unexpected result {type(result).__name__}")
    return stored_before == 0 or result.matched_count > 0


async def write_session(
    docs: DocumentSet,
    client_session: AsyncClientSession | None,
    session: ChatSession,
    token: str,
) -> None:
    """Upserts the session's fields and appends only the messages the store lacks.

    Raises:
        InvalidDataError: if a message belongs to another session or repeats an id,
            or the session would cross the 16 MiB document limit.
    """
    new, certain = session.unstored_messages(token)
    await write_messages(docs, client_session, session, new, certain)


async def write_messages(
    docs: DocumentSet,
    client_session: AsyncClientSession | None,
    session: ChatSession,
    new: Sequence[ChatMessage],
    certain: bool,
) -> None:
    """Saves `session`, whose messages before `new` are stored if `certain`.

    When certain, one update does it all. Otherwise, or when that update finds the
    store holding less than expected (deleted meanwhile, or a concurrent writer's
    collision on the `$nin` guard or the unique message index), the stored ids are
    read and only the missing messages pushed, in the object's order. Inside a
    transaction a collision has aborted it already, so the error is raised.

    Raises:
        InvalidDataError: if a message belongs to another session or repeats an id,
            or the session would cross the 16 MiB document limit.
    """
    check_messages(session, new)
    in_transaction = client_session is not None and client_session.in_transaction
    candidates: Sequence[ChatMessage] = new
    if certain:
        try:
            if await _update(docs, client_session, session, new, len(session.messages) - len(new)):
                return
        except DuplicateKeyError:
            if in_transaction:
                raise
        candidates = session.messages
        check_messages(session, candidates)
    for attempt in range(1, _SAVE_ATTEMPTS + 1):
        missing = await _messages_not_stored(docs, client_session, session.session_id, candidates)
        try:
            await _update(docs, client_session, session, missing, 0)
            return
        except DuplicateKeyError:
            if in_transaction or attempt == _SAVE_ATTEMPTS:
                raise


async def read_session(
    docs: DocumentSet, client_session: AsyncClientSession | None, session_id: str
) -> ChatSession | None:
    view = await docs.sessions.find_one(
        {"_id": session_id}, projection_model=SessionView, session=client_session
    )
    return None if view is None else session_from_view(view)


async def read_sessions(
    docs: DocumentSet,
    client_session: AsyncClientSession | None,
    session_ids: Sequence[str],
    *,
    with_messages: bool = True,
) -> list[ChatSession]:
    """Returns the sessions that exist, in the order of `session_ids`."""
    model = SessionView if with_messages else SessionSummary
    found: dict[str, ChatSession] = {}
    for chunk in _chunks(list(session_ids)):
        views = await docs.sessions.find(
            {"_id": {"$in": list(chunk)}}, projection_model=model, session=client_session
        ).to_list()
        found.update({view.session_id: session_from_view(view) for view in views})
    return [found[sid] for sid in session_ids if sid in found]


async def read_session_page(
    docs: DocumentSet,
    client_session: AsyncClientSession | None,
    status: Status | None,
    limit: int,
    offset: int,
) -> list[ChatSession]:
    if limit == 0:
        return []
    query = {} if status is None else {"status": status}
    views = await docs.sessions.find(
        query,
        projection_model=SessionSummary,
        sort=_NEWEST_UPDATED,
        skip=offset,
        limit=limit,
        session=client_session,
    ).to_list()
    return [session_from_view(view) for view in views]


async def read_session_batch_after(
    docs: DocumentSet,
    client_session: AsyncClientSession | None,
    after: str | None,
    limit: int,
    *,
    with_messages: bool,
) -> list[ChatSession]:
    """The next `limit` sessions in `_id` order after `after` (keyset paging)."""
    query: dict[str, Any] = {} if after is None else {"_id": {"$gt": after}}
    model = SessionView if with_messages else SessionSummary
    views = await docs.sessions.find(
        query, projection_model=model, sort=_BY_ID, limit=limit, session=client_session
    ).to_list()
    return [session_from_view(view) for view in views]


async def delete_session_document(
    docs: DocumentSet, client_session: AsyncClientSession | None, session_id: str
) -> bool:
    result = await docs.sessions.find_one({"_id": session_id}, session=client_session).delete_one(
        session=client_session
    )
    return bool(result is not None and result.deleted_count)


async def session_exists(
    docs: DocumentSet, client_session: AsyncClientSession | None, session_id: str
) -> bool:
    return bool(await docs.sessions.find({"_id": session_id}, session=client_session).count())


async def write_file_record(
    docs: DocumentSet, client_session: AsyncClientSession | None, record: UploadedFileRecord
) -> None:
    fields = document_from_file_record(record)
    del fields["_id"]
    await docs.files.find_one({"_id": record.file_id}, session=client_session).update(
        {"$set": fields}, session=client_session, upsert=True
    )


async def read_file_record(
    docs: DocumentSet, client_session: AsyncClientSession | None, file_id: str
) -> UploadedFileRecord | None:
    view = await docs.files.find_one(
        {"_id": file_id}, projection_model=FileRecordView, session=client_session
    )
    return None if view is None else file_record_from_view(view)


async def read_file_records(
    docs: DocumentSet, client_session: AsyncClientSession | None, file_ids: Sequence[str]
) -> list[UploadedFileRecord]:
    """Returns the file records among `file_ids` that exist, in the order of `file_ids`."""
    found: dict[str, UploadedFileRecord] = {}
    for chunk in _chunks(list(file_ids)):
        views = await docs.files.find(
            {"_id": {"$in": list(chunk)}}, projection_model=FileRecordView, session=client_session
        ).to_list()
        found.update({view.file_id: file_record_from_view(view) for view in views})
    return [found[file_id] for file_id in file_ids if file_id in found]


async def read_file_records_page(
    docs: DocumentSet, client_session: AsyncClientSession | None, limit: int
) -> list[UploadedFileRecord]:
    if limit == 0:
        return []
    views = await docs.files.find(
        {},
        projection_model=FileRecordView,
        sort=_NEWEST_UPLOADED,
        limit=limit,
        session=client_session,
    ).to_list()
    return [file_record_from_view(view) for view in views]


async def read_file_records_after(
    docs: DocumentSet, client_session: AsyncClientSession | None, after: str | None, limit: int
) -> list[UploadedFileRecord]:
    query: dict[str, Any] = {} if after is None else {"_id": {"$gt": after}}
    views = await docs.files.find(
        query,
        projection_model=FileRecordView,
        sort=_BY_ID,
        limit=limit,
        session=client_session,
    ).to_list()
    return [file_record_from_view(view) for view in views]


async def delete_file_document(
    docs: DocumentSet, client_session: AsyncClientSession | None, file_id: str
) -> bool:
    result = await docs.files.find_one({"_id": file_id}, session=client_session).delete_one(
        session=client_session
    )
    return bool(result is not None and result.deleted_count)


async def file_exists(
    docs: DocumentSet, client_session: AsyncClientSession | None, file_id: str
) -> bool:
    return bool(await docs.files.find({"_id": file_id}, session=client_session).count())


async def delete_files_expired_by(
    docs: DocumentSet, client_session: AsyncClientSession | None, now: datetime
) -> int:
    result = await docs.files.find(
        {"expires_at": {"$lte": now}}, session=client_session
    ).delete_many(session=client_session)
    return 0 if result is None else int(result.deleted_count)


def count_pipelines(now: datetime) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The two aggregations of `count`: sessions by status with their messages, and files."""
    sessions = [
        {
            "$group": {
                "_id": "$status",
                "sessions": {"$sum": 1},
                "messages": {"$sum": "$message_count"},
            }
        }
    ]
    files = [
        {
            "$group": {
                "_id": None,
                "files": {"$sum": 1},
                "expired": {"$sum": {"$cond": [{"$lte": ["$expires_at", now]}, 1, 0]}},
            }
        }
    ]
    return sessions, files


async def count_store(
    docs: DocumentSet, client_session: AsyncClientSession | None, now: datetime
) -> StorageCounts:
    """Counts inside the server; `message_count` equals the messages stored."""
    session_pipeline, file_pipeline = count_pipelines(now)
    by_status: dict[str, int] = {}
    messages = 0
    for row in await docs.sessions.aggregate(session_pipeline, session=client_session).to_list():
        by_status[str(row["_id"])] = int(row["sessions"])
        messages += int(row["messages"])
    file_rows = await docs.files.aggregate(file_pipeline, session=client_session).to_list()
    files, expired = (
        (int(file_rows[0]["files"]), int(file_rows[0]["expired"])) if file_rows else (0, 0)
    )
    return StorageCounts(
        sessions_by_status={status: by_status.get(status, 0) for status in STATUSES},
        messages=messages,
        files=files,
        expired_files=expired,
    )


async def count_sessions_by_status(
    docs: DocumentSet, client_session: AsyncClientSession | None
) -> dict[str, int]:
    """Sessions per status, one `count_documents` each: counted on the status index."""
    collection = docs.sessions.get_pymongo_collection()
    return {
        status: int(await collection.count_documents({"status": status}, session=client_session))
        for status in STATUSES
    }


def _modified(result: object) -> int:
    return int(result.modified_count) if isinstance(result, UpdateResult) else 0


async def expire_sessions_before(
    docs: DocumentSet, client_session: AsyncClientSession | None, cutoff: datetime
) -> int:
    result = await docs.sessions.find(
        {"status": "active", "updated_at": {"$lt": cutoff}}, session=client_session
    ).update_many({"$set": {"status": "expired"}}, session=client_session)
    return _modified(result)


async def set_sessions_status(
    docs: DocumentSet,
    client_session: AsyncClientSession | None,
    session_ids: Sequence[str],
    status: Status,
) -> int:
    changed = 0
    for chunk in _chunks(list(session_ids)):
        result = await docs.sessions.find(
            {"_id": {"$in": list(chunk)}, "status": {"$ne": status}}, session=client_session
        ).update_many({"$set": {"status": status}}, session=client_session)
        changed += _modified(result)
    return changed


def text_search(words: Sequence[str]) -> str:
    """Quotes every word, so the text index ANDs them and nothing is query syntax."""
    return " ".join(f'"{word}"' for word in words)


def word_pattern(word: str) -> str:
    """A case-insensitive PCRE for `word` as a whole word (`word` is \\w+ only)."""
    return f"(?<!{_WORD_CHAR}){re.escape(word)}(?!{_WORD_CHAR})"


def search_pipeline(words: Sequence[str], limit: int) -> list[dict[str, Any]]:
    """Stages after the `$text` match: the messages holding every word, newest first.

    The text index finds the sessions; it matches whole documents, so every message
    of those sessions is checked again on the server, word by word.
    """
    return [
        {"$project": {"messages": 1}},
        {"$unwind": {"path": "$messages", "includeArrayIndex": "position"}},
        {
            "$match": {
                "$and": [
                    {"messages.content": {"$regex": word_pattern(word), "$options": "i"}}
                    for word in words
                ]
            }
        },
        {"$sort": {"messages.created_at": -1, "messages.seq": -1, "position": -1}},
        {"$limit": limit},
    ]


async def search_messages(
    docs: DocumentSet, client_session: AsyncClientSession | None, query: str, limit: int
) -> list[ChatMessage]:
    words = list(dict.fromkeys(search_words(query)))
    if not words or limit <= 0 or any(len(word) > MAX_WORD_LENGTH for word in words):
        return []
    rows = (
        await docs.sessions.find({"$text": {"$search": text_search(words)}}, session=client_session)
        .aggregate(search_pipeline(words, limit), session=client_session)
        .to_list()
    )
    return [
        message_from_document(row["_id"], MessageDocument.model_validate(row["messages"]))
        for row in rows
    ]
