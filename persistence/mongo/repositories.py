"""Reads and writes of sessions and file records through Beanie queries.

Every function takes the `AsyncClientSession` of the caller (None outside a unit of
work) and passes it to every Beanie call, so a plain save and a unit of work send
exactly the same commands. A save of a session is writes.py's; every session read
here carries the bookkeeping of storage `token`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from beanie import SortDirection
from beanie.odm.utils.projection import get_projection
from pymongo import UpdateOne
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.results import UpdateResult

from persistence.models import STATUSES, ChatMessage, ChatSession, Status, UploadedFileRecord
from persistence.mongo.deletions import record_deletion
from persistence.mongo.documents import (
    LEGACY_INCARNATION,
    LEGACY_REVISION,
    DocumentSet,
    FileRecordView,
    MessageDocument,
    SessionSummary,
    SessionView,
)
from persistence.mongo.mapping import (
    document_from_file_record,
    file_record_from_view,
    message_from_document,
    session_from_view,
)
from persistence.search import SearchQuery, parse_query
from persistence.storage import LARGEST_COUNT, StorageCounts

# Ids per `$in`: commands stay far below the 16 MiB message limit.
_IN_CHUNK = 1000
# Above every character: `word` <= t < word + _LAST is "t begins with word".
_LAST = "\U0010ffff"
# The server refuses regular expressions longer than 16,384 bytes of UTF-8 (32,764 before
# 6.0). A query word's pattern is the word itself (re.escape leaves letters, marks and
# digits as they are), and parse_query refuses words of more than MAX_QUERY_BYTES.
MAX_PATTERN_BYTES = 16_000
# Stored order, newest first, as the SQL backends' row ids give it. Found by review: the
# messages were sorted by `created_at` first, the time `add_message` ran, not the save:
# a session saved after another, its messages made before the other's, came out behind
# them, and a search's limit kept other messages than on SQL. `seq` is drawn when a
# write is sent (sequence.next_seq: above the one before in this process), so one
# process's saves sort as they were stored; two processes' saves within one second, by
# process.
_NEWEST_MESSAGES = {"messages.seq": -1, "position": -1}
_NEWEST_UPDATED = [("updated_at", SortDirection.DESCENDING), ("_id", SortDirection.DESCENDING)]
_NEWEST_UPLOADED = [("uploaded_at", SortDirection.DESCENDING), ("_id", SortDirection.DESCENDING)]
_BY_ID = [("_id", SortDirection.ASCENDING)]
# The server reads `$slice` as a 32-bit int: a larger count, sent as a 64-bit one, kept
# only its low 32 bits (found by review: `last=2**32 - 1` gave the oldest message, which
# a pop then deleted). No session holds more messages than this.
_MAX_SLICE = 2**31 - 1


def _chunks(items: Sequence[str]) -> list[Sequence[str]]:
    return [items[i : i + _IN_CHUNK] for i in range(0, len(items), _IN_CHUNK)]


# The newest `last` messages only: `$slice` keeps a partial load flat in history length.
_SUMMARY_PROJECTION = get_projection(SessionSummary)


def newest_messages_projection(last: int) -> dict[str, Any]:
    """A session's summary and its newest `last` messages (`last` > 0)."""
    return {**(_SUMMARY_PROJECTION or {}), "messages": {"$slice": -min(last, _MAX_SLICE)}}


def page_limit(limit: int, offset: int) -> int:
    """The limit a page is asked with: mongos refuses a skip and limit whose sum passes a
    64-bit int (found by review), and no page reaches past the last possible row."""
    return min(limit, LARGEST_COUNT - offset)


async def read_session(
    docs: DocumentSet,
    client_session: AsyncClientSession | None,
    session_id: str,
    *,
    token: str,
    last: int | None = None,
) -> ChatSession | None:
    view: SessionSummary | None
    if last is None:
        view = await docs.sessions.find_one(
            {"_id": session_id}, projection_model=SessionView, session=client_session
        )
    elif last == 0:
        view = await docs.sessions.find_one(
            {"_id": session_id}, projection_model=SessionSummary, session=client_session
        )
    else:
        row = await docs.sessions.get_pymongo_collection().find_one(
            {"_id": session_id},
            newest_messages_projection(last),
            session=client_session,
        )
        view = None if row is None else SessionView.model_validate(row)
    return None if view is None else session_from_view(view, token)


async def read_sessions(
    docs: DocumentSet,
    client_session: AsyncClientSession | None,
    session_ids: Sequence[str],
    *,
    token: str,
    with_messages: bool = True,
) -> list[ChatSession]:
    """Returns the sessions that exist, in the order of `session_ids`."""
    model = SessionView if with_messages else SessionSummary
    found: dict[str, ChatSession] = {}
    for chunk in _chunks(list(session_ids)):
        views = await docs.sessions.find(
            {"_id": {"$in": list(chunk)}}, projection_model=model, session=client_session
        ).to_list()
        found.update({view.session_id: session_from_view(view, token) for view in views})
    return [found[sid] for sid in session_ids if sid in found]


async def read_session_page(
    docs: DocumentSet,
    client_session: AsyncClientSession | None,
    status: Status | None,
    limit: int,
    offset: int,
    *,
    token: str,
    after: tuple[datetime, str] | None = None,
) -> list[ChatSession]:
    limit = page_limit(limit, offset)
    if limit == 0:
        return []
    query: dict[str, Any] = {} if status is None else {"status": status}
    if after is not None:
        # What follows `after` in the page order. Strings compare by their UTF-8
        # bytes, in code point order, as on SQL.
        updated, session_id = after
        query["$or"] = [
            {"updated_at": {"$lt": updated}},
            {"updated_at": updated, "_id": {"$lt": session_id}},
        ]
    views = await docs.sessions.find(
        query,
        projection_model=SessionSummary,
        sort=_NEWEST_UPDATED,
        skip=offset,
        limit=limit,
        session=client_session,
    ).to_list()
    return [session_from_view(view, token) for view in views]


async def read_session_batch_after(
    docs: DocumentSet,
    client_session: AsyncClientSession | None,
    after: str | None,
    limit: int,
    *,
    token: str,
    with_messages: bool,
) -> list[ChatSession]:
    """The next `limit` sessions in `_id` order after `after` (keyset paging)."""
    query: dict[str, Any] = {} if after is None else {"_id": {"$gt": after}}
    model = SessionView if with_messages else SessionSummary
    views = await docs.sessions.find(
        query, projection_model=model, sort=_BY_ID, limit=limit, session=client_session
    ).to_list()
    return [session_from_view(view, token) for view in views]


async def delete_session_document(
    docs: DocumentSet, client_session: AsyncClientSession | None, session_id: str
) -> bool:
    """Deletes the session's document, its incarnation recorded first
    (persistence.mongo.deletions); False if there is none."""
    sessions = docs.sessions.get_pymongo_collection()
    row = await sessions.find_one({"_id": session_id}, {"incarnation": 1}, session=client_session)
    if row is None:
        return False
    incarnation = row.get("incarnation", LEGACY_INCARNATION)
    query: dict[str, Any] = {"_id": session_id}
    if incarnation != LEGACY_INCARNATION:
        await record_deletion(docs, client_session, session_id, incarnation)
        # Only the incarnation recorded: one created meanwhile is another session.
        query["incarnation"] = incarnation
    result = await sessions.delete_one(query, session=client_session)
    return bool(result.deleted_count)


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


async def insert_absent_file_records(
    docs: DocumentSet,
    client_session: AsyncClientSession | None,
    records: Sequence[UploadedFileRecord],
) -> list[str]:
    """Inserts the records whose file id is not stored (an upsert that sets its fields
    only on insert, `$setOnInsert`); returns the ids inserted, from the bulk write's
    `upserted_ids` (operation index -> _id)."""
    operations = []
    for record in records:
        fields = document_from_file_record(record)
        del fields["_id"]
        operations.append(UpdateOne({"_id": record.file_id}, {"$setOnInsert": fields}, upsert=True))
    if not operations:
        return []
    result = await docs.files.get_pymongo_collection().bulk_write(
        operations, ordered=True, session=client_session
    )
    return [records[index].file_id for index in sorted(result.upserted_ids or {})]


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


def status_update(status: Status) -> list[dict[str, Any]]:
    """Sets the status as a write of its own: the revision moves, so holders notice.

    A document written before revisions goes from revision 1 to 2 and gets the fixed
    incarnation it was read with.
    """
    return [
        {
            "$set": {
                "status": {"$literal": status},
                "revision": {"$add": [{"$ifNull": ["$revision", LEGACY_REVISION]}, 1]},
                "incarnation": {"$ifNull": ["$incarnation", LEGACY_INCARNATION]},
            }
        }
    ]


async def expire_sessions_before(
    docs: DocumentSet, client_session: AsyncClientSession | None, cutoff: datetime
) -> int:
    result = await docs.sessions.get_pymongo_collection().update_many(
        {"status": "active", "updated_at": {"$lt": cutoff}},
        status_update("expired"),
        session=client_session,
    )
    return _modified(result)


async def set_sessions_status(
    docs: DocumentSet,
    client_session: AsyncClientSession | None,
    session_ids: Sequence[str],
    status: Status,
) -> int:
    changed = 0
    for chunk in _chunks(list(session_ids)):
        result = await docs.sessions.get_pymongo_collection().update_many(
            {"_id": {"$in": list(chunk)}, "status": {"$ne": status}},
            status_update(status),
            session=client_session,
        )
        changed += _modified(result)
    return changed


def _begins(word: str) -> dict[str, Any]:
    # A range on one element ($elemMatch), which the multikey index bounds.
    return {"$elemMatch": {"$gte": word, "$lt": word + _LAST}}


def _holds(word: str) -> dict[str, Any]:
    return {"$regex": re.escape(word)}


def session_filter(query: SearchQuery, session_id: str | None) -> dict[str, Any]:
    """Sessions holding every index term of `query`: what the index can find."""
    tokens = "messages.search_tokens"
    terms: list[dict[str, Any]] = [{tokens: _begins(term)} for term in query.prefix_terms]
    terms += [{tokens: term} for term in query.gram_terms]
    found: dict[str, Any] = {"$and": terms}
    if session_id is not None:
        found["_id"] = session_id
    return found


def search_pipeline(
    query: SearchQuery,
    limit: int,
    role: str | None,
    *,
    in_session: bool = False,
    below: Any = None,
) -> list[dict[str, Any]]:
    """Stages after the sessions' match: their messages that match, newest first; in
    one session (`in_session`), by position, as the SQL backends order them. With
    `below`, only those older than it: a `seq` (every session) or a position (one);
    search_key gives the key of a found row.

    Each message is tested against every query word, exactly as the rule says.
    """
    tokens = "messages.search_tokens"
    tests: list[dict[str, Any]] = [
        {tokens: _holds(word.text) if word.anywhere else _begins(word.text)} for word in query.words
    ]
    if role is not None:
        tests.append({"messages.role": role})
    if below is not None:
        tests.append({"position" if in_session else "messages.seq": {"$lt": below}})
    return [
        # The incarnation, read with the messages (one document): search_batches ends a
        # session's batches when it changes.
        {"$project": {"messages": 1, "incarnation": 1}},
        {"$unwind": {"path": "$messages", "includeArrayIndex": "position"}},
        {"$match": {"$and": tests}},
        # Found by review: one session's matches were ordered by time, so messages given
        # older timestamps (an import, a migrate) came out of their places.
        {"$sort": {"position": -1} if in_session else _NEWEST_MESSAGES},
        {"$limit": limit},
        {"$project": {"messages.search_tokens": 0}},
    ]


def search_key(row: dict[str, Any], *, in_session: bool) -> Any:
    """Where a found row stands in stored order: search_pipeline's `below` for the rows
    after it."""
    return row["position"] if in_session else row["messages"]["seq"]


async def search_rows(
    docs: DocumentSet,
    client_session: AsyncClientSession | None,
    parsed: SearchQuery,
    limit: int,
    *,
    session_id: str | None = None,
    role: str | None = None,
    below: Any = None,
) -> list[dict[str, Any]]:
    """The newest `limit` matches of `parsed` older than `below`, as search_pipeline's
    rows."""
    in_session = session_id is not None
    rows: list[dict[str, Any]] = (
        await docs.sessions.find(session_filter(parsed, session_id), session=client_session)
        .aggregate(
            search_pipeline(parsed, limit, role, in_session=in_session, below=below),
            session=client_session,
        )
        .to_list()
    )
    return rows


def found_message(row: dict[str, Any]) -> ChatMessage:
    """The message of a search_pipeline row."""
    return message_from_document(row["_id"], MessageDocument.model_validate(row["messages"]))


async def search_messages(
    docs: DocumentSet,
    client_session: AsyncClientSession | None,
    query: str,
    limit: int,
    *,
    session_id: str | None = None,
    role: str | None = None,
) -> list[ChatMessage]:
    parsed = parse_query(query)
    if parsed is None or limit <= 0:
        return []
    rows = await search_rows(docs, client_session, parsed, limit, session_id=session_id, role=role)
    return [found_message(row) for row in rows]
