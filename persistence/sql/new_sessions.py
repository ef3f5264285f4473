"""Inserting sessions a store does not hold yet: the fast path of migrations and imports.

A whole batch of new sessions and their histories goes in as two multi-row
statements (bulk.py) in one transaction, instead of one save per session.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import cast

from sqlalchemy import Table

from persistence.errors import InvalidDataError
from persistence.models import ChatSession
from persistence.sql.bulk import BulkInsert
from persistence.sql.indexing import documents_now
from persistence.sql.mapping import MessageRows, row_from_session
from persistence.sql.runner import ExecuteMany, Work
from persistence.sql.tables import MessageRow, SessionRow

try:
    from asyncpg.exceptions import UniqueViolationError as _UniqueViolation

    _PG_DUPLICATE: tuple[type[BaseException], ...] = (_UniqueViolation,)
except ImportError:  # asyncpg is the optional postgresql extra
    _PG_DUPLICATE = ()

_SQLITE_DUPLICATE_CODES = frozenset(
    {sqlite3.SQLITE_CONSTRAINT_UNIQUE, sqlite3.SQLITE_CONSTRAINT_PRIMARYKEY}
)

INSERT_SESSIONS = BulkInsert(cast(Table, SessionRow.__table__))
INSERT_MESSAGES = BulkInsert(cast(Table, MessageRow.__table__))


def is_duplicate_key(exc: BaseException) -> bool:
    """Whether `exc`, or the driver error it was translated from, is a unique-key violation."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, sqlite3.IntegrityError):
            return getattr(seen, "sqlite_errorcode", None) in _SQLITE_DUPLICATE_CODES
        if isinstance(seen, _PG_DUPLICATE):
            return True
        seen = getattr(seen, "orig", None) or seen.__cause__
    return False


def check_new_sessions(batch: Sequence[ChatSession]) -> None:
    """Refuses, before any I/O, a batch whose messages could never be stored as given.

    Raises:
        InvalidDataError: if a message names another session, an id repeats, or a
            session was loaded with `last=` (found by attack: stored shortened).
    """
    session_ids: set[str] = set()
    message_ids: set[str] = set()
    for session in batch:
        if session.session_id in session_ids:
            raise InvalidDataError(f"session_id {session.session_id!r} appears twice")
        session_ids.add(session.session_id)
        session.refuse_shortened("bulk insert")
        for message in session.messages:
            if message.session_id != session.session_id:
                raise InvalidDataError(
                    f"message {message.message_id!r} has session_id {message.session_id!r},"
                    f" not {session.session_id!r}"
                )
            if message.message_id in message_ids:
                raise InvalidDataError(f"message_id {message.message_id!r} appears twice")
            message_ids.add(message.message_id)


def insert_new_sessions(batch: Sequence[ChatSession]) -> Work[int]:
    """Inserts sessions the store does not hold, with their histories; returns the messages.

    Each is a new session: revision 1, a fresh incarnation, positions 0..n-1. Two
    statements whatever the size of the batch; a unique-key violation (a session or
    message id the store already holds) aborts the caller's transaction.
    """
    session_rows = []
    for session in batch:
        count = len(session.messages)
        session_rows.append(
            {**row_from_session(session, count), "revision": 1, "next_position": count}
        )
    documents = yield from documents_now()
    message_rows = MessageRows(
        [(session.session_id, session.messages, 0) for session in batch], documents=documents
    )
    if session_rows:
        yield ExecuteMany(INSERT_SESSIONS, session_rows)
    if message_rows:
        yield ExecuteMany(INSERT_MESSAGES, message_rows)
    return len(message_rows)
