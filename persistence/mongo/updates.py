"""The commands a save sends, as pure functions of its plan and of what is stored.

A session is one document, so every save is one atomic single-document command:

- appends only: `$push` of the new messages with `$inc` of the count and revision and
  `$max` of `updated_at`, guarded by the incarnation (appends never conflict);
- anything else: an aggregation-pipeline update guarded by the revision it expects.
  MongoDB refuses `$push` together with `$pull` or a positional update of the same
  array in one classic update, so the pipeline rebuilds `messages` itself: `$filter`
  drops the removed messages, `$map` replaces the edited ones (keeping their store
  sequence), `$concatArrays` adds the new ones, and `message_count` is their `$size`.
  Every value from the caller is wrapped in `$literal`, so no string (a message that
  starts with `$`) is ever read as an expression.

Where the plan's base may be out of date, inspection.py reads the document first and
builds the same pipeline guarded by the revision it read.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import bson

from persistence.changes import Edit, SavePlan
from persistence.errors import InvalidDataError
from persistence.models import ChatMessage
from persistence.mongo.documents import LEGACY_INCARNATION, LEGACY_REVISION
from persistence.mongo.errors import MAX_DOCUMENT_BYTES
from persistence.mongo.mapping import document_from_message, search_tokens
from persistence.mongo.sequence import next_seq


@dataclass(frozen=True, slots=True)
class Saved:
    """What the store holds once a write matched: its revision, and if it equals the plan."""

    revision: int
    incarnation: str
    exact: bool


@dataclass(frozen=True, slots=True)
class Write:
    """One command that carries out a plan: an insert, or an update guarded by `query`."""

    saved: Saved
    insert: dict[str, Any] | None = None
    query: dict[str, Any] = field(default_factory=dict)
    pipeline: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Stored:
    """A session document as an inspection read it."""

    raw_revision: Any
    raw_incarnation: Any
    fields: dict[str, Any]
    metadata: dict[str, Any]
    # The embedded documents of the messages the plan names, by message id.
    messages: dict[str, dict[str, Any]]

    @property
    def revision(self) -> int:
        return LEGACY_REVISION if self.raw_revision is None else int(self.raw_revision)

    @property
    def incarnation(self) -> str:
        return LEGACY_INCARNATION if self.raw_incarnation is None else str(self.raw_incarnation)

    @property
    def guard(self) -> dict[str, Any]:
        """Matches the document only while it is exactly as read (None matches absent)."""
        return {"revision": self.raw_revision, "incarnation": self.raw_incarnation}


def _literal(value: Any) -> dict[str, Any]:
    return {"$literal": value}


def pushed_message(message: ChatMessage) -> dict[str, Any]:
    """A new message as stored: `seq` orders messages by when they were stored, as the
    SQL backends' row ids do (search sorts by it); it never leaves the store."""
    return {**document_from_message(message), "seq": next_seq()}


def check_size(session_id: str, content: Mapping[str, Any]) -> None:
    """Refuses, before anything is sent, a write whose own content crosses 16 MiB.

    The stored document is at least as large as what one write sends; growth of a
    document already near the limit is refused by the server atomically (code 17419)
    and translated to the same error.

    Raises:
        InvalidDataError: naming the session and the limit.
    """
    size = len(bson.encode({"_id": session_id, **content}))
    if size > MAX_DOCUMENT_BYTES:
        raise InvalidDataError(
            f"session {session_id!r}: {size} bytes of BSON exceed MongoDB's"
            f" 16 MiB document limit ({MAX_DOCUMENT_BYTES} bytes); nothing was written"
        )


def new_document(plan: SavePlan, incarnation: str) -> dict[str, Any]:
    """The whole document of a session a new object creates: revision 1."""
    messages = [pushed_message(message) for message in plan.appends]
    document = {
        "_id": plan.session_id,
        "model": plan.model,
        "created_at": plan.created_at,
        "updated_at": plan.updated_at,
        "metadata": plan.metadata,
        "status": plan.status,
        "message_count": len(messages),
        "messages": messages,
        "revision": 1,
        "incarnation": incarnation,
    }
    check_size(plan.session_id, document)
    return document


def _no_duplicates(query: dict[str, Any], messages: Sequence[ChatMessage]) -> dict[str, Any]:
    # A unique index spans documents, not one array: this keeps a session from holding
    # one message twice (a second copy of an object pushing what the first pushed).
    if messages:
        query["messages.message_id"] = {"$nin": [message.message_id for message in messages]}
    return query


def append(plan: SavePlan) -> tuple[dict[str, Any], dict[str, Any]]:
    """The filter and update of an appends-only save: no revision guard, nothing to conflict.

    Matches only the incarnation the holder saw, so a deleted (or deleted and created
    again) session is never written; the new revision comes back from the server.
    """
    query = _no_duplicates({"_id": plan.session_id, "incarnation": plan.incarnation}, plan.appends)
    update: dict[str, Any] = {
        "$inc": {"revision": 1},
        "$max": {"updated_at": plan.updated_at},
    }
    if plan.appends:
        pushed = [pushed_message(message) for message in plan.appends]
        check_size(plan.session_id, {"messages": pushed})
        update["$push"] = {"messages": {"$each": pushed}}
        update["$inc"]["message_count"] = len(pushed)
    return query, update


def update_pipeline(
    *,
    fields: Mapping[str, Any],
    metadata: dict[str, Any] | None,
    updated_at: Any,
    revision: int,
    incarnation: str,
    removed: Sequence[str] = (),
    edited: Sequence[dict[str, Any]] = (),
    appended: Sequence[dict[str, Any]] = (),
) -> list[dict[str, Any]]:
    """An update pipeline that sets the fields given and changes the history in order.

    `metadata` None leaves it alone; `updated_at` only moves forward; the revision and
    incarnation are set (a document written before revisions gets both).
    """
    values: dict[str, Any] = {name: _literal(value) for name, value in fields.items()}
    if metadata is not None:
        values["metadata"] = _literal(metadata)
    values["updated_at"] = {"$max": ["$updated_at", _literal(updated_at)]}
    values["revision"] = _literal(revision)
    values["incarnation"] = _literal(incarnation)
    stages: list[dict[str, Any]] = [{"$set": values}]
    if removed or edited or appended:
        values["messages"] = _history(removed, edited, appended)
        # A second stage: within one, `$messages` would still be the old history.
        stages.append({"$set": {"message_count": {"$size": "$messages"}}})
    return stages


def _history(
    removed: Sequence[str], edited: Sequence[dict[str, Any]], appended: Sequence[dict[str, Any]]
) -> dict[str, Any]:
    history: dict[str, Any] = {"$ifNull": ["$messages", []]}
    if removed:
        history = {
            "$filter": {
                "input": history,
                "as": "m",
                "cond": {"$not": [{"$in": ["$$m.message_id", _literal(list(removed))]}]},
            }
        }
    if edited:
        ids = [document["message_id"] for document in edited]
        at = {"$indexOfArray": [_literal(ids), "$$m.message_id"]}
        replaced = {"$mergeObjects": ["$$m", {"$arrayElemAt": [_literal(list(edited)), "$$at"]}]}
        history = {
            "$map": {
                "input": history,
                "as": "m",
                "in": {
                    "$let": {
                        "vars": {"at": at},
                        "in": {"$cond": [{"$eq": ["$$at", -1]}, "$$m", replaced]},
                    }
                },
            }
        }
    if appended:
        history = {"$concatArrays": [history, _literal(list(appended))]}
    return history


def compare_and_set(plan: SavePlan) -> Write:
    """The write of a holder whose base is exact: guarded by the revision it saw."""
    assert plan.revision is not None and plan.incarnation is not None
    fields = {name: new for name, (_old, new) in plan.field_changes.items()}
    metadata = plan.metadata if plan.metadata_changes else None
    guard = {"revision": plan.revision, "incarnation": plan.incarnation}
    return _pipeline_write(
        plan, guard, plan.revision, plan.incarnation, fields, metadata, plan.appends, exact=True
    )


def guarded(
    plan: SavePlan,
    stored: Stored,
    fields: dict[str, Any],
    metadata: dict[str, Any] | None,
    appends: Sequence[ChatMessage],
    exact: bool,
) -> Write:
    """The write of `plan` over `stored`, matching only while the document is as read."""
    return _pipeline_write(
        plan, stored.guard, stored.revision, stored.incarnation, fields, metadata, appends, exact
    )


def _pipeline_write(
    plan: SavePlan,
    guard: dict[str, Any],
    revision: int,
    incarnation: str,
    fields: dict[str, Any],
    metadata: dict[str, Any] | None,
    appends: Sequence[ChatMessage],
    exact: bool,
) -> Write:
    removed = [message.message_id for message in plan.removals]
    # What the holder changed of each edited message: $mergeObjects keeps the rest
    # (found by attack on SQL: a forced save of a content edit wrote back the metadata
    # another writer had changed).
    edited = [edited_parts(edit) for edit in plan.edits]
    appended = [pushed_message(message) for message in appends]
    check_size(plan.session_id, {**fields, "metadata": metadata, "messages": edited + appended})
    pipeline = update_pipeline(
        fields=fields,
        metadata=metadata,
        updated_at=plan.updated_at,
        revision=revision + 1,
        incarnation=incarnation,
        removed=removed,
        edited=edited,
        appended=appended,
    )
    query = _no_duplicates({"_id": plan.session_id, **guard}, appends)
    return Write(Saved(revision + 1, incarnation, exact), query=query, pipeline=pipeline)


def edited_parts(edit: Edit) -> dict[str, Any]:
    """The parts of an edited message's embedded form that this holder changed."""
    message = edit.current
    parts: dict[str, Any] = {"message_id": message.message_id}
    if edit.content_changed:
        parts["content"] = message.content
        parts["search_tokens"] = search_tokens(message.content)
    if edit.metadata_changed:
        parts["metadata"] = message.metadata
    return parts
