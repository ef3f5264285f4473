"""Reads and writes of sessions, messages and file records, written once for both dialects.

Each function returns a Work generator: it yields Core statements (statements.py) with
their parameters and receives the results, and runner.py drives it on SQLite, on
PostgreSQL, or inside a unit of work. A plain save and a unit of work therefore run
exactly the same statements.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Table, bindparam, case, delete, func, select, update
from sqlalchemy.dialects import postgresql, sqlite

from persistence.errors import InvalidDataError
from persistence.models import STATUSES, ChatMessage, ChatSession, Status, UploadedFileRecord
from persistence.sql.bulk import BulkInsert
from persistence.sql.mapping import (
    FILE_COLUMNS,
    MESSAGE_COLUMNS,
    SESSION_COLUMNS,
    file_record_from_row,
    message_from_row,
    row_from_file_record,
    row_from_session,
    rows_from_messages,
    session_from_row,
)
from persistence.sql.runner import Execute, ExecuteMany, Fetch, Work
from persistence.sql.search import search_statement
from persistence.sql.statements import Statement
from persistence.sql.tables import FileRow, MessageRow, SessionCountRow, SessionRow
from persistence.storage import StorageCounts, search_words

sessions = cast(Table, SessionRow.__table__)
messages = cast(Table, MessageRow.__table__)
files = cast(Table, FileRow.__table__)
session_counts = cast(Table, SessionCountRow.__table__)

# Bound parameters per statement stay well under SQLite's and asyncpg's limits.
_IN_CHUNK = 500


def _binds(table: Table, *names: str) -> dict[str, Any]:
    return {name: bindparam(name, type_=table.c[name].type) for name in names}


def _upsert(table: Table, key: str, increment: str | None = None) -> Statement:
    """INSERT ... ON CONFLICT DO UPDATE: the same SQL on SQLite and PostgreSQL."""
    names = [column.name for column in table.columns if column.name != "id"]

    def build(dialect: str) -> Any:
        statement = (postgresql.insert if dialect == "postgresql" else sqlite.insert)(table)
        statement = statement.values(_binds(table, *names))
        updates: dict[str, Any] = {
            name: statement.excluded[name] for name in names if name not in (key, increment)
        }
        if increment is not None:
            updates[increment] = table.c[increment] + statement.excluded[increment]
            return statement.on_conflict_do_update(
                index_elements=[table.c[key]], set_=updates
            ).returning(table.c[increment])
        return statement.on_conflict_do_update(index_elements=[table.c[key]], set_=updates)

    return Statement(build)


def _session_upsert(dialect: str) -> Any:
    names = [c.name for c in sessions.columns if c.name not in ("revision", "next_position")]
    statement = (postgresql.insert if dialect == "postgresql" else sqlite.insert)(sessions)
    statement = statement.values(
        {**_binds(sessions, *names), "revision": 1, "next_position": bindparam("message_count")}
    )
    excluded = statement.excluded
    fields = ("model", "created_at", "updated_at", "metadata", "status")
    return statement.on_conflict_do_update(
        index_elements=[sessions.c.session_id],
        set_={
            **{name: excluded[name] for name in fields},
            "message_count": sessions.c.message_count + excluded.message_count,
            "next_position": sessions.c.next_position + excluded.message_count,
            "revision": sessions.c.revision + 1,
        },
    ).returning(sessions.c.message_count, sessions.c.next_position)


UPSERT_SESSION = Statement(_session_upsert)
# Sent as one multi-row statement however many messages a save carries (bulk.py).
INSERT_MESSAGES = BulkInsert(messages)
ADD_MESSAGE_COUNT = Statement(
    update(sessions)
    .where(sessions.c.session_id == bindparam("session_id"))
    .values(
        message_count=sessions.c.message_count + bindparam("added"),
        next_position=sessions.c.next_position + bindparam("added"),
    )
)
MESSAGE_OWNERS = Statement(
    select(messages.c.message_id, messages.c.session_id).where(
        messages.c.message_id.in_(bindparam("ids", expanding=True))
    )
)
SELECT_SESSION = Statement(
    select(*SESSION_COLUMNS).where(sessions.c.session_id == bindparam("session_id"))
)
SELECT_MESSAGES = Statement(
    select(*MESSAGE_COLUMNS)
    .where(messages.c.session_id == bindparam("session_id"))
    .order_by(messages.c.position)
)
SELECT_SESSIONS_IN = Statement(
    select(*SESSION_COLUMNS).where(sessions.c.session_id.in_(bindparam("ids", expanding=True)))
)
SELECT_MESSAGES_IN = Statement(
    select(*MESSAGE_COLUMNS)
    .where(messages.c.session_id.in_(bindparam("ids", expanding=True)))
    .order_by(messages.c.session_id, messages.c.position)
)
_NEWEST_FIRST = (sessions.c.updated_at.desc(), sessions.c.session_id.desc())
SESSION_PAGE = Statement(
    select(*SESSION_COLUMNS)
    .order_by(*_NEWEST_FIRST)
    .limit(bindparam("limit"))
    .offset(bindparam("offset"))
)
SESSION_PAGE_BY_STATUS = Statement(
    select(*SESSION_COLUMNS)
    .where(sessions.c.status == bindparam("status"))
    .order_by(*_NEWEST_FIRST)
    .limit(bindparam("limit"))
    .offset(bindparam("offset"))
)
SESSION_IDS_AFTER = Statement(
    select(sessions.c.session_id)
    .where(sessions.c.session_id > bindparam("after"))
    .order_by(sessions.c.session_id)
    .limit(bindparam("limit"))
)
DELETE_SESSION = Statement(delete(sessions).where(sessions.c.session_id == bindparam("session_id")))
EXPIRE_SESSIONS = Statement(
    update(sessions)
    .where(sessions.c.status == "active", sessions.c.updated_at < bindparam("cutoff"))
    .values(status="expired")
)
SET_STATUS = Statement(
    update(sessions)
    .where(
        sessions.c.session_id.in_(bindparam("ids", expanding=True)),
        sessions.c.status != bindparam("status"),
    )
    .values(status=bindparam("status"))
)
# Kept by triggers (revision 0003): a few rows to sum, whatever the size of the store.
COUNT_BY_STATUS = Statement(
    select(session_counts.c.status, func.sum(session_counts.c.sessions)).group_by(
        session_counts.c.status
    )
)
# message_count always equals the rows stored, and summing it reads one row a session.
SUM_MESSAGES = Statement(select(func.coalesce(func.sum(sessions.c.message_count), 0)))
COUNT_FILES = Statement(
    select(
        func.count(),
        func.coalesce(func.sum(case((files.c.expires_at <= bindparam("now"), 1), else_=0)), 0),
    ).select_from(files)
)

UPSERT_FILE = _upsert(files, "file_id")
SELECT_FILE = Statement(select(*FILE_COLUMNS).where(files.c.file_id == bindparam("file_id")))
SELECT_FILES_IN = Statement(
    select(*FILE_COLUMNS).where(files.c.file_id.in_(bindparam("ids", expanding=True)))
)
FILE_PAGE = Statement(
    select(*FILE_COLUMNS)
    .order_by(files.c.uploaded_at.desc(), files.c.file_id.desc())
    .limit(bindparam("limit"))
)
FILES_AFTER = Statement(
    select(*FILE_COLUMNS)
    .where(files.c.file_id > bindparam("after"))
    .order_by(files.c.file_id)
    .limit(bindparam("limit"))
)
DELETE_FILE = Statement(delete(files).where(files.c.file_id == bindparam("file_id")))
DELETE_EXPIRED_FILES = Statement(delete(files).where(files.c.expires_at <= bindparam("now")))
SEARCH = Statement(search_statement)


def _chunks(items: Sequence[str]) -> list[Sequence[str]]:
    return [items[i : i + _IN_CHUNK] for i in range(0, len(items), _IN_CHUNK)]


def _check_owned(session: ChatSession, new: Sequence[ChatMessage]) -> None:
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


def _messages_not_stored(
    session_id: str, candidates: Sequence[ChatMessage]
) -> Work[list[ChatMessage]]:
    """Returns the candidates not stored yet.

    Raises:
        InvalidDataError: if a message id is already stored in another session.
    """
    stored: dict[str, str] = {}
    for chunk in _chunks([message.message_id for message in candidates]):
        rows = yield Fetch(MESSAGE_OWNERS, {"ids": list(chunk)})
        stored.update({row[0]: row[1] for row in rows})
    for message_id, owner in stored.items():
        if owner != session_id:
            raise InvalidDataError(
                f"message_id {message_id!r} is already stored in another session ({owner!r})"
            )
    return [message for message in candidates if message.message_id not in stored]


def write_session(session: ChatSession, token: str) -> Work[None]:
    """Upserts the session and inserts only the messages the store does not hold.

    The upsert takes the session row's lock (PostgreSQL) inside a transaction that
    holds the write lock (SQLite), so writers of one session never collide on a
    position, and the stored order is the order in which writes commit.

    The messages to send are taken now, when the work is made: a message appended
    while the save is in flight belongs to the next save, which the caller's
    `mark_stored(token, count)` leaves it to.

    Raises:
        InvalidDataError: if a message belongs to another session or repeats an id.
    """
    messages = list(session.messages)
    new, certain = session.unstored_messages(token)
    _check_owned(session, new)
    return _write_session(session, messages, new, certain)


def _write_session(
    session: ChatSession, messages: list[ChatMessage], new: list[ChatMessage], certain: bool
) -> Work[None]:
    if certain:
        rows = yield Fetch(UPSERT_SESSION, row_from_session(session, len(new)))
        base = rows[0][1] - len(new)
        if rows[0][0] - len(new) >= len(messages) - len(new):
            if new:
                yield ExecuteMany(
                    INSERT_MESSAGES, rows_from_messages(session.session_id, new, base)
                )
            return
        # Fewer rows than this object saw stored: the session was deleted meanwhile,
        # and its earlier messages with it.
        new = messages
        _check_owned(session, new)
    else:
        rows = yield Fetch(UPSERT_SESSION, row_from_session(session, 0))
        base = rows[0][1]
    new = yield from _messages_not_stored(session.session_id, new)
    if new:
        yield Execute(ADD_MESSAGE_COUNT, {"session_id": session.session_id, "added": len(new)})
        yield ExecuteMany(INSERT_MESSAGES, rows_from_messages(session.session_id, new, base))


def read_session(session_id: str) -> Work[ChatSession | None]:
    rows = yield Fetch(SELECT_SESSION, {"session_id": session_id})
    if not rows:
        return None
    history = yield Fetch(SELECT_MESSAGES, {"session_id": session_id})
    return session_from_row(rows[0], [message_from_row(row) for row in history])


def read_sessions(
    session_ids: Sequence[str], with_messages: bool = True
) -> Work[list[ChatSession]]:
    """Returns the sessions that exist, in the order of `session_ids`."""
    found: dict[str, Any] = {}
    history: dict[str, list[ChatMessage]] = {}
    for chunk in _chunks(list(session_ids)):
        for row in (yield Fetch(SELECT_SESSIONS_IN, {"ids": list(chunk)})):
            found[row[0]] = row
        if with_messages:
            for row in (yield Fetch(SELECT_MESSAGES_IN, {"ids": list(chunk)})):
                history.setdefault(row[1], []).append(message_from_row(row))
    return [
        session_from_row(found[sid], history.get(sid, []) if with_messages else None)
        for sid in session_ids
        if sid in found
    ]


def read_session_page(status: Status | None, limit: int, offset: int) -> Work[list[ChatSession]]:
    params: dict[str, Any] = {"limit": limit, "offset": offset}
    if status is None:
        rows = yield Fetch(SESSION_PAGE, params)
    else:
        rows = yield Fetch(SESSION_PAGE_BY_STATUS, {**params, "status": status})
    return [session_from_row(row, None) for row in rows]


def read_session_batch(
    after: str, limit: int, with_messages: bool
) -> Work[tuple[list[str], list[ChatSession]]]:
    """The next `limit` sessions in session_id order after `after` ("" for the first)."""
    rows = yield Fetch(SESSION_IDS_AFTER, {"after": after, "limit": limit})
    ids = [row[0] for row in rows]
    batch = yield from read_sessions(ids, with_messages)
    return ids, batch


def delete_session(session_id: str) -> Work[bool]:
    # Messages go by ON DELETE CASCADE (foreign keys are on in every SQLite connection).
    return bool((yield Execute(DELETE_SESSION, {"session_id": session_id})))


def write_file_record(record: UploadedFileRecord) -> Work[None]:
    yield Execute(UPSERT_FILE, row_from_file_record(record))


def read_file_record(file_id: str) -> Work[UploadedFileRecord | None]:
    rows = yield Fetch(SELECT_FILE, {"file_id": file_id})
    return file_record_from_row(rows[0]) if rows else None


def read_file_records(file_ids: Sequence[str]) -> Work[list[UploadedFileRecord]]:
    """Returns the file records among `file_ids` that exist, in the order of `file_ids`."""
    found: dict[str, UploadedFileRecord] = {}
    for chunk in _chunks(list(file_ids)):
        for row in (yield Fetch(SELECT_FILES_IN, {"ids": list(chunk)})):
            found[row[0]] = file_record_from_row(row)
    return [found[file_id] for file_id in file_ids if file_id in found]


def read_file_record_page(limit: int) -> Work[list[UploadedFileRecord]]:
    rows = yield Fetch(FILE_PAGE, {"limit": limit})
    return [file_record_from_row(row) for row in rows]


def read_file_record_batch(after: str, limit: int) -> Work[list[UploadedFileRecord]]:
    rows = yield Fetch(FILES_AFTER, {"after": after, "limit": limit})
    return [file_record_from_row(row) for row in rows]


def delete_file_record(file_id: str) -> Work[bool]:
    return bool((yield Execute(DELETE_FILE, {"file_id": file_id})))


def delete_files_expired_by(now: datetime) -> Work[int]:
    return int((yield Execute(DELETE_EXPIRED_FILES, {"now": now})))


def count_sessions_by_status() -> Work[dict[str, int]]:
    """Sessions per status (every status present), from the counts the triggers keep."""
    by_status = {row[0]: int(row[1]) for row in (yield Fetch(COUNT_BY_STATUS, {}))}
    return {status: by_status.get(status, 0) for status in STATUSES}


def count_store(now: datetime) -> Work[StorageCounts]:
    """Counts sessions by status, messages, files and expired files in the database."""
    by_status = yield from count_sessions_by_status()
    message_total = (yield Fetch(SUM_MESSAGES, {}))[0][0]
    file_total, expired_total = (yield Fetch(COUNT_FILES, {"now": now}))[0]
    return StorageCounts(
        sessions_by_status=by_status,
        messages=int(message_total),
        files=int(file_total),
        expired_files=int(expired_total),
    )


def expire_sessions_before(cutoff: datetime) -> Work[int]:
    return int((yield Execute(EXPIRE_SESSIONS, {"cutoff": cutoff})))


def set_sessions_status(session_ids: Sequence[str], status: Status) -> Work[int]:
    changed = 0
    for chunk in _chunks(list(session_ids)):
        changed += yield Execute(SET_STATUS, {"ids": list(chunk), "status": status})
    return changed


def search_messages(query: str, limit: int) -> Work[list[ChatMessage]]:
    words = search_words(query)
    if not words or limit <= 0:
        return []
    rows = yield Fetch(SEARCH, {"query": words, "limit": limit})
    return [message_from_row(row) for row in rows]
