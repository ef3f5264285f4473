"""The statements a save sends (writes.py), built once per dialect (statements.py).

Each guards what API.md's "Writes, revisions and conflicts" needs: the session row's
incarnation (a deleted session is never brought back), its revision for a
compare-and-set, and `updated_at` that never moves backwards.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

from sqlalchemy import (
    BigInteger,
    String,
    Table,
    Text,
    bindparam,
    delete,
    func,
    literal_column,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.sql import ColumnElement

from persistence.models import ChatMessage
from persistence.sql.bulk import BulkInsert
from persistence.sql.mapping import SESSION_METADATA_TEXT, rows_from_messages
from persistence.sql.statements import Statement
from persistence.sql.tables import MessageRow, SessionDeletionRow, SessionRow

sessions = cast(Table, SessionRow.__table__)
messages = cast(Table, MessageRow.__table__)
deletions = cast(Table, SessionDeletionRow.__table__)

# Bound parameters per statement stay well under SQLite's and asyncpg's limits.
IN_CHUNK = 500


def _bind(table: Table, name: str) -> Any:
    return bindparam(name, type_=table.c[name].type)


def _later(dialect: str) -> ColumnElement[Any]:
    """updated_at never moves backwards: the later of the stored and the given one."""
    function = func.greatest if dialect == "postgresql" else func.max
    return cast(
        ColumnElement[Any],
        function(sessions.c.updated_at, _bind(sessions, "updated_at")),
    )


_FIELDS = ("model", "status", "created_at")
_RETURNED = (sessions.c.next_position, sessions.c.revision)


def _insert_new(dialect: str) -> Any:
    names = [column.name for column in sessions.columns]
    statement = (postgresql.insert if dialect == "postgresql" else sqlite.insert)(sessions)
    return (
        statement.values({name: _bind(sessions, name) for name in names})
        .on_conflict_do_nothing(index_elements=[sessions.c.session_id])
        .returning(sessions.c.revision)
    )


def _append(dialect: str) -> Any:
    return (
        update(sessions)
        .where(
            sessions.c.session_id == bindparam("session_id"),
            sessions.c.incarnation == bindparam("incarnation"),
        )
        .values(
            updated_at=_later(dialect),
            message_count=sessions.c.message_count + bindparam("added"),
            next_position=sessions.c.next_position + bindparam("added"),
            revision=sessions.c.revision + 1,
        )
        .returning(*_RETURNED)
    )


def _compare_and_set(dialect: str) -> Any:
    return (
        update(sessions)
        .where(
            sessions.c.session_id == bindparam("session_id"),
            sessions.c.incarnation == bindparam("incarnation"),
            sessions.c.revision == bindparam("revision"),
        )
        .values(
            {name: _bind(sessions, name) for name in _FIELDS}
            | {
                "metadata": _bind(sessions, "metadata"),
                "updated_at": _later(dialect),
                "message_count": sessions.c.message_count
                + bindparam("added")
                - bindparam("removed"),
                "next_position": sessions.c.next_position + bindparam("added"),
                "revision": sessions.c.revision + 1,
            }
        )
        .returning(*_RETURNED)
    )


def _overwrite(dialect: str) -> Any:
    return (
        update(sessions)
        .where(sessions.c.session_id == bindparam("session_id"))
        .values(
            {
                name: _bind(sessions, name)
                for name in (*_FIELDS, "metadata", "message_count", "next_position", "revision")
            }
            | {"updated_at": _later(dialect)}
        )
    )


INSERT_NEW = Statement(_insert_new)
APPEND = Statement(_append)
COMPARE_AND_SET = Statement(_compare_and_set)
OVERWRITE = Statement(_overwrite)
LOCK = Statement(
    select(
        sessions.c.revision,
        sessions.c.incarnation,
        sessions.c.model,
        sessions.c.status,
        sessions.c.created_at,
        SESSION_METADATA_TEXT,
        sessions.c.message_count,
        sessions.c.next_position,
    )
    .where(sessions.c.session_id == bindparam("session_id"))
    .with_for_update()
)
# One multi-row statement however many messages a save carries (bulk.py).
INSERT_MESSAGES = BulkInsert(messages)
_EDITED = update(messages).where(
    messages.c.session_id == bindparam("session_id"),
    messages.c.message_id == bindparam("message_id"),
)
# An edit writes what the holder changed of a message, no more (found by attack: a
# forced save of a content edit wrote back the metadata another writer had changed).
EDIT_MESSAGE = Statement(
    _EDITED.values(
        content=_bind(messages, "content"),
        metadata=_bind(messages, "metadata"),
        search_text=_bind(messages, "search_text"),
    )
)
EDIT_CONTENT = Statement(
    _EDITED.values(content=_bind(messages, "content"), search_text=_bind(messages, "search_text"))
)
EDIT_METADATA = Statement(_EDITED.values(metadata=_bind(messages, "metadata")))


def _listed_in_session(dialect: str) -> tuple[ColumnElement[bool], ColumnElement[bool]]:
    """The messages of a list of ids, in session `session_id`, found by the message id.

    SQLite's planner, without statistics, takes three ids or more for more rows than the
    session's index gives, and walked every message of the session once a chunk (found
    by attack: a rewind of 10 messages took 45 ms in a session of 200,000, one of
    100,000 of them 9.7 s, SQLite's write lock held all along); `+session_id` keeps the
    session out of its choice. PostgreSQL's planner weighs both by its statistics.
    """
    session = (
        literal_column("+session_id", String()) if dialect == "sqlite" else messages.c.session_id
    )
    return (
        session == bindparam("session_id"),
        messages.c.message_id.in_(bindparam("ids", expanding=True)),
    )


DELETE_MESSAGES = Statement(lambda dialect: delete(messages).where(*_listed_in_session(dialect)))
SESSION_MESSAGES = Statement(
    lambda dialect: select(messages.c.message_id, messages.c.content, messages.c.metadata).where(
        *_listed_in_session(dialect)
    )
)
MESSAGE_OWNERS = Statement(
    select(messages.c.message_id, messages.c.session_id).where(
        messages.c.message_id.in_(bindparam("ids", expanding=True))
    )
)


STILL_THERE = Statement(
    select(sessions.c.incarnation).where(sessions.c.session_id == bindparam("session_id"))
)

# A new object's creation merged into the stored session (revision 0010): its delete
# then records the creation's incarnation deleted too. No row back: an earlier merge of
# the same creation landed.
RECORD_MERGE = Statement(
    text(
        "INSERT INTO chat_session_merges (session_id, incarnation, into_incarnation)"
        " VALUES (:session_id, :incarnation, :into_incarnation) ON CONFLICT DO NOTHING"
        " RETURNING incarnation"
    )
)

# Whether that incarnation of the session was deleted (revision 0010's record).
WAS_DELETED = Statement(
    select(deletions.c.incarnation).where(
        deletions.c.session_id == bindparam("session_id"),
        deletions.c.incarnation == bindparam("incarnation"),
    )
)


# The message columns `persistence_append` takes (revision 0007), in its order.
APPENDED_COLUMNS = ("message_id", "role", "content", "created_at", "metadata", "search_text")


def _append_in_one_statement(dialect: str) -> Any:
    """PostgreSQL: the session row's update and the messages' insert as one statement.

    `persistence_append` (revision 0007) runs the UPDATE (guarded by the incarnation),
    which yields the positions, and the INSERT of the messages, taken from arrays, one
    per column; its statements keep their plans. One statement is atomic without
    BEGIN/COMMIT, so an append costs one round trip.
    """
    assert dialect == "postgresql", dialect
    columns = [name for name in _message_row_keys() if name not in ("session_id", "position")]
    # A column added to the message rows needs a revision that replaces the function.
    assert tuple(columns) == APPENDED_COLUMNS, columns
    binds = []
    for name in columns:
        column = messages.c[name]
        json = isinstance(column.type.dialect_impl(_POSTGRESQL), postgresql.JSONB)
        binds.append(bindparam(f"c_{name}", type_=postgresql.ARRAY(Text if json else column.type)))
    return (
        text(
            "SELECT next_position, revision FROM persistence_append(:session_id, :incarnation,"
            " :updated_at, :added, :c_message_id, :c_role, :c_content, :c_created_at,"
            " :c_metadata, :c_search_text)"
        )
        .bindparams(
            bindparam("updated_at", type_=sessions.c.updated_at.type),
            bindparam("added", type_=BigInteger()),
            bindparam("session_id", type_=String()),
            bindparam("incarnation", type_=String()),
            *binds,
        )
        .columns(sessions.c.next_position, sessions.c.revision)
    )


def _message_row_keys() -> list[str]:
    sample = ChatMessage(session_id="s", role="user", content="")
    return list(rows_from_messages("s", [sample], 0, documents=True)[0])


_POSTGRESQL = postgresql.dialect()  # type: ignore[no-untyped-call]  # untyped in SQLAlchemy
APPEND_IN_ONE_STATEMENT = Statement(_append_in_one_statement)


def chunks(items: Sequence[str]) -> list[Sequence[str]]:
    return [items[i : i + IN_CHUNK] for i in range(0, len(items), IN_CHUNK)]
