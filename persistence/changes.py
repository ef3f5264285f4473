"""What a holder changed since it last loaded or saved a session: the plan of a save.

A `ChatSession` keeps, for every storage that holds it, a `Base`: the revision and the
field values it last saw there, how many of its leading messages that storage holds,
and the edits and removals made since. Appends need no record: they are the messages
after the stored prefix. Edits and removals go to a small log with the position they
had, so a save that is in flight while the object changes leaves exactly the later
changes pending. A save takes a `SavePlan` from the object before any I/O and, when
the store confirms it, the `Base` that plan leads to.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from math import copysign
from typing import TYPE_CHECKING, Any, Final, SupportsIndex, TypeVar, overload

from persistence.frozen_metadata import FrozenDict, FrozenList

if TYPE_CHECKING:
    from persistence.models import ChatMessage


class _Missing:
    """A metadata key that is absent (distinct from a key holding None)."""

    _instance: _Missing | None = None

    def __new__(cls) -> _Missing:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "MISSING"

    def __deepcopy__(self, memo: dict[int, Any]) -> _Missing:
        return self


MISSING: Final = _Missing()

# The session fields a save writes as the holder set them (updated_at only moves forward).
TRACKED_FIELDS = ("model", "status", "created_at")


class MessageList(list["ChatMessage"]):
    """A session's history: a list that notices changes the model cannot express.

    Appending is an append. Replacing, inserting, deleting or reordering elements
    directly would leave a save unable to tell what changed, so each such change is
    counted (with the first message it touched) and the next save refuses.
    """

    # Class-level until the first foreign change: a list built for every load and every
    # listed session runs list's own __init__, not a Python one (0.09 us, not 0.41).
    foreign_changes = 0
    first_foreign: str | None = None

    def mark_foreign(self, what: str) -> None:
        self.foreign_changes += 1
        if self.first_foreign is None:
            self.first_foreign = what

    def _describe(self, index: Any) -> str:
        if isinstance(index, slice):
            touched = self[index]
            index = index.start or 0
            if not touched:
                return f"position {index}"
            return f"message {touched[0].message_id!r} (position {index})"
        try:
            return f"message {self[index].message_id!r} (position {index})"
        except (IndexError, TypeError):
            return f"position {index!r}"

    @overload
    def __setitem__(self, index: SupportsIndex, value: ChatMessage) -> None: ...

    @overload
    def __setitem__(self, index: slice, value: Iterable[ChatMessage]) -> None: ...

    def __setitem__(self, index: Any, value: Any) -> None:
        self.mark_foreign(f"{self._describe(index)} replaced")
        super().__setitem__(index, value)

    def __delitem__(self, index: Any) -> None:
        self.mark_foreign(f"{self._describe(index)} deleted")
        super().__delitem__(index)

    def insert(self, index: SupportsIndex, value: ChatMessage) -> None:
        self.mark_foreign(f"message {value.message_id!r} inserted at position {index}")
        super().insert(index, value)

    def remove(self, value: ChatMessage) -> None:
        self.mark_foreign(f"message {getattr(value, 'message_id', value)!r} removed")
        super().remove(value)

    def pop(self, index: SupportsIndex = -1) -> ChatMessage:
        self.mark_foreign(f"{self._describe(index)} popped from the list")
        return super().pop(index)

    def clear(self) -> None:
        self.mark_foreign("the list cleared")
        super().clear()

    def sort(self, *args: Any, **kwargs: Any) -> None:
        self.mark_foreign("the list sorted")
        super().sort(*args, **kwargs)

    def reverse(self) -> None:
        self.mark_foreign("the list reversed")
        super().reverse()

    def __imul__(self, count: SupportsIndex) -> MessageList:
        if int(count) != 1:
            self.mark_foreign("the list repeated")
        super().__imul__(count)
        return self

    def __copy__(self) -> MessageList:
        copied = MessageList(self)
        copied.foreign_changes, copied.first_foreign = self.foreign_changes, self.first_foreign
        return copied

    def __reduce_ex__(self, protocol: SupportsIndex) -> Any:
        return (_rebuild_list, (list(self), self.foreign_changes, self.first_foreign))


def _rebuild_list(items: list[ChatMessage], changes: int, first: str | None) -> MessageList:
    rebuilt = MessageList(items)
    rebuilt.foreign_changes, rebuilt.first_foreign = changes, first
    return rebuilt


class Snapshot:
    """A metadata object as a store held it, apart from the holder's own mutable copy.

    Loads keep the JSON text the row carried and parse it only if a save needs it, so a
    page of sessions pays no copy for bookkeeping.
    """

    __slots__ = ("_text", "_value")

    def __init__(self, *, text: str | None = None, value: dict[str, Any] | None = None) -> None:
        self._text = text
        self._value = value

    def value(self) -> dict[str, Any]:
        """The snapshot's object; never mutate it."""
        if self._value is None:
            self._value = json.loads(self._text or "{}")
        return self._value


@dataclass(frozen=True, slots=True)
class Edit:
    """A stored message as the store holds it (`original`) and as this holder made it."""

    original: ChatMessage
    current: ChatMessage

    @property
    def content_changed(self) -> bool:
        return self.current.content != self.original.content

    @property
    def metadata_changed(self) -> bool:
        # Not `!=`: Python takes 1, 1.0 and True for one value, the stores do not. Found
        # by attack: an edit of {"k": 1} to {"k": True} was never written.
        return not same_value(self.current.metadata, self.original.metadata)


@dataclass(slots=True)
class Unconfirmed:
    """What saves whose outcome is unknown sent since a base: any of it may be stored.

    Per field, metadata key and message, every value such a save sent (a message's
    versions: as appended or as edited), so the next save takes each of them for this
    holder's own work, not another writer's, and writes what the holder holds now.
    """

    fields: dict[str, list[Any]] = field(default_factory=dict)
    metadata: dict[str, list[Any]] = field(default_factory=dict)
    # Messages sent as new (they may be stored or not), and versions sent as edits.
    appended: dict[str, list[ChatMessage]] = field(default_factory=dict)
    edited: dict[str, list[ChatMessage]] = field(default_factory=dict)

    def add(self, plan: SavePlan) -> None:
        for name, (_old, new) in plan.field_changes.items():
            self.fields.setdefault(name, []).append(new)
        for key, (_old, new) in plan.metadata_changes.items():
            self.metadata.setdefault(key, []).append(new)
        for message in plan.appends:
            self.appended.setdefault(message.message_id, []).append(message)
        for edit in plan.edits:
            versions = self.appended if edit.current.message_id in self.appended else self.edited
            versions.setdefault(edit.current.message_id, []).append(edit.current)

    def copy(self) -> Unconfirmed:
        return Unconfirmed(
            {name: list(values) for name, values in self.fields.items()},
            {key: list(values) for key, values in self.metadata.items()},
            {key: list(values) for key, values in self.appended.items()},
            {key: list(values) for key, values in self.edited.items()},
        )

    def versions(self, message_id: str) -> list[ChatMessage]:
        """The versions of a message these saves sent (none: they did not touch it)."""
        return self.appended.get(message_id, []) + self.edited.get(message_id, [])


@dataclass(frozen=True, slots=True)
class Creation:
    """A creation of unknown outcome in one storage: it may have landed, and so may
    the attempts that retried it since (each merges into the session it finds)."""

    # The incarnation it sent; every later attempt creates the session with it too.
    incarnation: str
    # The plans the attempts sent, first to last.
    attempts: tuple[SavePlan, ...]

    def plus(self, plan: SavePlan) -> Creation:
        """With one more attempt of unknown outcome, `plan`."""
        return Creation(self.incarnation, (*self.attempts, plan))

    def sent(self) -> Unconfirmed:
        """Every value the attempts sent, as saves of unknown outcome since a base from
        before the session existed: any of it may be stored."""
        keys = {key for plan in self.attempts for key in plan.metadata}
        appended: dict[str, list[ChatMessage]] = {}
        for plan in self.attempts:
            for message in plan.appends:
                appended.setdefault(message.message_id, []).append(message)
        return Unconfirmed(
            fields={
                name: [getattr(plan, name) for plan in self.attempts] for name in TRACKED_FIELDS
            },
            metadata={
                key: [plan.metadata.get(key, MISSING) for plan in self.attempts] for key in keys
            },
            appended=appended,
        )

    def if_landed(self, plan: SavePlan, sent: Unconfirmed) -> SavePlan:
        """`plan`, a new object's retrying this creation, as the save of the session the
        creation made, should the store hold it: its base is the store before the
        creation (revision 0), and what the attempts sent (`sent`) is this holder's own.

        Found by attack: the retry merged as a new object does, so it dropped the
        holder's edits and removals since, and put back fields and metadata keys
        another writer had changed since (no conflict).
        """
        first = self.attempts[0]
        return replace(
            plan,
            revision=0,
            certain=False,
            exact=False,
            field_changes={
                name: (getattr(first, name), getattr(plan, name)) for name in TRACKED_FIELDS
            },
            metadata_changes={
                key: (first.metadata.get(key, MISSING), plan.metadata.get(key, MISSING))
                for key in sent.metadata.keys() | plan.metadata.keys()
            },
            unconfirmed=sent,
        )


@dataclass(slots=True, eq=False)
class Uncommitted:
    """Shared by the bases a unit of work's reads made from its own writes: `void` once
    the unit ends without a commit (their state may never have been stored)."""

    void: bool = False


@dataclass(slots=True)
class Base:
    """What one storage held of a session when this object last loaded or saved it there."""

    # The id it was loaded or saved under: a session's id never changes.
    session_id: str
    revision: int
    incarnation: str
    # The fields equal the store's at `revision` (False after a save merged others' work).
    exact: bool
    # False after a save that failed in a way that may have landed: check, do not assume.
    certain: bool
    model: str
    status: str
    created_at: datetime
    updated_at: datetime
    metadata: Snapshot
    # The object's first `synced` messages are stored there (as of log position `log_at`).
    synced: int
    log_at: int
    foreign_at: int
    edits: dict[str, Edit] = field(default_factory=dict)
    removed: dict[str, ChatMessage] = field(default_factory=dict)
    # What saves whose outcome is unknown sent since (None: none did; made on the first,
    # as a base is made on every save).
    unconfirmed: Unconfirmed | None = None
    # How many messages the store had removed from the session by `revision` (SQL: its
    # next position less its count), or fewer: never more, which would hide a removal
    # another writer made since (`conflicts`).
    removals: int = 0
    # Read inside a unit of work from its own writes to the session (None: not so). Shared
    # with the copies of the object: if the unit does not commit, none of them may save.
    uncommitted: Uncommitted | None = None

    @property
    def void(self) -> bool:
        """Whether the state it describes may never have been stored (`uncommitted`)."""
        return self.uncommitted is not None and self.uncommitted.void

    def copy(self) -> Base:
        return replace(
            self,
            edits=dict(self.edits),
            removed=dict(self.removed),
            unconfirmed=None if self.unconfirmed is None else self.unconfirmed.copy(),
        )


Source = TypeVar("Source")
# Makes the base of a loaded session from what its storage read, when first needed:
# base_of(source, synced, foreign_at) (ChatSession.from_store).
BaseOf = Callable[[Source, int, int], Base]


# Log entries: ("edit", index, old, new) and ("cut", index, removed messages).
LogEntry = tuple[str, int, Any, Any]


@dataclass(frozen=True, slots=True)
class SavePlan:
    """Everything one save sends, taken from the object before any I/O."""

    session_id: str
    # None: this holder never loaded or saved the session in this storage (a new object).
    revision: int | None
    incarnation: str | None
    certain: bool
    exact: bool
    model: str
    status: str
    created_at: datetime
    updated_at: datetime
    metadata: dict[str, Any]
    field_changes: Mapping[str, tuple[Any, Any]]
    metadata_changes: Mapping[str, tuple[Any, Any]]
    edits: tuple[Edit, ...]
    removals: tuple[ChatMessage, ...]
    appends: tuple[ChatMessage, ...]
    updated_at_changed: bool
    # Where the object stood when the plan was taken, for the base a success leads to.
    messages_sent: int
    log_at: int
    foreign_at: int
    epoch: int
    # What saves whose outcome is unknown sent since the base (None: the base is certain).
    unconfirmed: Unconfirmed | None = None
    # A new object retrying a creation of unknown outcome: this plan as the save of the
    # session that creation made (`Creation.if_landed`), for the store to write if it
    # holds that session.
    if_landed: SavePlan | None = None
    # The base's `removals`.
    base_removals: int = 0

    @property
    def is_new(self) -> bool:
        return self.revision is None

    @property
    def appends_only(self) -> bool:
        """Only new messages (and `updated_at`): nothing that can conflict."""
        return not (self.field_changes or self.metadata_changes or self.edits or self.removals)

    @property
    def writes_nothing(self) -> bool:
        return self.appends_only and not self.appends and not self.updated_at_changed


def resolve_unconfirmed(plan: SavePlan, stored_ids: Collection[str]) -> SavePlan:
    """`plan` once the store said which of its new and unconfirmed messages it holds.

    A message an unconfirmed save sent as new and the store holds (`stored_ids`) is no
    longer new: the holder's version is sent as an edit (unless it is every version
    sent), or, if the holder removed it since, it is removed. New messages the store
    holds otherwise are not sent again. `conflicts` takes any version an unconfirmed
    save sent for this holder's own.
    """
    if not stored_ids:
        return plan
    unconfirmed = plan.unconfirmed or Unconfirmed()
    current = {message.message_id: message for message in plan.appends}
    edits = [
        Edit(sent[0], message)
        for message_id, message in current.items()
        if message_id in stored_ids
        and (sent := unconfirmed.appended.get(message_id))
        and not all(_same_message(version, message) for version in sent)
    ]
    removals = [
        sent[0]
        for message_id, sent in unconfirmed.appended.items()
        if message_id in stored_ids and message_id not in current
    ]
    return replace(
        plan,
        edits=(*plan.edits, *edits),
        removals=(*plan.removals, *removals),
        appends=tuple(m for m in plan.appends if m.message_id not in stored_ids),
    )


@dataclass(slots=True)
class Pending:
    """A base with the logged changes since it replayed: what a save must send."""

    synced: int
    edits: dict[str, Edit]
    removed: dict[str, ChatMessage]


def replay(base: Base, entries: Iterable[LogEntry]) -> Pending:
    """Applies the edits and cuts logged since `base` to what it knows is stored."""
    synced = base.synced
    edits = dict(base.edits)
    removed = dict(base.removed)
    for kind, index, first, second in entries:
        if kind == "edit":
            if index < synced:
                old: ChatMessage = first
                known = edits.get(old.message_id)
                edits[old.message_id] = Edit(known.original if known else old, second)
        else:
            for offset, message in enumerate(second):
                if index + offset < synced:
                    known = edits.pop(message.message_id, None)
                    removed[message.message_id] = known.original if known else message
            synced = min(synced, index)
    return Pending(synced, edits, removed)


_PLAIN: dict[type, type] = {FrozenDict: dict, FrozenList: list}


def same_value(left: Any, right: Any) -> bool:
    """JSON equality that tells 1, 1.0 and True apart, as every backend stores them (a
    message's frozen metadata is the same value as the plain one read back), and 0.0
    from -0.0 (found by attack: -0.0 put in place of 0.0 was no change, so the save
    neither wrote it nor refused it, as it refuses -0.0 anywhere else)."""
    left_type, right_type = type(left), type(right)
    if _PLAIN.get(left_type, left_type) is not _PLAIN.get(right_type, right_type):
        return False
    if isinstance(left, dict):
        return left.keys() == right.keys() and all(same_value(left[k], right[k]) for k in left)
    if isinstance(left, list):
        return len(left) == len(right) and all(map(same_value, left, right))
    if left_type is float and left == 0.0:
        return bool(right == 0.0 and copysign(1.0, left) == copysign(1.0, right))
    return bool(left == right)


def metadata_changes(
    before: Mapping[str, Any], after: Mapping[str, Any]
) -> dict[str, tuple[Any, Any]]:
    """Per top-level key: (value before or MISSING, value after or MISSING), changed keys only."""
    changes: dict[str, tuple[Any, Any]] = {}
    for key in before.keys() | after.keys():
        old, new = before.get(key, MISSING), after.get(key, MISSING)
        if not same_value(old, new):
            changes[key] = (old, new)
    return changes


def merge_metadata(
    stored: Mapping[str, Any], changes: Mapping[str, tuple[Any, Any]]
) -> dict[str, Any]:
    """The stored metadata with this holder's per-key changes applied."""
    merged = dict(stored)
    for key, (_old, new) in changes.items():
        if new is MISSING:
            merged.pop(key, None)
        else:
            merged[key] = new
    return merged


def conflicts(
    plan: SavePlan,
    stored_fields: Mapping[str, Any],
    stored_metadata: Mapping[str, Any],
    stored_messages: Mapping[str, ChatMessage],
    stored_revision: int,
    *,
    anything_removed: bool = True,
) -> list[str]:
    """What this holder and another writer both changed since the holder's base.

    A value another writer set to exactly what this holder sets is no conflict.
    `stored_messages` holds the stored versions of the edited and removed messages
    (absent: removed by another writer).

    A field or metadata key that a save of unknown outcome sent, found back at its old
    value after two or more writes, is a conflict too: that save may have landed and
    another writer set the value back since (found by attack: the next save silently
    undid that writer's change). After one write it is certain: had it been that save,
    the value would be the one it sent. So is a message such a save sent that the store
    lacks (`maybe_removed`), unless no message of the session was removed since the base
    (`anything_removed` False: SQL counts the removals, its next position less its
    message count, and the count is the base's).
    """
    sent = plan.unconfirmed or Unconfirmed()
    undone = plan.revision is not None and stored_revision >= plan.revision + 2
    found: list[str] = []
    for name, (old, new) in plan.field_changes.items():
        value, values_sent = stored_fields[name], sent.fields.get(name, [])
        if value not in (old, new, *values_sent) or (
            undone and _reverted(value, old, new, values_sent)
        ):
            found.append(name)
    for key, (old, new) in plan.metadata_changes.items():
        value, values_sent = stored_metadata.get(key, MISSING), sent.metadata.get(key, [])
        if not any(same_value(value, mine) for mine in (old, new, *values_sent)) or (
            undone and _reverted(value, old, new, values_sent)
        ):
            found.append(f"metadata[{key!r}]")
    for edit in plan.edits:
        stored = stored_messages.get(edit.original.message_id)
        ours = (edit.original, edit.current, *sent.versions(edit.original.message_id))
        if stored is None:
            found.append(f"message {edit.original.message_id!r} (removed by another writer)")
        elif not any(_same_message(stored, version) for version in ours):
            found.append(f"message {edit.original.message_id!r} (edited by another writer)")
    for original in plan.removals:
        stored = stored_messages.get(original.message_id)
        ours = (original, *sent.versions(original.message_id))
        if stored is not None and not any(_same_message(stored, version) for version in ours):
            found.append(f"message {original.message_id!r} (edited by another writer)")
    if plan.revision is not None and anything_removed:
        found += maybe_removed(plan, stored_revision - plan.revision)
    return found


def maybe_removed(plan: SavePlan, writes: int) -> list[str]:
    """The messages saves of unknown outcome sent that the store lacks, once `writes`
    writes since the base leave it unknown whether they landed: one may have, and
    another writer removed them since; sending them again would bring them back.

    `plan` is resolved (`resolve_unconfirmed`): its appends are the messages the store
    lacks. After one write it is certain they never landed: had that write been such a
    save, it would hold them. The price, as for fields, is a conflict where the save
    was lost and two other writes came meanwhile, one of them a removal on SQL (found
    by the faults test: in a session others append to, every lost save conflicted), or
    a removal by one of the holder's own saves of unknown outcome that landed.
    """
    if writes < 2 or plan.unconfirmed is None:
        return []
    sent = plan.unconfirmed.appended
    return [
        f"message {message.message_id!r} (sent by a save of unknown outcome, not stored:"
        " another writer may have removed it)"
        for message in plan.appends
        if message.message_id in sent
    ]


def _reverted(stored: Any, old: Any, new: Any, sent: Sequence[Any]) -> bool:
    """Whether `stored` may be a value saves of unknown outcome replaced, set back by
    another writer: the base's `old` value, which they replaced (none of them sent
    it), or one of theirs that a later one replaced (not the last they sent).

    Found by attack: a creation's attempts sent "a" then "b", both landed, and another
    writer set "a" back; "a" was taken for the holder's own and the next save wrote
    "b" over it.
    """
    if not sent or same_value(stored, sent[-1]) or same_value(stored, new):
        return False
    return same_value(stored, old) or any(same_value(stored, value) for value in sent[:-1])


def _same_message(left: ChatMessage, right: ChatMessage) -> bool:
    return left.content == right.content and same_value(left.metadata, right.metadata)
