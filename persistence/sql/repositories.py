"""Reads and writes of sessions, messages and file records, as Core statements.

Every function takes the connection of the caller's transaction, so a plain save and
a unit of work run exactly the same statements.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Table, case, delete, func, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from persistence.errors import InvalidDataError
from persistence.models import STATUSES, ChatMessage, ChatSession, Status, UploadedFileRecord
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
from persistence.sql.tables import FileRow, MessageRow, SessionRow
from persistence.storage import StorageCounts

sessions = cast(Table, SessionRow.__table__)
messages = cast(Table, MessageRow.__table__)
files = cast(Table, FileRow.__table__)

# Bound parameters per statement stay well under SQLite's and asyncpg's limits.
_IN_CHUNK = 500


def _insert(connection: AsyncConnection, table: Any) -> Any:
    """The dialect's INSERT, which knows ON CONFLICT on both SQLite and PostgreSQL."""
    if connection.dialect.name == "postgresql":
        return postgresql.insert(table)
    return sqlite.insert(table)


def _chunks(items: Sequence[str]) -> list[Sequence[str]]:
    return [items[i : i + _IN_CHUNK] for i in range(0, len(items), _IN_CHUNK)]


async def _upsert_session(connection: AsyncConnection, session: ChatSession, added: int) -> int:
    """Upserts the session row, adds `added` to its count, returns the new count.

    The row lock this takes (PostgreSQL) or the write lock the transaction holds
    (SQLite) serialises writers of one session, so positions never collide.
    """
    statement = _insert(connection, sessions).values(row_from_session(session, added))
    excluded = statement.excluded
    statement = statement.on_conflict_do_update(
        index_elements=[sessions.c.session_id],
        set_={
            "model": excluded.model,
            "created_at": excluded.created_at,
            "updated_at": excluded.updated_at,
            "metadata": excluded.metadata,
            "status": excluded.status,
            "message_count": sessions.c.message_count + excluded.message_count,
        },
    ).returning(sessions.c.message_count)
    return int((await connection.execute(statement)).scalar_one())


async def _messages_not_stored(
    connection: AsyncConnection, session_id: str, candidates: Sequence[ChatMessage]
) -> list[ChatMessage]:
    """Returns the candidates not stored yet.

    Raises:
        InvalidDataError: if a message id is already stored in another session.
    """
    stored: dict[str, str] = {}
    for chunk in _chunks([message.message_id for message in candidates]):
        result = await connection.execute(
            select(messages.c.message_id, messages.c.session_id).where(
                messages.c.message_id.in_(chunk)
            )
        )
        stored.update({row[0]: row[1] for row in result})
    for message_id, owner in stored.items():
        if owner != session_id:
            raise InvalidDataError(
                f"message_id {message_id!r} is already stored in another session ({owner!r})"
            )
    return [message for message in candidates if message.message_id not in stored]


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


async def write_session(connection: AsyncConnection, session: ChatSession, token: str) -> None:
    """Upserts the session and inserts only the messages the store does not hold.

    Raises:
        InvalidDataError: if a message belongs to another session or repeats an id.
    """
    new, certain = session.unstored_messages(token)
    _check_owned(session, new)
    if certain:
        count = await _upsert_session(connection, session, len(new))
        base = count - len(new)
        if base >= len(session.messages) - len(new):
            await _insert_messages(connection, session.session_id, new, base)
            return
        # Fewer rows than this object saw stored: the session was deleted meanwhile,
        # and its earlier messages with it.
        new = session.messages
        _check_owned(session, new)
    else:
        base = await _upsert_session(connection, session, 0)
    new = await _messages_not_stored(connection, session.session_id, new)
    if new:
        await connection.execute(
            update(sessions)
            .where(sessions.c.session_id == session.session_id)
            .values(message_count=base + len(new))
        )
        await _insert_messages(connection, session.session_id, new, base)


async def _insert_messages(
    connection: AsyncConnection, session_id: str, new: Sequence[ChatMessage], first_position: int
) -> None:
    if new:
        await connection.execute(
            insert(messages), rows_from_messages(session_id, new, first_position)
        )


async def read_messages(
    connection: AsyncConnection, session_ids: Sequence[str]
) -> dict[str, list[ChatMessage]]:
    """Returns the messages of the given sessions, each list in stored order."""
    grouped: dict[str, list[ChatMessage]] = {session_id: [] for session_id in session_ids}
    for chunk in _chunks(list(session_ids)):
        result = await connection.execute(
            select(*MESSAGE_COLUMNS)
            .where(messages.c.session_id.in_(chunk))
            .order_by(messages.c.session_id, messages.c.position)
        )
        for row in result:
            grouped[row[1]].append(message_from_row(row))
    return grouped


async def read_session(connection: AsyncConnection, session_id: str) -> ChatSession | None:
    row = (
        await connection.execute(
            select(*SESSION_COLUMNS).where(sessions.c.session_id == session_id)
        )
    ).first()
    if row is None:
        return None
    result = await connection.execute(
        select(*MESSAGE_COLUMNS)
        .where(messages.c.session_id == session_id)
        .order_by(messages.c.position)
    )
    return session_from_row(row, [message_from_row(message) for message in result])


async def read_sessions(
    connection: AsyncConnection, session_ids: Sequence[str], *, with_messages: bool = True
) -> list[ChatSession]:
    """Returns the sessions that exist, in the order of `session_ids`."""
    rows: dict[str, Any] = {}
    for chunk in _chunks(list(session_ids)):
        result = await connection.execute(
            select(*SESSION_COLUMNS).where(sessions.c.session_id.in_(chunk))
        )
        rows.update({row[0]: row for row in result})
    found = [session_id for session_id in session_ids if session_id in rows]
    history = await read_messages(connection, found) if with_messages else {}
    return [session_from_row(rows[sid], history.get(sid, [])) for sid in found]


async def read_session_page(
    connection: AsyncConnection, status: Status | None, limit: int, offset: int
) -> list[ChatSession]:
    statement = select(*SESSION_COLUMNS)
    if status is not None:
        statement = statement.where(sessions.c.status == status)
    statement = (
        statement.order_by(sessions.c.updated_at.desc(), sessions.c.session_id.desc())
        .limit(limit)
        .offset(offset)
    )
    return [session_from_row(row, []) for row in await connection.execute(statement)]


async def read_session_ids_after(
    connection: AsyncConnection, after: str | None, limit: int
) -> list[str]:
    statement = select(sessions.c.session_id).order_by(sessions.c.session_id).limit(limit)
    if after is not None:
        statement = statement.where(sessions.c.session_id > after)
    return list((await connection.execute(statement)).scalars())


async def delete_session_row(connection: AsyncConnection, session_id: str) -> bool:
    # Messages go by ON DELETE CASCADE (foreign keys are on in every SQLite connection).
    result = await connection.execute(delete(sessions).where(sessions.c.session_id == session_id))
    return bool(result.rowcount)


async def write_file_record(connection: AsyncConnection, record: UploadedFileRecord) -> None:
    row = row_from_file_record(record)
    statement = _insert(connection, files).values(row)
    statement = statement.on_conflict_do_update(
        index_elements=[files.c.file_id],
        set_={key: statement.excluded[key] for key in row if key != "file_id"},
    )
    await connection.execute(statement)


async def read_file_record(connection: AsyncConnection, file_id: str) -> UploadedFileRecord | None:
    row = (
        await connection.execute(select(*FILE_COLUMNS).where(files.c.file_id == file_id))
    ).first()
    return None if row is None else file_record_from_row(row)


async def read_file_records_page(
    connection: AsyncConnection, limit: int
) -> list[UploadedFileRecord]:
    result = await connection.execute(
        select(*FILE_COLUMNS)
        .order_by(files.c.uploaded_at.desc(), files.c.file_id.desc())
        .limit(limit)
    )
    return [file_record_from_row(row) for row in result]


async def read_file_records_after(
    connection: AsyncConnection, after: str | None, limit: int
) -> list[UploadedFileRecord]:
    statement = select(*FILE_COLUMNS).order_by(files.c.file_id).limit(limit)
    if after is not None:
        statement = statement.where(files.c.file_id > after)
    return [file_record_from_row(row) for row in await connection.execute(statement)]


async def delete_file_row(connection: AsyncConnection, file_id: str) -> bool:
    result = await connection.execute(delete(files).where(files.c.file_id == file_id))
    return bool(result.rowcount)


async def delete_files_expired_by(connection: AsyncConnection, now: datetime) -> int:
    result = await connection.execute(delete(files).where(files.c.expires_at <= now))
    return int(result.rowcount)


async def count_store(connection: AsyncConnection, now: datetime) -> StorageCounts:
    """Counts sessions by status, messages, files and expired files in the database."""
    by_status = {
        row[0]: int(row[1])
        for row in await connection.execute(
            select(sessions.c.status, func.count()).group_by(sessions.c.status)
        )
    }
    # message_count always equals the rows stored, and summing it reads one row a session.
    message_total = (
        await connection.execute(select(func.coalesce(func.sum(sessions.c.message_count), 0)))
    ).scalar_one()
    expired = case((files.c.expires_at <= now, 1), else_=0)
    file_total, expired_total = (
        await connection.execute(
            select(func.count(), func.coalesce(func.sum(expired), 0)).select_from(files)
        )
    ).one()
    return StorageCounts(
        sessions_by_status={status: by_status.get(status, 0) for status in STATUSES},
        messages=int(message_total),
        files=int(file_total),
        expired_files=int(expired_total),
    )


async def expire_sessions_before(connection: AsyncConnection, cutoff: datetime) -> int:
    result = await connection.execute(
        update(sessions)
        .where(sessions.c.status == "active", sessions.c.updated_at < cutoff)
        .values(status="expired")
    )
    return int(result.rowcount)


async def set_sessions_status(
    connection: AsyncConnection, session_ids: Sequence[str], status: Status
) -> int:
    changed = 0
    for chunk in _chunks(list(session_ids)):
        result = await connection.execute(
            update(sessions)
            .where(sessions.c.session_id.in_(chunk), sessions.c.status != status)
            .values(status=status)
        )
        changed += int(result.rowcount)
    return changed
