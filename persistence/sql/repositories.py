"""Reads and writes of sessions, messages and file records, written once for both dialects.

Each function returns a Work generator: it yields Core statements (statements.py) with
their parameters and receives the results, and runner.py drives it on SQLite, on
PostgreSQL, or inside a unit of work. A plain save and a unit of work therefore run
exactly the same statements.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime
from operator import itemgetter
from typing import Any, cast

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Integer,
    String,
    Table,
    and_,
    bindparam,
    case,
    delete,
    func,
    literal_column,
    null,
    or_,
    select,
    true,
    union_all,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.sql import ColumnElement

from persistence.garbage_collection import collection_paused
from persistence.models import STATUSES, ChatMessage, ChatSession, Status, UploadedFileRecord
from persistence.search import parse_query
from persistence.sql.code_point_order import code_point_order
from persistence.sql.mapping import (
    FILE_COLUMNS,
    HISTORY_COLUMNS,
    MESSAGE_COLUMNS,
    SESSION_COLUMNS,
    SESSION_METADATA_TEXT,
    file_record_from_row,
    history_from_rows,
    messages_from_rows,
    row_from_file_record,
    session_from_row,
)
from persistence.sql.runner import Execute, Fetch, Work
from persistence.sql.search import Found, find_messages
from persistence.sql.statements import Statement
from persistence.sql.tables import FileRow, MessageRow, SessionCountRow, SessionRow
from persistence.sql.types import UtcDateTime
from persistence.sql.write_statements import chunks, deletions
from persistence.storage import StorageCounts

sessions = cast(Table, SessionRow.__table__)
messages = cast(Table, MessageRow.__table__)
files = cast(Table, FileRow.__table__)
session_counts = cast(Table, SessionCountRow.__table__)


def _binds(table: Table, *names: str) -> dict[str, Any]:
    return {name: bindparam(name, type_=table.c[name].type) for name in names}


def _upsert(table: Table, key: str, *, update: bool = True) -> Statement:
    """INSERT ... ON CONFLICT DO UPDATE (without `update`: DO NOTHING): the same SQL on
    SQLite and PostgreSQL."""
    names = [column.name for column in table.columns if column.name != "id"]

    def build(dialect: str) -> Any:
        statement = (postgresql.insert if dialect == "postgresql" else sqlite.insert)(table)
        statement = statement.values(_binds(table, *names))
        if not update:
            return statement.on_conflict_do_nothing(index_elements=[table.c[key]])
        updates = {name: statement.excluded[name] for name in names if name != key}
        return statement.on_conflict_do_update(index_elements=[table.c[key]], set_=updates)

    return Statement(build)


SELECT_SESSION = Statement(
    select(*SESSION_COLUMNS).where(sessions.c.session_id == bindparam("session_id"))
)
SELECT_MESSAGES = Statement(
    select(*HISTORY_COLUMNS)
    .where(messages.c.session_id == bindparam("session_id"))
    .order_by(messages.c.position)
)
# The newest `last`, newest first (read backwards through the (session_id, position) index).
SELECT_NEWEST_MESSAGES = Statement(
    select(*HISTORY_COLUMNS)
    .where(messages.c.session_id == bindparam("session_id"))
    .order_by(messages.c.position.desc())
    .limit(bindparam("last"))
)


def _session_with_history(newest: bool, bounded: bool = False) -> Any:
    """PostgreSQL: a session's row and its history (the newest :last with `newest`) as
    one statement, so one snapshot without a transaction around it: 4 round trips a
    load became 1. The messages come first by position, in HISTORY_COLUMNS' places;
    the session's row comes last (its NULL position sorts last) and carries its columns
    in the places whose types match (_SESSION_IN_UNION). `bounded`: the newest are
    looked for from _NEWEST_LOWEST_POSITION up.
    """
    history = select(
        *HISTORY_COLUMNS,
        # Labelled: a subquery (`newest`) would take unnamed columns for one.
        null().cast(DateTime(timezone=True)).label("updated_at"),
        null().cast(Integer).label("message_count"),
        null().cast(BigInteger).label("revision"),
        null().cast(String).label("incarnation"),
        null().cast(BigInteger).label("next_position"),
        messages.c.position.label("sort_position"),
    ).where(messages.c.session_id == bindparam("session_id"))
    if newest:
        if bounded:
            history = history.where(messages.c.position >= _NEWEST_LOWEST_POSITION)
        newest_first = (
            history.order_by(messages.c.position.desc()).limit(bindparam("last")).subquery()
        )
        history = select(*newest_first.c)
    session = select(*_SESSION_IN_UNION, null().cast(BigInteger)).where(
        sessions.c.session_id == bindparam("session_id")
    )
    return union_all(history, session).order_by(literal_column("sort_position"))


# The session's columns in the union's places, each of the type of the history's there.
_SESSION_IN_UNION = (
    sessions.c.session_id,
    sessions.c.model,
    SESSION_METADATA_TEXT,
    sessions.c.created_at,
    sessions.c.status,
    sessions.c.updated_at,
    sessions.c.message_count,
    sessions.c.revision,
    sessions.c.incarnation,
    sessions.c.next_position,
)
# The newest :last of a session lie at positions of at least message_count - :last:
# its positions are distinct and never negative, so at most message_count - :last of
# them lie below. With that bound a partial load reads about :last rows whatever the
# plan. Without it, on statistics from before a session grew (ANALYZE comes after a
# tenth of the table has changed), PostgreSQL took a long session for a few rows and
# read and sorted all of it: 13.5-14.2 ms for the newest 20 of 10,000 messages instead
# of 1.0-1.2 (scripts/measure_newest_messages.py).
_NEWEST_LOWEST_POSITION = (
    select(sessions.c.message_count - bindparam("last"))
    .where(sessions.c.session_id == bindparam("session_id"))
    .scalar_subquery()
)
SELECT_SESSION_WITH_HISTORY = Statement(_session_with_history(newest=False))
SELECT_SESSION_WITH_NEWEST = Statement(_session_with_history(newest=True, bounded=True))
# The same without the bound, for a session whose rows break its premise (written
# around this library: a negative position, a count larger than its messages).
SELECT_SESSION_WITH_NEWEST_ANYWHERE = Statement(_session_with_history(newest=True))
_UNION_KEYS = [placed.key for placed in _SESSION_IN_UNION]
_UNION_MESSAGE_COUNT = _UNION_KEYS.index("message_count")
# The session's row of those statements, reordered as SESSION_COLUMNS.
_session_row_of_union = itemgetter(*(_UNION_KEYS.index(column.key) for column in SESSION_COLUMNS))


def _listed(column: ColumnElement[str]) -> ColumnElement[bool]:
    """SQLite: `column` is one of :ids, a JSON array bound as one parameter, read by
    json_each; each id is looked up through the column's index.

    An expanding `IN (...)` bound a parameter per id: its SQL was rendered again on
    every call and had to go in chunks of IN_CHUNK, a statement each.
    """
    listed = func.json_each(bindparam("ids", type_=JSON())).table_valued("value")
    return column.in_(select(listed.c.value))


def _ids_array() -> Any:
    """PostgreSQL: :ids as rows, one text array bound as one parameter (cast to unbounded
    text: VARCHAR(255)[] would cut a longer id to one that may exist)."""
    return func.unnest(bindparam("ids", type_=postgresql.ARRAY(String())))


def _sessions_in(dialect: str) -> Any:
    """The rows of the sessions among :ids (in no particular order).

    On PostgreSQL each id is looked up through the primary key, in a LATERAL subquery
    that OFFSET 0 keeps the planner from turning into a join: as a join, or as
    `session_id = ANY(:ids)`, 1,000 ids were planned as a scan of the whole table
    (15-20 ms at 100,000 sessions, growing with the store) instead of 1,000 lookups
    (about 5 ms whatever its size).
    """
    if dialect != "postgresql":
        return select(*SESSION_COLUMNS).where(_listed(sessions.c.session_id))
    ids = _ids_array().table_valued("id").render_derived(name="ids")
    found = (
        select(*SESSION_COLUMNS)
        .where(sessions.c.session_id == ids.c.id)
        .offset(literal_column("0"))
        .lateral("s")
    )
    return select(*found.c).select_from(ids.join(found, true()))


SELECT_SESSIONS_IN = Statement(_sessions_in)


def _messages_in(dialect: str) -> Any:
    """The histories of many sessions, each in order, through the (session_id, position) index.

    On PostgreSQL `session_id IN (...)` is planned as a scan of the whole messages
    table once the list is long (1,000 ids: 15 ms at 100k messages, growing with the
    table, with or without statistics); a join from the unnested ids walks the index
    once per id (3.5 ms) whatever the statistics say.
    """
    if dialect != "postgresql":
        return (
            select(*MESSAGE_COLUMNS)
            .where(_listed(messages.c.session_id))
            .order_by(messages.c.session_id, messages.c.position)
        )
    ids = _ids_array().table_valued("id", with_ordinality="ord").render_derived(name="ids")
    return (
        select(*MESSAGE_COLUMNS)
        .select_from(ids.join(messages, messages.c.session_id == ids.c.id))
        .order_by(ids.c.ord, messages.c.position)
    )


SELECT_MESSAGES_IN = Statement(_messages_in)
_NEWEST_FIRST = (sessions.c.updated_at.desc(), code_point_order(sessions.c.session_id).desc())
# The page after a session listed before (keyset): what follows it in the page order.
# The bound on updated_at alone comes first, so that the index seeks to it: with only
# the OR, both engines walked the index from the newest session (a page at 99,000 of
# 100,000 took 10.7 ms on SQLite and 9.6 ms on PostgreSQL).
_AFTER_UPDATED = bindparam("after_updated", type_=UtcDateTime)
_FOLLOWING = and_(
    sessions.c.updated_at <= _AFTER_UPDATED,
    or_(
        sessions.c.updated_at < _AFTER_UPDATED,
        code_point_order(sessions.c.session_id) < bindparam("after_id"),
    ),
)
_WITH_STATUS = sessions.c.status == bindparam("status")


def _session_page(*conditions: ColumnElement[bool]) -> Statement:
    """A page of the sessions matching `conditions`, newest first."""
    return Statement(
        select(*SESSION_COLUMNS)
        .where(*conditions)
        .order_by(*_NEWEST_FIRST)
        .limit(bindparam("limit"))
        .offset(bindparam("offset"))
    )


# By (a status asked, after a session).
SESSION_PAGES = {
    (False, False): _session_page(),
    (True, False): _session_page(_WITH_STATUS),
    (False, True): _session_page(_FOLLOWING),
    (True, True): _session_page(_WITH_STATUS, _FOLLOWING),
}
SESSION_PAGE = SESSION_PAGES[False, False]
SESSION_IDS_AFTER = Statement(
    select(sessions.c.session_id)
    .where(sessions.c.session_id > bindparam("after"))
    .order_by(sessions.c.session_id)
    .limit(bindparam("limit"))
)
DELETE_SESSION = Statement(delete(sessions).where(sessions.c.session_id == bindparam("session_id")))


def _in_id_order(*conditions: Any) -> Any:
    """The sessions matching `conditions`, locked in session id order (PostgreSQL; SQLite
    has one writer at a time and no row locks): a statement changing many sessions
    locks them as every other such statement does. Found by attack: expiry sweeps
    (in updated_at order) and status changes (in id order) beside each other
    deadlocked, each holding rows the other wanted."""
    chosen = select(sessions.c.session_id).where(*conditions).order_by(sessions.c.session_id)
    return sessions.c.session_id.in_(chosen.with_for_update())


_EXPIRED = (sessions.c.status == "active", sessions.c.updated_at < bindparam("cutoff"))
EXPIRE_SESSIONS = Statement(
    update(sessions)
    .where(_in_id_order(*_EXPIRED), *_EXPIRED)
    .values(status="expired", revision=sessions.c.revision + 1)
)
FORGET_DELETIONS = Statement(
    delete(deletions).where(deletions.c.deleted_at < bindparam("cutoff", type_=UtcDateTime))
)
_CHANGED_STATUS = (
    sessions.c.session_id.in_(bindparam("ids", expanding=True)),
    sessions.c.status != bindparam("status"),
)
SET_STATUS = Statement(
    update(sessions)
    .where(_in_id_order(*_CHANGED_STATUS), *_CHANGED_STATUS)
    .values(status=bindparam("status"), revision=sessions.c.revision + 1)
)
# Kept by triggers (revision 0004): a few rows to sum, whatever the size of the store.
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
INSERT_ABSENT_FILE = _upsert(files, "file_id", update=False)
SESSION_INCARNATION = Statement(
    select(sessions.c.incarnation).where(sessions.c.session_id == bindparam("session_id"))
)
SELECT_FILE = Statement(select(*FILE_COLUMNS).where(files.c.file_id == bindparam("file_id")))
SELECT_FILES_IN = Statement(
    select(*FILE_COLUMNS).where(files.c.file_id.in_(bindparam("ids", expanding=True)))
)
FILE_PAGE = Statement(
    select(*FILE_COLUMNS)
    .order_by(files.c.uploaded_at.desc(), code_point_order(files.c.file_id).desc())
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


def read_session(session_id: str, token: str, last: int | None) -> Work[ChatSession | None]:
    rows = yield Fetch(SELECT_SESSION, {"session_id": session_id})
    if not rows:
        return None
    if last is None:
        history = yield Fetch(SELECT_MESSAGES, {"session_id": session_id})
        return session_from_row(rows[0], history_from_rows(session_id, history), token)
    newest = yield Fetch(SELECT_NEWEST_MESSAGES, {"session_id": session_id, "last": last})
    return session_from_row(rows[0], history_from_rows(session_id, reversed(newest)), token)


def read_session_in_one_statement(
    session_id: str, token: str, last: int | None
) -> Work[ChatSession | None]:
    """read_session on PostgreSQL, as one statement (run it without a transaction)."""
    if last is None:
        rows = yield Fetch(SELECT_SESSION_WITH_HISTORY, {"session_id": session_id})
    else:
        params = {"session_id": session_id, "last": last}
        rows = yield Fetch(SELECT_SESSION_WITH_NEWEST, params)
        if rows and len(rows) - 1 < min(last, rows[-1][_UNION_MESSAGE_COUNT]):
            rows = yield Fetch(SELECT_SESSION_WITH_NEWEST_ANYWHERE, params)
    # A message's session always exists (the foreign key): no rows, no session.
    if not rows:
        return None
    history = history_from_rows(session_id, rows[:-1])
    return session_from_row(_session_row_of_union(rows[-1]), history, token)


def read_sessions(
    session_ids: Sequence[str], token: str, with_messages: bool = True
) -> Work[list[ChatSession]]:
    """Returns the sessions that exist, in the order of `session_ids`."""
    ids = list(session_ids)
    if not ids:
        return []
    found = {row[0]: row for row in (yield Fetch(SELECT_SESSIONS_IN, {"ids": ids}))}
    history: dict[str, list[ChatMessage]] = {}
    if with_messages and found:
        for message in messages_from_rows((yield Fetch(SELECT_MESSAGES_IN, {"ids": ids}))):
            history.setdefault(message.session_id, []).append(message)
    with collection_paused():
        return [
            session_from_row(found[sid], history.get(sid, []) if with_messages else None, token)
            for sid in ids
            if sid in found
        ]


def read_session_page(
    status: Status | None,
    limit: int,
    offset: int,
    token: str,
    after: tuple[datetime, str] | None = None,
) -> Work[list[ChatSession]]:
    """A page newest first; with `after` (updated_at, session_id), of those after it."""
    params: dict[str, Any] = {"limit": limit, "offset": offset}
    if status is not None:
        params["status"] = status
    if after is not None:
        params["after_updated"], params["after_id"] = after
    rows = yield Fetch(SESSION_PAGES[status is not None, after is not None], params)
    return [session_from_row(row, None, token) for row in rows]


def read_session_batch(
    after: str, limit: int, with_messages: bool, token: str
) -> Work[tuple[list[str], list[ChatSession]]]:
    """The next `limit` sessions in session_id order after `after` ("" for the first)."""
    rows = yield Fetch(SESSION_IDS_AFTER, {"after": after, "limit": limit})
    ids = [row[0] for row in rows]
    batch = yield from read_sessions(ids, token, with_messages)
    return ids, batch


def delete_session(session_id: str) -> Work[bool]:
    # Messages go by ON DELETE CASCADE (foreign keys are on in every SQLite connection).
    return bool((yield Execute(DELETE_SESSION, {"session_id": session_id})))


def write_file_record(record: UploadedFileRecord) -> Work[None]:
    yield Execute(UPSERT_FILE, row_from_file_record(record))


def insert_absent_file_records(records: Sequence[UploadedFileRecord]) -> Work[list[str]]:
    """Inserts the records whose file id is not stored; returns the ids inserted."""
    inserted = []
    for record in records:
        if (yield Execute(INSERT_ABSENT_FILE, row_from_file_record(record))):
            inserted.append(record.file_id)
    return inserted


def read_file_record(file_id: str) -> Work[UploadedFileRecord | None]:
    rows = yield Fetch(SELECT_FILE, {"file_id": file_id})
    return file_record_from_row(rows[0]) if rows else None


def read_file_records(file_ids: Sequence[str]) -> Work[list[UploadedFileRecord]]:
    """Returns the file records among `file_ids` that exist, in the order of `file_ids`."""
    found: dict[str, UploadedFileRecord] = {}
    for chunk in chunks(list(file_ids)):
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


def forget_deletions_before(cutoff: datetime) -> Work[int]:
    return int((yield Execute(FORGET_DELETIONS, {"cutoff": cutoff})))


def set_sessions_status(session_ids: Sequence[str], status: Status) -> Work[int]:
    changed = 0
    for chunk in chunks(list(session_ids)):
        changed += yield Execute(SET_STATUS, {"ids": list(chunk), "status": status})
    return changed


def search_messages(
    query: str,
    limit: int,
    session_id: str | None,
    role: str | None,
    *,
    may_index: bool,
    top: int,
    incarnation: bool = False,
) -> Work[Found | None]:
    """The newest `limit` messages matching `query` (persistence.search) whose stored-order
    key is at most `top`, newest first (None: index the pending messages first; see
    find_messages). With `incarnation`, Found.incarnation is that of the session
    `session_id` (None: no such session), read first: in a snapshot, the messages'."""
    held = None
    if incarnation and session_id is not None:
        rows = yield Fetch(SESSION_INCARNATION, {"session_id": session_id})
        held = str(rows[0][0]) if rows else None
    parsed = parse_query(query)
    if parsed is None or limit <= 0:
        return Found([], 0, incarnation=held)
    found = yield from find_messages(parsed, limit, session_id, role, may_index=may_index, top=top)
    return None if found is None else replace(found, incarnation=held)
