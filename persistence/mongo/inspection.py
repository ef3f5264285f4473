"""What a checked save reads first, and the write (or the refusal) it leads to.

Where a holder's base may be out of date (another writer wrote since, an earlier save's
outcome is unknown, a new object under an id the store may hold, a transaction that a
failed write would abort), one aggregation reads what the conflict rule needs: the
session's fields and metadata, only the messages the plan names, and every other
session that holds one of its new message ids. `prepare` then refuses the plan or
builds a write guarded by exactly the revision it read, so nothing another writer did
in between is overwritten: that write simply does not match, and the save reads again.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from persistence.changes import (
    TRACKED_FIELDS,
    SavePlan,
    conflicts,
    merge_metadata,
    resolve_unconfirmed,
    same_value,
)
from persistence.errors import InvalidDataError, SessionConflictError, SessionDeletedError
from persistence.models import ChatMessage
from persistence.mongo.updates import Saved, Stored, Write, guarded, new_document

_STORED_FIELDS = ("model", "status", "created_at", "metadata", "revision", "incarnation")


def _named_ids(plans: Sequence[SavePlan]) -> list[str]:
    return [
        *(message.message_id for plan in plans for message in plan.appends),
        *(edit.original.message_id for plan in plans for edit in plan.edits),
        *(message.message_id for plan in plans for message in plan.removals),
        *(
            message_id
            for plan in plans
            if plan.unconfirmed
            for message_id in plan.unconfirmed.appended
        ),
    ]


def inspection(plans: Sequence[SavePlan]) -> list[dict[str, Any]]:
    """The aggregation that reads what `prepare` needs for these plans, in one round trip.

    It returns each plan's session (if stored) with its fields and only the messages
    the plans name, and every other session that holds one of their new message ids
    (found through the unique index on `messages.message_id`).
    """
    appended = [message.message_id for plan in plans for message in plan.appends]
    match: dict[str, Any] = {"_id": {"$in": [plan.session_id for plan in plans]}}
    if appended:
        match = {"$or": [match, {"messages.message_id": {"$in": appended}}]}
    projection: dict[str, Any] = dict.fromkeys(_STORED_FIELDS, 1)
    projection["messages"] = {
        "$filter": {
            "input": {"$ifNull": ["$messages", []]},
            "as": "m",
            # Ids are the caller's strings: $literal, so "$x" is never a field path.
            "cond": {"$in": ["$$m.message_id", {"$literal": _named_ids(plans)}]},
        }
    }
    return [{"$match": match}, {"$project": projection}]


class Inspection:
    """The rows an inspection returned, indexed for the plans it was run for."""

    def __init__(self, rows: Sequence[Mapping[str, Any]]) -> None:
        self._sessions: dict[str, Mapping[str, Any]] = {}
        self._holders: dict[str, str] = {}
        for row in rows:
            self._sessions[row["_id"]] = row
            for document in row.get("messages") or ():
                self._holders[document["message_id"]] = row["_id"]

    def stored(self, session_id: str) -> Stored | None:
        """The session as read (None: not stored)."""
        row = self._sessions.get(session_id)
        if row is None:
            return None
        return Stored(
            raw_revision=row.get("revision"),
            raw_incarnation=row.get("incarnation"),
            fields={name: row.get(name) for name in TRACKED_FIELDS},
            metadata=row.get("metadata") or {},
            messages={document["message_id"]: document for document in row.get("messages") or ()},
        )

    def taken(self, plan: SavePlan) -> dict[str, str]:
        """The plan's new message ids that another session holds, with that session."""
        taken: dict[str, str] = {}
        for message in plan.appends:
            holder = self._holders.get(message.message_id)
            if holder is not None and holder != plan.session_id:
                taken[message.message_id] = holder
        return taken

    def prepare(
        self, plan: SavePlan, incarnation: str, *, force: bool = False, absent: bool = False
    ) -> Write:
        """`prepare` for one of the plans this inspection was run for; with `absent`, as
        if its session were not stored (it is deleted before the write)."""
        stored = None if absent else self.stored(plan.session_id)
        return prepare(plan, stored, self.taken(plan), incarnation, force=force)


def _refuse_taken(plan: SavePlan, taken: Mapping[str, str]) -> None:
    for message in plan.appends:
        holder = taken.get(message.message_id)
        if holder is not None:
            raise InvalidDataError(
                f"message_id {message.message_id!r} is already stored in another session"
                f" ({holder!r})"
            )


def _stored_messages(plan: SavePlan, stored: Stored) -> dict[str, ChatMessage]:
    """The stored versions of the messages the plan edits or removes (absent: removed)."""
    originals = {edit.original.message_id: edit.original for edit in plan.edits}
    originals.update({message.message_id: message for message in plan.removals})
    return {
        message_id: originals[message_id].model_copy(
            update={"content": document["content"], "metadata": document.get("metadata") or {}}
        )
        for message_id, document in stored.messages.items()
        if message_id in originals
    }


def prepare(
    plan: SavePlan,
    stored: Stored | None,
    taken: Mapping[str, str],
    incarnation: str,
    *,
    force: bool = False,
) -> Write:
    """Refuses the plan, or builds its write against what an inspection read.

    `taken` maps the plan's new message ids that other sessions hold to those
    sessions; `incarnation` is the one a new object's session gets if it creates it.
    With `force`, the plan's values win over another writer's for what it changed
    (edits of messages removed meanwhile change nothing) instead of a conflict.

    Raises:
        SessionDeletedError: the session the plan's base came from is gone.
        SessionConflictError: another writer changed what the plan changes (not with
            `force`).
        InvalidDataError: a new message's id is stored in another session (or, for a
            holder certain of its base, already in this one), or a write crosses 16 MiB.
    """
    if plan.is_new:
        _refuse_taken(plan, taken)
        if stored is None:
            return Write(Saved(1, incarnation, exact=True), insert=new_document(plan, incarnation))
        if plan.if_landed is not None and stored.incarnation == plan.incarnation:
            # An earlier creation of unknown outcome landed: saved as its holder does.
            return prepare(plan.if_landed, stored, taken, incarnation, force=force)
        return _merge_new(plan, stored)
    if stored is None or stored.incarnation != plan.incarnation:
        raise SessionDeletedError(plan.session_id)
    if not plan.certain:
        # An earlier save's outcome is unknown: it may have stored some of its messages.
        plan = resolve_unconfirmed(plan, stored.messages.keys())
    if not force:
        # Checked even at the revision the holder saw: a base that merged other writers'
        # work (not exact) does not know what they changed.
        found = conflicts(
            plan, stored.fields, stored.metadata, _stored_messages(plan, stored), stored.revision
        )
        if found:
            raise SessionConflictError(plan.session_id, found)
    _refuse_taken(plan, taken)
    here = [message for message in plan.appends if message.message_id in stored.messages]
    if here and plan.certain:
        raise InvalidDataError(
            f"message_id {here[0].message_id!r} is already stored in this session"
            " (saved through another copy of this object?)"
        )
    appends = list(plan.appends)
    fields = {name: new for name, (_old, new) in plan.field_changes.items()}
    merged = merge_metadata(stored.metadata, plan.metadata_changes)
    # Exact again only if nobody wrote since an exact, certain base and the stored values
    # are the holder's: then what it carries is what the store holds.
    exact = (
        plan.exact
        and plan.certain
        and stored.revision == plan.revision
        and same_value(merged, plan.metadata)
        and all(
            fields.get(name, stored.fields[name]) == getattr(plan, name) for name in TRACKED_FIELDS
        )
    )
    metadata = merged if plan.metadata_changes else None
    return guarded(plan, stored, fields, metadata, appends, exact)


def _merge_new(plan: SavePlan, stored: Stored) -> Write:
    """A new object under a stored id: its values win; keys and messages it lacks stay."""
    merged = {**stored.metadata, **plan.metadata}
    appends = [message for message in plan.appends if message.message_id not in stored.messages]
    fields = {name: getattr(plan, name) for name in TRACKED_FIELDS}
    # Messages it shares with the stored session may differ there: never exact.
    return guarded(plan, stored, fields, merged, appends, exact=False)


def refuse_shared_ids(plans: Sequence[SavePlan]) -> None:
    """Refuses plans of one batch that add the same message id twice.

    Raises:
        InvalidDataError: naming the id and both sessions.
    """
    first: dict[str, str] = {}
    for plan in plans:
        for message in plan.appends:
            if message.message_id in first:
                raise InvalidDataError(
                    f"message_id {message.message_id!r} is added twice in this unit of work"
                    f" (sessions {first[message.message_id]!r} and {plan.session_id!r})"
                )
            first[message.message_id] = plan.session_id
