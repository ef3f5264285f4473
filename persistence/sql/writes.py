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

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from persistence.changes import (
    SavePlan,
    conflicts,
    merge_metadata,
    resolve_unconfirmed,
    same_value,
)
from persistence.errors import InvalidDataError, SessionConflictError, SessionDeletedError
from persistence.models import ChatMessage
from persistence.search import search_document
from persistence.sql.indexing import documents_now
from persistence.sql.mapping import MessageRows, rows_from_messages
from persistence.sql.message_owners import not_stored, stored_here
from persistence.sql.runner import Execute, ExecuteMany, Fetch, WhichDialect, Work
from persistence.sql.statements import Statement
from persistence.sql.types import json_dumps, json_loads
from persistence.sql.write_statements import (
    APPEND,
    APPEND_IN_ONE_STATEMENT,
    APPENDED_COLUMNS,
    COMPARE_AND_SET,
    DELETE_MESSAGES,
    EDIT_CONTENT,
    EDIT_MESSAGE,
    EDIT_METADATA,
    INSERT_MESSAGES,
    INSERT_NEW,
    LOCK,
    OVERWRITE,
    RECORD_MERGE,
    SESSION_MESSAGES,
    STILL_THERE,
    WAS_DELETED,
    chunks,
)

# A new object whose row vanishes between its insert and its merge tries again.
_CREATE_ATTEMPTS = 3


@dataclass(frozen=True, slots=True)
class Saved:
    """What the store confirmed: the new revision, and whether it equals the plan's state."""

    revision: int
    incarnation: str
    exact: bool
    # The messages ever removed from the session by `revision`, or fewer (Base.removals).
    removals: int


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
    for name in APPENDED_COLUMNS:
        values = [row[name] for row in rows]
        if isinstance(values[0], dict):
            values = [json_dumps(value) for value in values]
        params[f"c_{name}"] = values
    found = yield Fetch(APPEND_IN_ONE_STATEMENT, params)
    if not found:
        raise SessionDeletedError(plan.session_id)
    _, revision = found[0]
    return _appended(plan, revision)


def _appended(plan: SavePlan, revision: int) -> Saved:
    """What an append of `plan` that the store numbered `revision` confirms: exact if no
    other writer wrote since an exact base. An append removes nothing; removals by
    others since are not counted (Base.removals may be fewer)."""
    assert plan.revision is not None and plan.incarnation is not None, "a stored session's"
    return Saved(
        revision, plan.incarnation, plan.exact and revision == plan.revision + 1, plan.base_removals
    )


def _resolved(plan: SavePlan) -> Work[SavePlan]:
    """`plan` with what the store holds of its new and unconfirmed messages resolved
    (changes.resolve_unconfirmed).

    Raises:
        InvalidDataError: if a new message's id is already stored in another session.
    """
    unconfirmed = () if plan.unconfirmed is None else plan.unconfirmed.appended
    here = yield from stored_here(plan.session_id, plan.appends, unconfirmed)
    return resolve_unconfirmed(plan, here)


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
        return (yield from _create_or_merge(plan, force))
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
        return _appended(plan, revision)
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
            # The stored revision was the base's: the plan's removals are the only ones.
            return Saved(revision, plan.incarnation, True, plan.base_removals + len(plan.removals))
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
    """Writes of each edited message what this holder changed: its content (and search
    document), its metadata, or both."""
    rows: dict[Statement, list[dict[str, Any]]] = {}
    for edit in plan.edits:
        content, metadata = edit.content_changed, edit.metadata_changed
        if not (content or metadata):
            continue
        row: dict[str, Any] = {"session_id": plan.session_id, "message_id": edit.current.message_id}
        if content:
            row["content"] = edit.current.content
            row["search_text"] = search_document(edit.current.content)
        if metadata:
            row["metadata"] = edit.current.metadata
        statement = (
            EDIT_MESSAGE if content and metadata else EDIT_CONTENT if content else EDIT_METADATA
        )
        rows.setdefault(statement, []).append(row)
    for statement, changed in rows.items():
        yield ExecuteMany(statement, changed)


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


def _locked_write(
    plan: SavePlan, force: bool, locked: Sequence[tuple[Any, ...]] = ()
) -> Work[Saved]:
    """Saves `plan` under the session row's lock, checking for conflicts (not with
    `force`). `locked`: the row LOCK returned in this transaction, if the caller has
    just read it; otherwise it is locked and read here."""
    rows = locked or (yield Fetch(LOCK, {"session_id": plan.session_id}))
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
        found = conflicts(
            plan,
            stored_fields,
            stored_metadata,
            stored_messages,
            revision,
            # Positions are never reused: as many missing as at the base, none was
            # removed since.
            anything_removed=next_position - count > plan.base_removals,
        )
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
        and same_value(merged, plan.metadata)
        and values["model"] == plan.model
        and values["status"] == plan.status
        and values["created_at"] == plan.created_at
    )
    return Saved(revision + 1, rows[0][1], exact, next_position - count + removed)


def one_statement_save(plan: SavePlan) -> Work[Saved | None] | None:
    """The save of `plan` as one PostgreSQL statement, to send without a transaction:
    an append (`appends_alone`), or the row of a new session without messages, which
    is None when the id is taken (then `write_plan` merges). None: no such form."""
    if appends_alone(plan):
        return append_in_one_statement(plan)
    if plan.is_new and plan.certain and not plan.appends:
        return create_row(plan)
    return None


def create_row(plan: SavePlan) -> Work[Saved | None]:
    """The new session's row, if its id is free; None, with nothing written, if taken
    (the object is then merged into the stored session: `write_plan`)."""
    incarnation = plan.incarnation
    assert incarnation is not None, "a new object's plan carries the incarnation it creates"
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
    return Saved(1, incarnation, exact=True, removals=0) if rows else None


def _create_or_merge(plan: SavePlan, force: bool) -> Work[Saved]:
    """Creates the session of a new object, or merges the object into the stored one.

    A new object's values win for the fields it carries; metadata keys it does not
    carry are kept; only messages the store lacks are added. An object retrying a
    creation of unknown outcome that landed (or a merge of it that did) saves as the
    holder of that session does instead (`SavePlan.if_landed`).

    Raises:
        SessionDeletedError: an earlier creation of this object, of unknown outcome,
            landed and the session was deleted since.
        SessionConflictError: that creation or merge landed, and another writer
            changed since what this object changes, or may have removed a message it
            sent (not with `force`).
    """
    if not plan.certain:
        landed = yield from _creation_landed(plan)
        if landed:
            assert plan.if_landed is not None
            return (yield from _locked_write(plan.if_landed, force, landed))
    for _ in range(_CREATE_ATTEMPTS):
        created = yield from create_row(plan)
        if created is not None:
            yield from _insert(plan.session_id, plan.appends, 0)
            return created
        rows = yield Fetch(LOCK, {"session_id": plan.session_id})
        if not rows:
            continue
        revision, stored_incarnation, _, _, _, metadata_text, count, next_position = rows[0]
        recorded = yield Fetch(
            RECORD_MERGE,
            {
                "session_id": plan.session_id,
                "incarnation": plan.incarnation,
                "into_incarnation": stored_incarnation,
            },
        )
        if not (recorded or plan.certain):
            # An earlier merge of this object into the stored session landed.
            assert plan.if_landed is not None
            merged = replace(plan.if_landed, incarnation=stored_incarnation)
            return (yield from _locked_write(merged, force, rows))
        appends = yield from not_stored(plan.session_id, plan.appends)
        yield from _insert(plan.session_id, appends, next_position)
        merged_metadata = {**json_loads(metadata_text), **plan.metadata}
        yield Execute(
            OVERWRITE,
            _field_values(plan, merged_metadata)
            | {
                "message_count": count + len(appends),
                "next_position": next_position + len(appends),
                "revision": revision + 1,
            },
        )
        # Messages it shares with the stored session may differ there: not exact.
        return Saved(revision + 1, stored_incarnation, exact=False, removals=next_position - count)
    raise InvalidDataError(
        f"session {plan.session_id!r}: created and deleted by other writers"
        f" {_CREATE_ATTEMPTS} times during this save; nothing was written"
    )


def _creation_landed(plan: SavePlan) -> Work[Sequence[tuple[Any, ...]]]:
    """The locked row of the session an earlier creation of unknown outcome made, if
    it is stored; otherwise empty.

    The row is locked first: a delete in flight (PostgreSQL) is waited for, and its
    record is then read by the next statement.

    Raises:
        SessionDeletedError: the creation landed, and the session was deleted since.
    """
    rows: list[tuple[Any, ...]] = yield Fetch(LOCK, {"session_id": plan.session_id})
    if rows and rows[0][1] == plan.incarnation:
        return rows
    deleted = yield Fetch(
        WAS_DELETED, {"session_id": plan.session_id, "incarnation": plan.incarnation}
    )
    if deleted:
        raise SessionDeletedError(plan.session_id)
    return ()
