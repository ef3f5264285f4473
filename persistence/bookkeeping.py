"""Per-storage bookkeeping of a ChatSession: what each store holds of it, what a save sends.

Storages call these around their reads and writes: `loaded_from` after a load,
`plan_save` before a save, `saved_to` or `save_failed` after it. `rebase` is the
reload-and-reapply of SessionManager. Mixed into `ChatSession`, whose edit operations
feed the log that `plan_save` replays (see changes.py).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime
from typing import TYPE_CHECKING, Any

from persistence.changes import (
    MISSING,
    TRACKED_FIELDS,
    Base,
    Creation,
    Edit,
    LogEntry,
    MessageList,
    SavePlan,
    Snapshot,
    Uncommitted,
    Unconfirmed,
    merge_metadata,
    metadata_changes,
    replay,
    resolve_unconfirmed,
    same_value,
)
from persistence.errors import InvalidDataError, SessionConflictError, SessionDeletedError
from persistence.frozen_metadata import FrozenDict, freeze
from persistence.identifiers import new_incarnation
from persistence.validation import check_json_object

if TYPE_CHECKING:
    from persistence.models import ChatMessage, ChatSession, Status


class Bookkeeping:
    """The bookkeeping half of `ChatSession` (its fields and private state live there)."""

    if TYPE_CHECKING:
        session_id: str
        model: str
        status: Status
        created_at: datetime
        updated_at: datetime
        message_count: int
        metadata: dict[str, Any]
        _log: Sequence[LogEntry]
        _log_start: int
        _omitted: int
        _revision: int | None
        _epoch: int
        _pins: Sequence[int]

        def _messages(self) -> MessageList: ...

    def _private(self) -> dict[str, Any]:
        """pydantic's dict of this object's private attributes (`_log`, `_epoch`...)."""
        private: dict[str, Any] = self.__pydantic_private__  # type: ignore[attr-defined]
        return private

    def _growing(self, name: str) -> list[Any]:
        """The private sequence `name` (`_log`, `_pins`) as a list of its own, to grow:
        each starts as the shared empty tuple, and most sessions never grow one."""
        private = self._private()
        items = private[name]
        if type(items) is not list:
            items = private[name] = list(items)
        return items

    def _known(self) -> dict[str, Base]:
        """The bases per storage token (making the one `from_store` recorded, if any)."""
        private = self._private()
        loaded = private["_loaded"]
        if loaded is not None:
            private["_loaded"] = None
            token, base_of, source, synced, foreign_at = loaded
            private["_bases"].setdefault(token, base_of(source, synced, foreign_at))
        bases: dict[str, Base] = private["_bases"]
        return bases

    def loaded_from(
        self, token: str, revision: int, incarnation: str, metadata: Snapshot, omitted: int = 0
    ) -> None:
        """Records that storage `token` holds this object's state at `revision`.

        `metadata` is the stored metadata as a snapshot the object does not share.
        """
        messages = self._messages()
        self._omitted = omitted
        self._revision = revision
        self._private()["_creations"].pop(token, None)
        self._known()[token] = Base(
            session_id=self.session_id,
            revision=revision,
            incarnation=incarnation,
            exact=True,
            certain=True,
            model=self.model,
            status=self.status,
            created_at=self.created_at,
            updated_at=self.updated_at,
            metadata=metadata,
            synced=len(messages),
            log_at=self._log_start + len(self._log),
            foreign_at=messages.foreign_changes,
        )

    def plan_save(self, token: str) -> SavePlan:
        """What a save to storage `token` must send: the changes since its base.

        Raises:
            InvalidDataError: if `messages` was changed in a way the model cannot express,
                or a new message belongs to another session or repeats an id.
            SessionConflictError: the object was read in a unit of work that did not
                commit, after that unit's own writes to the session (`void`).
        """
        messages = self._messages()
        base = self._known().get(token)
        if base is not None and base.void:
            raise SessionConflictError(
                self.session_id,
                [
                    "everything (read in a unit of work after its own writes to the"
                    " session, and the unit did not commit: what it holds may never"
                    " have been stored)"
                ],
            )
        # Private attributes straight from pydantic's dict: each `self._x` would go
        # through BaseModel.__getattr__, and a save is on the hot path.
        private = self._private()
        log = private["_log"]
        log_start = private["_log_start"]
        log_at = log_start + len(log)
        if base is None:
            # The store does not hold it: it would take this object for the whole.
            self.refuse_shortened("save")
            appends = tuple(messages)
            _check_new_messages(self.session_id, appends)
            # Changed in place, the metadata skipped the model's validation.
            check_json_object(self.metadata, "metadata")
            # The incarnation the session is created with; an earlier creation of unknown
            # outcome sent one, and the save must tell whether it landed (not certain).
            earlier: Creation | None = private["_creations"].get(token)
            plan = SavePlan(
                session_id=self.session_id,
                revision=None,
                incarnation=new_incarnation() if earlier is None else earlier.incarnation,
                certain=earlier is None,
                exact=False,
                model=self.model,
                status=self.status,
                created_at=self.created_at,
                updated_at=self.updated_at,
                metadata=copy.deepcopy(self.metadata),
                field_changes={},
                metadata_changes={},
                edits=(),
                removals=(),
                appends=appends,
                updated_at_changed=True,
                messages_sent=len(messages),
                log_at=log_at,
                foreign_at=messages.foreign_changes,
                epoch=private["_epoch"],
            )
            if earlier is None:
                return plan
            attempted = earlier.sent()
            return replace(
                plan, unconfirmed=attempted, if_landed=earlier.if_landed(plan, attempted)
            )
        _refuse_changed_id(base, self.session_id)
        if messages.foreign_changes != base.foreign_at:
            raise InvalidDataError(
                f"session {self.session_id!r}: {messages.first_foreign} directly in"
                " `messages`, which a save cannot express; use add_message, edit_message,"
                " rewind or pop_message, or load the session again"
            )
        pending = replay(base, log[base.log_at - log_start :])
        appends = tuple(messages[pending.synced :])
        _check_new_messages(self.session_id, appends)
        for edit in pending.edits.values():
            _check_message_metadata(edit.current)
        # What a save of unknown outcome sent may be stored: written again as held now.
        sent = None if base.certain else base.unconfirmed or Unconfirmed()
        field_changes = {
            name: (getattr(base, name), self.__dict__[name])
            for name in TRACKED_FIELDS
            if getattr(base, name) != self.__dict__[name] or (sent and name in sent.fields)
        }
        stored_metadata = base.metadata.value()
        changes = metadata_changes(stored_metadata, self.metadata)
        if changes:
            # Changed in place, the metadata skipped the model's validation.
            check_json_object(self.metadata, "metadata")
        for key in sent.metadata if sent else ():
            changes.setdefault(
                key, (stored_metadata.get(key, MISSING), self.metadata.get(key, MISSING))
            )
        return SavePlan(
            session_id=self.session_id,
            revision=base.revision,
            incarnation=base.incarnation,
            certain=base.certain,
            exact=base.exact,
            model=self.model,
            status=self.status,
            created_at=self.created_at,
            updated_at=self.updated_at,
            metadata=copy.deepcopy(self.metadata) if changes else stored_metadata,
            field_changes=field_changes,
            metadata_changes=changes,
            edits=tuple(pending.edits.values()),
            removals=tuple(pending.removed.values()),
            appends=appends,
            updated_at_changed=self.updated_at != base.updated_at,
            messages_sent=len(messages),
            log_at=log_at,
            foreign_at=messages.foreign_changes,
            epoch=private["_epoch"],
            unconfirmed=None if sent is None else sent.copy(),
            base_removals=base.removals,
        )

    def saved_to(
        self,
        token: str,
        plan: SavePlan,
        revision: int,
        incarnation: str,
        *,
        exact: bool,
        keep_log: bool = False,
        removals: int = 0,
    ) -> None:
        """Records that storage `token` confirmed `plan` at `revision`.

        `removals`: how many messages the store had removed from the session by then,
        or fewer (`Base.removals`).

        Changes made while the save was in flight stay pending: the new base is the
        object as the plan saw it. `keep_log` keeps what an older base needs (a unit of
        work may still roll back to it).
        """
        private = self._private()
        private["_revision"] = revision
        if plan.epoch != private["_epoch"]:
            # Rebased or rolled back while this save was in flight: the plan no longer
            # describes the list. It landed, so the base is behind: the next save checks.
            self.save_failed(token, plan)
            return
        # `_creations` keeps a creation of unknown outcome's incarnation: a unit of
        # work's rollback may take this base back (found by attack: forgotten here, the
        # next save created the session again after another writer's delete).
        self._known()[token] = Base(
            session_id=plan.session_id,
            revision=revision,
            incarnation=incarnation,
            exact=exact,
            certain=True,
            model=plan.model,
            status=plan.status,
            created_at=plan.created_at,
            updated_at=plan.updated_at,
            metadata=Snapshot(value=plan.metadata),
            synced=plan.messages_sent,
            log_at=plan.log_at,
            foreign_at=plan.foreign_at,
            removals=removals,
        )
        # What this object knows of the store: its omitted messages and those it carries
        # (found by audit: messages appended to `messages` directly were stored, and the
        # object went on counting without them). Others' appends it merged are not here.
        self.__dict__["message_count"] = private["_omitted"] + len(self._messages())
        if not keep_log:
            self._trim_log()

    def change_mark(self) -> tuple[Any, ...]:
        """A value that moves with every change made through the model: a message added,
        edited or removed, a field or the metadata set (not metadata changed in place)."""
        messages = self._messages()
        return (
            self._log_start + len(self._log),
            len(messages),
            messages.foreign_changes,
            self.updated_at,
            *(self.__dict__[name] for name in TRACKED_FIELDS),
            id(self.metadata),
        )

    def caught_up(self, token: str, plan: SavePlan) -> None:
        """Records that storage `token` still holds the session as its base says and
        `plan` writes nothing (say, a message added and popped again): the base moves to
        the plan's place in the log, its revision and contents unchanged.

        Found by attack: such an object stayed unsaved for good, and a SessionManager
        evicting it saved it again and again, never returning. Its `message_count` is
        set to what it knows of the store, as after a save that wrote (found by attack:
        a count assigned by hand stayed on the object, and in a manager's exports,
        after a save that returned True).
        """
        private = self._private()
        self.__dict__["message_count"] = private["_omitted"] + len(self._messages())
        base = self._known().get(token)
        if base is None or plan.epoch != private["_epoch"]:
            return
        self._known()[token] = replace(
            base, synced=plan.messages_sent, log_at=plan.log_at, foreign_at=plan.foreign_at
        )
        self._trim_log()

    def settled(self, held: Base | None) -> None:
        """The saves a unit of work kept the log for (`keep_log`) are final: what only
        the bases before them needed goes. `held` is the base `base_for` gave it."""
        self._unpin(held)
        self._trim_log()

    def rebase(self, token: str, fresh: ChatSession) -> list[str]:
        """Makes `fresh` (just loaded from storage `token`) this object's base, in place.

        This object's own pending changes are applied over it: its values win for the
        fields, metadata keys and messages it changed; messages others added are kept.
        Edits of messages another writer removed are dropped.

        Returns:
            The ids of edited messages that were dropped.

        Raises:
            InvalidDataError: if `messages` was changed in a way the model cannot express.
            SessionDeletedError: `fresh` is another session under the same id (the one
                this object knew was deleted and created again); nothing changes.
        """
        held = self._known().get(token)
        base = fresh._known()[token].copy()
        if held is not None and held.incarnation != base.incarnation:
            # Found by attack: a manager resolving a conflict reloaded a session deleted
            # and created again meanwhile, and wrote its changes into the new one.
            raise SessionDeletedError(self.session_id)
        stored_ids = {message.message_id for message in fresh.messages}
        planned = self.plan_save(token)
        # A creation of unknown outcome is rebased as the save of the session it made
        # (found by attack: the new object's plan carries no field or key changes, so
        # the manager's own values were dropped).
        plan = resolve_unconfirmed(planned.if_landed or planned, stored_ids)
        removed_ids = {message.message_id for message in plan.removals}
        edited = {edit.current.message_id: edit for edit in plan.edits}
        kept: list[ChatMessage] = []
        for message in fresh.messages:
            if message.message_id in removed_ids:
                base.removed[message.message_id] = message
                continue
            edit = edited.pop(message.message_id, None)
            if edit is None:
                kept.append(message)
                continue
            current = _reapplied(edit, message)
            base.edits[message.message_id] = Edit(message, current)
            kept.append(current)
        appends = [m for m in plan.appends if m.message_id not in stored_ids]
        values = {name: fresh.__dict__[name] for name in TRACKED_FIELDS}
        values.update({name: new for name, (_old, new) in plan.field_changes.items()})
        messages = self._messages()
        list.__setitem__(messages, slice(None), [*kept, *appends])
        base.synced = len(kept)
        base.log_at = self._log_start + len(self._log)
        base.foreign_at = messages.foreign_changes
        self.__dict__.update(values)
        self.__dict__["metadata"] = merge_metadata(fresh.metadata, plan.metadata_changes)
        self.__dict__["updated_at"] = max(self.updated_at, fresh.updated_at)
        self.__dict__["message_count"] = fresh._omitted + len(messages)
        self._omitted = fresh._omitted
        self._revision = fresh._revision
        self._epoch += 1
        self._known()[token] = base
        self._trim_log()
        return list(edited)

    def stored_updated_at(self, token: str) -> datetime | None:
        """The `updated_at` storage `token` held at this object's last load or save there."""
        base = self._known().get(token)
        return None if base is None else base.updated_at

    def base_for(self, token: str) -> Base | None:
        """A copy of what storage `token` held of this object, for a unit of work's undo.

        The log that base needs is kept until the unit gives it back (`restore_base`) or
        ends (`settled`). Found by attack: a unit of work on another store that committed
        meanwhile trimmed it, and this unit's rollback then restored a base whose edits
        were gone: the next save to this store returned True without them.
        """
        base = self._known().get(token)
        if base is None:
            return None
        held = base.copy()
        self._growing("_pins").append(held.log_at)
        return held

    def restore_base(self, token: str, base: Base | None) -> None:
        """Puts back a base from `base_for`: the writes since were rolled back.

        A save of this object planned from the base rolled back (another task's, in
        flight) no longer describes the store: its success records an uncertain base.
        """
        if base is None:
            self._known().pop(token, None)
        else:
            self._known()[token] = base
        self._private()["_epoch"] += 1
        self._unpin(base)

    def read_uncommitted(self, token: str, mark: Uncommitted) -> None:
        """Records that this object, just read from storage `token` inside a unit of
        work, holds that unit's own writes to the session: stored only if it commits.

        Once the unit ends without a commit (`mark.void`), every save of this object or
        a copy of it to `token` is refused until the session is loaded again. Found by
        attack: such an object kept the rolled-back revision and removal count; once
        another writer's saves brought the store to that revision, a save of it
        overwrote that writer's metadata, and brought back a message it had removed.
        """
        self._known()[token].uncommitted = mark

    def unit_ended(self) -> None:
        """A unit of work this object was read in ended: a save of it in flight, planned
        before, records an uncertain base (as after `restore_base`)."""
        self._private()["_epoch"] += 1

    def save_failed(self, token: str, *sent: SavePlan) -> None:
        """Records that a save to `token` may or may not have landed: the next one checks.

        `sent` are the plans it sent: the next save takes what they wrote for this
        object's own (changes.Unconfirmed), whatever the object did with it meanwhile.
        """
        base = self._known().get(token)
        if base is None:
            creations: dict[str, Creation] = self._private()["_creations"]
            for plan in sent:
                if plan.is_new and plan.incarnation is not None:
                    earlier = creations.get(token) or Creation(plan.incarnation, ())
                    creations[token] = earlier.plus(plan)
        else:
            base.certain = False
            if sent:
                unconfirmed = base.unconfirmed = base.unconfirmed or Unconfirmed()
                for plan in sent:
                    unconfirmed.add(plan)

    def refuse_shortened(self, action: str) -> None:
        """Refuses to write an object loaded with `last=` into a store it was not loaded
        from or saved to: the store would take it for the whole session. Found by
        attack: the error said that store did not hold the session, also when a
        migration had copied it there.

        Raises:
            InvalidDataError: naming how many messages it carries of how many.
        """
        omitted = self._private()["_omitted"]
        if omitted:
            carried = len(self._messages())
            raise InvalidDataError(
                f"session {self.session_id!r} carries only its newest {carried} of"
                f" {omitted + carried} messages (it was loaded with last=), and it was not"
                f" loaded from or saved to this store: a {action} would store a shortened"
                " copy. Load it whole (without last=) to write it here"
            )

    def refuse_changed_id(self) -> None:
        """Refuses an object given another id than it was loaded or saved under.

        Raises:
            InvalidDataError: naming both ids.
        """
        for base in self._known().values():
            _refuse_changed_id(base, self.session_id)

    def has_changes_for(self, token: str) -> bool:
        """Whether storage `token` lacks something of this object (True if it never held it)."""
        base = self._known().get(token)
        if base is None or not base.certain or base.void or base.session_id != self.session_id:
            return True
        messages = self._messages()
        if (
            messages.foreign_changes != base.foreign_at
            or len(self._log) > base.log_at - self._log_start
        ):
            return True
        return (
            len(messages) != base.synced
            or base.edits != {}
            or base.removed != {}
            or self.updated_at != base.updated_at
            or any(getattr(base, name) != self.__dict__[name] for name in TRACKED_FIELDS)
            or not same_value(base.metadata.value(), self.metadata)
        )

    def has_history_changes(self, token: str) -> bool:
        """Whether edits or removals are pending for storage `token`."""
        base = self._known().get(token)
        if base is None:
            return False
        pending = replay(base, self._log[base.log_at - self._log_start :])
        return bool(pending.edits or pending.removed)

    def touched_ids(self, token: str) -> set[str]:
        """The ids of the stored messages a save to storage `token` touches: those it
        edits or removes, and every one a save of unknown outcome sent (stored or not).
        A rebase on a part of the history holding them all writes what a rebase on the
        whole would.

        Raises:
            InvalidDataError, SessionConflictError: as plan_save.
        """
        plan = self.plan_save(token)
        touched = {edit.current.message_id for edit in plan.edits}
        touched.update(message.message_id for message in plan.removals)
        if plan.unconfirmed is not None:
            touched.update(plan.unconfirmed.appended, plan.unconfirmed.edited)
        return touched

    def has_unconfirmed_saves(self, token: str) -> bool:
        """Whether a save to storage `token` whose outcome is unknown may have landed."""
        base = self._known().get(token)
        return base is not None and not base.certain

    def note_stored_status(self, token: str, status: Status) -> None:
        """Records a status the store set by itself (an expiry sweep), without a save.

        The object's own status is left alone: if it differs, the next save writes it.
        """
        base = self._known().get(token)
        if base is not None:
            base.status = status
            base.exact = False

    def _unpin(self, held: Base | None) -> None:
        if held is not None and held.log_at in self._private()["_pins"]:
            self._growing("_pins").remove(held.log_at)

    def _trim_log(self) -> None:
        private = self._private()
        log: Sequence[LogEntry] = private["_log"]
        needed = [base.log_at for base in self._known().values()]
        needed += private["_pins"]
        if not needed:
            private["_log_start"] += len(log)
            private["_log"] = ()
            return
        oldest = min(needed)
        drop = oldest - private["_log_start"]
        if drop > 0:
            del self._growing("_log")[:drop]
            private["_log_start"] = oldest


def _reapplied(edit: Edit, stored: ChatMessage) -> ChatMessage:
    """`stored` with what this holder changed of it: its content, its metadata, or both.

    Found by attack: a manager resolving a conflict wrote back the metadata another
    writer had changed, of a message it had edited only the content of.
    """
    if edit.content_changed and edit.metadata_changed:
        return edit.current
    if edit.content_changed:
        return stored.model_copy(update={"content": edit.current.content})
    if edit.metadata_changed:
        return stored.model_copy(update={"metadata": edit.current.metadata})
    return stored


def _check_new_messages(session_id: str, messages: tuple[ChatMessage, ...]) -> None:
    """Refuses new messages that belong to another session or repeat an id.

    Raises:
        InvalidDataError: naming the message.
    """
    seen: set[str] = set()
    for message in messages:
        if message.session_id != session_id:
            raise InvalidDataError(
                f"message {message.message_id!r} has session_id {message.session_id!r},"
                f" not {session_id!r}"
            )
        if message.message_id in seen:
            raise InvalidDataError(f"message_id {message.message_id!r} appears twice")
        seen.add(message.message_id)
        _check_message_metadata(message)


def _check_message_metadata(message: ChatMessage) -> None:
    """Checks a message's metadata again, and freezes it where it is not frozen.

    A message made past the model's validation (`model_construct`, `model_copy`'s
    `update`) carries its metadata unchecked and changeable: checked, a value no
    backend can keep never reaches the driver; frozen, no change made in place after
    this save is silently left unsaved (found by attack).
    """
    metadata = message.metadata
    if not isinstance(metadata, dict):
        # Found by attack: model_construct(metadata=[1]) failed with an AttributeError
        # naming nothing, and [] or 0 were stored as {}.
        raise InvalidDataError(
            f"message {message.message_id!r} metadata: expected a JSON object, got"
            f" {type(metadata).__name__}"
        )
    if metadata:
        check_json_object(metadata, f"message {message.message_id!r} metadata")
    if type(metadata) is not FrozenDict:
        message.__dict__["metadata"] = freeze(metadata)


def _refuse_changed_id(base: Base, session_id: str) -> None:
    if base.session_id != session_id:
        # Found by audit: the save looked for the new id's row, found none, and said the
        # session had been deleted (and SessionManager cached it under the new id).
        raise InvalidDataError(
            f"session_id: this object was loaded or saved as {base.session_id!r} and now"
            f" says {session_id!r}; a session's id never changes (create a new session"
            " under the other id)"
        )
