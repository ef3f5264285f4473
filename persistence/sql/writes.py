"""A save of a session, as one transaction that checks revisions (API.md, Writes).

The work takes a `SavePlan` (what the holder changed since its last load or save) and
picks the cheapest statement that keeps every guarantee:

- appends only: one UPDATE of the session row (guarded by its incarnation, so a
  deleted session is never brought back) and one INSERT of the messages;
- other changes from a holder whose base is exact: the same UPDATE guarded also by
  the revision it saw (compare-and-set), then the message edits and removals;
- otherwise (someone wrote since, the base merged others' work, or an earlier save's
  outcome is unknown): the row is locked and read, conflicts are looked for field by
  field, key by key and message by message, and the holder's changes are merged into
  what is stored. A base is exact again only after a save nobody else wrote beside.

A new object creates the row, or merges into the row stored under its id.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import (
    BigInteger,
    String,
    Table,
    Text,
    bindparam,
    delete,
    func,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.sql import ColumnElement

from persistence.changes import SavePlan, conflicts, merge_metadata, resolve_unconfirmed
from persistence.errors import InvalidDataError, SessionConflictError, SessionDeletedError
from persistence.models import ChatMessage
from persistence.search import search_document
from persistence.sql.bulk import BulkInsert
from persistence.sql.indexing import documents_now
from persistence.sql.mapping import SESSION_METADATA_TEXT, MessageRows, rows_from_messages
from persistence.sql.runner import Execute, ExecuteMany, Fetch, WhichDialect, Work
from persistence.sql.statements import Statement
from persistence.sql.tables import MessageRow, SessionRow
from persistence.sql.types import json_dumps, json_loads

sessions = cast(Table, SessionRow.__table__)
messages = cast(Table, MessageRow.__table__)

# Bound parameters per statement stay well under SQLite's and asyncpg's limits.
IN_CHUNK = 500
# A new object whose row vanishes between its insert and its merge tries again.
_CREATE_ATTEMPTS = 3


@dataclass(frozen=True, slots=True)
class Saved:
    """What the store confirmed: the new revision, and whether it equals the plan's state."""

    revision: int
    incarnation: str
    exact: bool


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
EDIT_MESSAGE = Statement(
    update(messages)
    .where(
        messages.c.session_id == bindparam("session_id"),
        messages.c.message_id == bindparam("message_id"),
    )
    .values(
        content=_bind(messages, "content"),
        metadata=_bind(messages, "metadata"),
        search_text=_bind(messages, "search_text"),
    )
)
DELETE_MESSAGES = Statement(
    delete(messages).where(
        messages.c.session_id == bindparam("session_id"),
        messages.c.message_id.in_(bindparam("ids", expanding=True)),
    )
)
SESSION_MESSAGES = Statement(
    select(messages.c.message_id, messages.c.content, messages.c.metadata).where(
        messages.c.session_id == bindparam("session_id"),
        messages.c.message_id.in_(bindparam("ids", expanding=True)),
    )
)
MESSAGE_OWNERS = Statement(
    select(messages.c.message_id, messages.c.session_id).where(
        messages.c.message_id.in_(bindparam("ids", expanding=True))
    )
)


# The message columns `persistence_append` takes (revision 0007), in its order.
_APPENDED_COLUMNS = ("message_id", "role", "content", "created_at", "metadata", "search_text")


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
    assert tuple(columns) == _APPENDED_COLUMNS, columns
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


# From this many messages on, an append to a stored session goes by COPY, in parts built
# while the server stores the part before (runner.py), not as one statement.
COPIED_APPENDS = 256


def appends_alone(plan: SavePlan) -> bool:
    """Whether the plan only appends fewer than COPIED_APPENDS messages to a stored
    session it is certain of: on PostgreSQL one statement (`append_in_one_statement`),
    in a transaction or not."""
    return (
        plan.certain
        and 0 < len(plan.appends) < COPIED_APPENDS
        and not plan.is_new
        and plan.appends_only
    )


def append_in_one_statement(plan: SavePlan) -> Work[Saved]:
    """The save of a plan that `appends_alone`, as one PostgreSQL statement.

    Raises:
        SessionDeletedError: the session the plan's base came from is gone.
    """
    assert plan.incarnation is not None and plan.revision is not None
    documents = yield from documents_now()
    rows = rows_from_messages(plan.session_id, plan.appends, 0, documents=documents)
    params: dict[str, Any] = {
        "session_id": plan.session_id,
        "incarnation": plan.incarnation,
        "updated_at": plan.updated_at,
        "added": len(plan.appends),
    }
    for name in _APPENDED_COLUMNS:
        values = [row[name] for row in rows]
        if isinstance(values[0], dict):
            values = [json_dumps(value) for value in values]
        params[f"c_{name}"] = values
    found = yield Fetch(APPEND_IN_ONE_STATEMENT, params)
    if not found:
        raise SessionDeletedError(plan.session_id)
    _, revision = found[0]
    return Saved(revision, plan.incarnation, plan.exact and revision == plan.revision + 1)


def chunks(items: Sequence[str]) -> list[Sequence[str]]:
    return [items[i : i + IN_CHUNK] for i in range(0, len(items), IN_CHUNK)]


def message_owners(message_ids: Sequence[str]) -> Work[dict[str, str]]:
    """Which session stores each of `message_ids` (ids not stored are absent)."""
    owners: dict[str, str] = {}
    for chunk in chunks(message_ids):
        rows = yield Fetch(MESSAGE_OWNERS, {"ids": list(chunk)})
        owners.update({row[0]: row[1] for row in rows})
    return owners


def _stored_here(
    session_id: str, new: Sequence[ChatMessage], others: Iterable[str] = ()
) -> Work[set[str]]:
    """Which of the ids of `new` and of `others` the session `session_id` stores.

    Raises:
        InvalidDataError: if a new message's id is already stored in another session.
    """
    new_ids = {message.message_id for message in new}
    owners = yield from message_owners(list(new_ids.union(others)))
    for message_id, owner in owners.items():
        if owner != session_id and message_id in new_ids:
            raise InvalidDataError(
                f"message_id {message_id!r} is already stored in another session ({owner!r})"
            )
    return {message_id for message_id, owner in owners.items() if owner == session_id}


def _not_stored(session_id: str, candidates: Sequence[ChatMessage]) -> Work[list[ChatMessage]]:
    """The candidates the store does not hold yet.

    Raises:
        InvalidDataError: if a message id is already stored in another session.
    """
    here = yield from _stored_here(session_id, candidates)
    return [message for message in candidates if message.message_id not in here]


def _resolved(plan: SavePlan) -> Work[SavePlan]:
    """`plan` with what the store holds of its new and unconfirmed messages resolved
    (changes.resolve_unconfirmed).

    Raises:
        InvalidDataError: if a new message's id is already stored in another session.
    """
    unconfirmed = () if plan.unconfirmed is None else plan.unconfirmed.appended
    here = yield from _stored_here(plan.session_id, plan.appends, unconfirmed)
    return resolve_unconfirmed(plan, here)


STILL_THERE = Statement(
    select(sessions.c.incarnation).where(sessions.c.session_id == bindparam("session_id"))
)


def still_there(plan: SavePlan) -> Work[bool]:
    """Whether the session a plan with nothing to write came from is still stored."""
    if plan.is_new:
        return False
    rows = yield Fetch(STILL_THERE, {"session_id": plan.session_id})
    return bool(rows) and rows[0][0] == plan.incarnation


def write_plan(plan: SavePlan, *, force: bool = False) -> Work[Saved]:
    """Writes `plan` in the caller's transaction.

    With `force`, the plan's values win over another writer's for what it changed
    (edits of messages removed meanwhile are skipped) instead of a conflict.

    Raises:
        SessionConflictError: another writer changed what the plan changes (not with
            `force`).
        SessionDeletedError: the session the plan's base came from is gone.
        InvalidDataError: a new message's id is stored in another session.
    """
    if plan.is_new:
        return (yield from _create_or_merge(plan))
    assert plan.revision is not None and plan.incarnation is not None
    if appends_alone(plan) and (yield WhichDialect()) == "postgresql":
        return (yield from append_in_one_statement(plan))
    if plan.certain and plan.appends_only:
        rows = yield Fetch(
            APPEND,
            {
                "session_id": plan.session_id,
                "incarnation": plan.incarnation,
                "updated_at": plan.updated_at,
                "added": len(plan.appends),
            },
        )
        if not rows:
            raise SessionDeletedError(plan.session_id)
        next_position, revision = rows[0]
        yield from _insert(plan.session_id, plan.appends, next_position - len(plan.appends))
        return Saved(revision, plan.incarnation, plan.exact and revision == plan.revision + 1)
    if plan.certain and plan.exact:
        rows = yield Fetch(
            COMPARE_AND_SET,
            _field_values(plan, plan.metadata)
            | {
                "incarnation": plan.incarnation,
                "revision": plan.revision,
                "added": len(plan.appends),
                "removed": len(plan.removals),
            },
        )
        if rows:
            next_position, revision = rows[0]
            yield from _remove(plan)
            yield from _edit(plan)
            yield from _insert(plan.session_id, plan.appends, next_position - len(plan.appends))
            return Saved(revision, plan.incarnation, exact=True)
    return (yield from _locked_write(plan, force))


def _field_values(plan: SavePlan, metadata: dict[str, Any]) -> dict[str, Any]:
    return {
        "session_id": plan.session_id,
        "model": plan.model,
        "status": plan.status,
        "created_at": plan.created_at,
        "updated_at": plan.updated_at,
        "metadata": metadata,
    }


def _insert(session_id: str, new: Sequence[ChatMessage], first_position: int) -> Work[None]:
    if new:
        documents = yield from documents_now()
        rows = MessageRows([(session_id, new, first_position)], documents=documents)
        yield ExecuteMany(INSERT_MESSAGES, rows)


def _remove(plan: SavePlan) -> Work[int]:
    removed = 0
    for chunk in chunks([message.message_id for message in plan.removals]):
        removed += yield Execute(
            DELETE_MESSAGES, {"session_id": plan.session_id, "ids": list(chunk)}
        )
    return removed


def _edit(plan: SavePlan) -> Work[None]:
    if plan.edits:
        yield ExecuteMany(
            EDIT_MESSAGE,
            [
                {
                    "session_id": plan.session_id,
                    "message_id": edit.current.message_id,
                    "content": edit.current.content,
                    "metadata": edit.current.metadata,
                    "search_text": search_document(edit.current.content),
                }
                for edit in plan.edits
            ],
        )


def _stored_versions(plan: SavePlan) -> Work[dict[str, ChatMessage]]:
    """The stored content and metadata of the messages the plan edits or removes."""
    originals = {edit.original.message_id: edit.original for edit in plan.edits}
    originals.update({message.message_id: message for message in plan.removals})
    found: dict[str, ChatMessage] = {}
    for chunk in chunks(list(originals)):
        rows = yield Fetch(SESSION_MESSAGES, {"session_id": plan.session_id, "ids": list(chunk)})
        for message_id, content, metadata in rows:
            found[message_id] = originals[message_id].model_copy(
                update={"content": content, "metadata": metadata}
            )
    return found


def _locked_write(plan: SavePlan, force: bool) -> Work[Saved]:
    rows = yield Fetch(LOCK, {"session_id": plan.session_id})
    if not rows or rows[0][1] != plan.incarnation:
        raise SessionDeletedError(plan.session_id)
    revision, _, model, status, created_at, metadata_text, count, next_position = rows[0]
    stored_metadata = json_loads(metadata_text)
    if not plan.certain:
        # An earlier save's outcome is unknown: it may have stored some of its messages.
        plan = yield from _resolved(plan)
    if not force:
        # Checked even when the revision is the one the holder saw: a base that merged
        # other writers' work (not exact) does not know what they changed.
        stored_fields = {"model": model, "status": status, "created_at": created_at}
        stored_messages = yield from _stored_versions(plan)
        found = conflicts(plan, stored_fields, stored_metadata, stored_messages, revision)
        if found:
            raise SessionConflictError(plan.session_id, found)
    appends: Sequence[ChatMessage] = plan.appends
    removed = yield from _remove(plan)
    yield from _edit(plan)
    yield from _insert(plan.session_id, appends, next_position)
    merged = merge_metadata(stored_metadata, plan.metadata_changes)
    values = _field_values(plan, merged)
    if "model" not in plan.field_changes:
        values["model"] = model
    if "status" not in plan.field_changes:
        values["status"] = status
    if "created_at" not in plan.field_changes:
        values["created_at"] = created_at
    yield Execute(
        OVERWRITE,
        values
        | {
            "message_count": count - removed + len(appends),
            "next_position": next_position + len(appends),
            "revision": revision + 1,
        },
    )
    # Exact again only if nobody else wrote since an exact, certain base and the stored
    # fields are the holder's: then what it carries is what the store holds.
    exact = (
        plan.exact
        and plan.certain
        and revision == plan.revision
        and merged == plan.metadata
        and values["model"] == plan.model
        and values["status"] == plan.status
        and values["created_at"] == plan.created_at
    )
    return Saved(revision + 1, rows[0][1], exact)


def one_statement_save(plan: SavePlan) -> Work[Saved | None] | None:
    """The save of `plan` as one PostgreSQL statement, to send without a transaction:
    an append (`appends_alone`), or the row of a new session without messages, which
    is None when the id is taken (then `write_plan` merges). None: no such form."""
    if appends_alone(plan):
        return append_in_one_statement(plan)
    if plan.is_new and not plan.appends:
        return create_row(plan)
    return None


def create_row(plan: SavePlan) -> Work[Saved | None]:
    """The new session's row, if its id is free; None, with nothing written, if taken
    (the object is then merged into the stored session: `write_plan`)."""
    incarnation = uuid.uuid4().hex
    rows = yield Fetch(
        INSERT_NEW,
        _field_values(plan, plan.metadata)
        | {
            "message_count": len(plan.appends),
            "next_position": len(plan.appends),
            "revision": 1,
            "incarnation": incarnation,
        },
    )
    return Saved(1, incarnation, exact=True) if rows else None


def _create_or_merge(plan: SavePlan) -> Work[Saved]:
    """Creates the session of a new object, or merges the object into the stored one.

    A new object's values win for the fields it carries; metadata keys it does not
    carry are kept; only messages the store lacks are added.
    """
    for _ in range(_CREATE_ATTEMPTS):
        created = yield from create_row(plan)
        if created is not None:
            yield from _insert(plan.session_id, plan.appends, 0)
            return created
        rows = yield Fetch(LOCK, {"session_id": plan.session_id})
        if not rows:
            continue
        revision, stored_incarnation, _, _, _, metadata_text, count, next_position = rows[0]
        appends = yield from _not_stored(plan.session_id, plan.appends)
        yield from _insert(plan.session_id, appends, next_position)
        merged = {**json_loads(metadata_text), **plan.metadata}
        yield Execute(
            OVERWRITE,
            _field_values(plan, merged)
            | {
                "message_count": count + len(appends),
                "next_position": next_position + len(appends),
                "revision": revision + 1,
            },
        )
        # Messages it shares with the stored session may differ there: not exact.
        return Saved(revision + 1, stored_incarnation, exact=False)
    raise InvalidDataError(
        f"session {plan.session_id!r}: created and deleted by other writers"
        f" {_CREATE_ATTEMPTS} times during this save; nothing was written"
    )
