"""Pydantic domain models: what every backend stores and returns unchanged.

Validation here refuses, before any I/O, every value that some backend could not
keep identically (API.md, Round trips), so any store can be migrated to any other.
"""

from __future__ import annotations

import copy
import math
import uuid
from datetime import datetime
from typing import Annotated, Any, Literal, Self

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    field_validator,
)

from persistence.changes import (
    TRACKED_FIELDS,
    Base,
    Edit,
    LogEntry,
    MessageList,
    SavePlan,
    Snapshot,
    merge_metadata,
    metadata_changes,
    replay,
    same_value,
)
from persistence.clock import truncate_to_millisecond, utc_now
from persistence.errors import InvalidDataError

Role = Literal["user", "assistant", "system", "tool"]
Status = Literal["active", "archived", "expired"]
ROLES: tuple[Role, ...] = ("user", "assistant", "system", "tool")
STATUSES: tuple[Status, ...] = ("active", "archived", "expired")

MAX_ID_LENGTH = 255
# MongoDB refuses documents nested deeper than 100 levels; a message's metadata sits
# three levels down in its session document, so every backend stops well before.
MAX_METADATA_DEPTH = 64
# BSON integers are 64-bit; PostgreSQL JSONB and SQLite would keep larger ones.
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
# PostgreSQL JSONB prints an integral float such as 1e16 without exponent or point, so
# it would come back as an int; floats below this magnitude keep their decimal point.
_FLOAT_INTEGRAL_LIMIT = 1e16


def check_text(value: str, field: str) -> str:
    """Refuses text that some backend would alter: NUL characters and lone surrogates.

    Raises:
        InvalidDataError: naming the field.
    """
    if "\x00" in value:
        raise InvalidDataError(
            f"{field}: NUL characters cannot be stored (PostgreSQL refuses them)"
        )
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidDataError(
            f"{field}: lone surrogate characters are not valid UTF-8 and cannot be stored"
        ) from None
    return value


def check_json_object(value: dict[str, Any], field: str) -> dict[str, Any]:
    """Refuses metadata that some backend could not return unchanged.

    Walks iteratively, so hostile nesting cannot exhaust the interpreter's stack.

    Raises:
        InvalidDataError: naming the field and the path of the offending value.
    """
    stack: list[tuple[Any, str, int]] = [(value, field, 1)]
    while stack:
        item, path, depth = stack.pop()
        if isinstance(item, dict):
            if depth > MAX_METADATA_DEPTH:
                raise InvalidDataError(
                    f"{path}: nested deeper than {MAX_METADATA_DEPTH} levels"
                    " (MongoDB cannot keep it)"
                )
            for key, child in item.items():
                if not isinstance(key, str):
                    raise InvalidDataError(f"{path}: key {key!r} is not a string")
                check_text(key, f"{path} key {key!r}")
                if key.startswith("$") or "." in key:
                    raise InvalidDataError(
                        f"{path}: key {key!r} starts with '$' or contains '.',"
                        " which MongoDB cannot keep"
                    )
                stack.append((child, f"{path}.{key}", depth + 1))
        elif isinstance(item, list):
            if depth > MAX_METADATA_DEPTH:
                raise InvalidDataError(f"{path}: nested deeper than {MAX_METADATA_DEPTH} levels")
            stack.extend((child, f"{path}[{i}]", depth + 1) for i, child in enumerate(item))
        elif isinstance(item, str):
            check_text(item, path)
        elif isinstance(item, bool) or item is None:
            continue
        elif isinstance(item, int):
            if not _INT64_MIN <= item <= _INT64_MAX:
                raise InvalidDataError(f"{path}: integer {item} does not fit in 64 bits")
        elif isinstance(item, float):
            if not math.isfinite(item):
                raise InvalidDataError(f"{path}: {item} is not a JSON number")
            if item == 0 and math.copysign(1.0, item) < 0:
                raise InvalidDataError(
                    f"{path}: -0.0 would come back from PostgreSQL as 0.0; store 0.0"
                )
            if item.is_integer() and abs(item) >= _FLOAT_INTEGRAL_LIMIT:
                raise InvalidDataError(
                    f"{path}: float {item!r} would come back from PostgreSQL as an integer;"
                    " store it as an int or a string"
                )
        else:
            raise InvalidDataError(f"{path}: {type(item).__name__} is not a JSON value")
    return value


def _utc_millisecond(value: datetime) -> datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError("datetime must be timezone-aware (a naive datetime is ambiguous)")
    try:
        return truncate_to_millisecond(value.astimezone(utc_now().tzinfo))
    except OverflowError:
        raise ValueError(f"{value.isoformat()} is out of range once converted to UTC") from None


def _identifier(value: str) -> str:
    if not value:
        raise ValueError("must not be empty")
    if len(value) > MAX_ID_LENGTH:
        raise ValueError(f"must be at most {MAX_ID_LENGTH} characters, got {len(value)}")
    return value


UtcDatetime = Annotated[datetime, AfterValidator(_utc_millisecond)]
Identifier = Annotated[str, AfterValidator(_identifier)]


def new_id() -> str:
    """Returns a fresh random identifier (uuid4, hex)."""
    return uuid.uuid4().hex


class _DomainModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @field_validator("*", mode="after")
    @classmethod
    def _faithful(cls, value: Any, info: Any) -> Any:
        if isinstance(value, str):
            return check_text(value, info.field_name)
        if isinstance(value, dict):
            return check_json_object(value, info.field_name)
        return value


class ChatMessage(_DomainModel):
    """One message of a conversation: an immutable record."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    message_id: Identifier = Field(default_factory=new_id)
    session_id: Identifier
    role: Role
    content: str
    created_at: UtcDatetime = Field(default_factory=utc_now)
    metadata: dict[str, Any] = Field(default_factory=dict)


def _message_list(value: list[ChatMessage]) -> MessageList:
    return value if type(value) is MessageList else MessageList(value)


class ChatSession(_DomainModel):
    """A conversation with its ordered messages.

    Its history changes through `add_message`, `edit_message`, `rewind` and
    `pop_message`; the next save writes exactly those changes. For every storage
    that holds it, the object remembers the revision and the values it last loaded
    or saved there (bookkeeping: not part of equality, exports or migration).
    """

    session_id: Identifier = Field(default_factory=lambda: str(uuid.uuid4()))
    model: Annotated[str, Field(min_length=1, max_length=MAX_ID_LENGTH)]
    created_at: UtcDatetime = Field(default_factory=utc_now)
    updated_at: UtcDatetime = Field(default_factory=utc_now)
    message_count: Annotated[int, Field(ge=0, le=_INT64_MAX)] = 0
    messages: Annotated[list[ChatMessage], AfterValidator(_message_list)] = Field(
        default_factory=MessageList
    )
    metadata: dict[str, Any] = Field(default_factory=dict)
    status: Status = "active"

    # Per storage token: what that storage held when this object last loaded or saved.
    _bases: dict[str, Base] = PrivateAttr(default_factory=dict)
    # Edits and cuts since the oldest base, with their absolute log positions.
    _log: list[LogEntry] = PrivateAttr(default_factory=list)
    _log_start: int = PrivateAttr(default=0)
    # Stored messages older than the first one this object carries (a partial load).
    _omitted: int = PrivateAttr(default=0)
    _revision: int | None = PrivateAttr(default=None)
    # Incremented by `rebase`: a plan taken before it no longer describes the list.
    _epoch: int = PrivateAttr(default=0)

    def __eq__(self, other: object) -> bool:
        # Fields only: which storages hold the messages is bookkeeping, not data.
        if not isinstance(other, ChatSession):
            return NotImplemented
        return self.__dict__ == other.__dict__

    __hash__ = None  # type: ignore[assignment]  # mutable, like every pydantic model

    def __setattr__(self, name: str, value: Any) -> None:
        if name != "messages":
            super().__setattr__(name, value)
            return
        old = self.__dict__.get("messages")
        super().__setattr__(name, value)
        new = self.__dict__["messages"]
        if isinstance(old, MessageList) and new is not old:
            # A whole new list: an append if it starts with exactly the old messages.
            new.foreign_changes = old.foreign_changes
            new.first_foreign = old.first_foreign
            for index, message in enumerate(old):
                if index >= len(new) or new[index] is not message:
                    new.mark_foreign(f"the list replaced (position {index} differs)")
                    break

    def __copy__(self) -> Self:
        # A copy is another holder that knows what this one knew: nothing is shared.
        copied = super().__copy__()
        object.__setattr__(copied, "__dict__", dict(self.__dict__))
        copied.__dict__["messages"] = copy.copy(self._messages())
        copied.__dict__["metadata"] = copy.deepcopy(self.metadata)
        object.__setattr__(copied, "__pydantic_private__", None)
        copied._adopt_bookkeeping(self)
        return copied

    def _adopt_bookkeeping(self, source: ChatSession) -> None:
        object.__setattr__(
            self,
            "__pydantic_private__",
            {
                "_bases": {token: base.copy() for token, base in source._bases.items()},
                "_log": list(source._log),
                "_log_start": source._log_start,
                "_omitted": source._omitted,
                "_revision": source._revision,
                "_epoch": source._epoch,
            },
        )

    @classmethod
    def create(
        cls,
        model: str,
        *,
        session_id: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> Self:
        """Starts a new, empty, active session.

        Raises:
            pydantic.ValidationError: if a value cannot be stored faithfully.
        """
        now = utc_now()
        fields: dict[str, Any] = {"model": model, "created_at": now, "updated_at": now}
        if session_id is not None:
            fields["session_id"] = session_id
        if metadata is not None:
            fields["metadata"] = metadata
        return cls(**fields)

    @property
    def revision(self) -> int | None:
        """The stored revision this object last loaded or saved (None: never stored)."""
        return self._revision

    @property
    def omitted_messages(self) -> int:
        """How many older stored messages this object does not carry (`load_session(last=)`)."""
        return self._omitted

    def _messages(self) -> MessageList:
        messages = self.__dict__["messages"]
        if type(messages) is not MessageList:
            # Built without validation (model_construct): track from now on.
            messages = self.__dict__["messages"] = MessageList(messages)
        assert isinstance(messages, MessageList)
        return messages

    def _touch(self) -> None:
        # Always valid: skip validate_assignment on the hot path.
        self.__dict__["updated_at"] = max(utc_now(), self.updated_at)

    def _log_entry(self, entry: LogEntry) -> None:
        if self._bases:
            self._log.append(entry)

    def add_message(
        self, role: str, content: str, metadata: dict[str, Any] | None = None
    ) -> ChatMessage:
        """Appends a message, bumps `message_count` and sets `updated_at` to now.

        Raises:
            pydantic.ValidationError: if the role is unknown or a value cannot be stored.
        """
        message = ChatMessage(
            session_id=self.session_id,
            role=role,
            content=content,
            metadata={} if metadata is None else metadata,
        )
        self._messages().append(message)
        # Both values are valid by construction: skip validate_assignment on the hot path.
        self.__dict__["message_count"] = self.message_count + 1
        self.__dict__["updated_at"] = message.created_at
        return message

    def _index_of(self, message_id: str) -> int:
        messages = self._messages()
        for index in range(len(messages) - 1, -1, -1):
            if messages[index].message_id == message_id:
                return index
        if self._omitted:
            raise InvalidDataError(
                f"message {message_id!r} is not among the {len(messages)} newest messages this"
                f" object carries (it was loaded with last=; {self._omitted} older ones omitted)"
            )
        raise InvalidDataError(f"message {message_id!r} is not in session {self.session_id!r}")

    def edit_message(
        self,
        message_id: str,
        *,
        content: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> ChatMessage:
        """Replaces a message's content and/or metadata; the next save writes the edit.

        The message keeps its id, role, position and `created_at`; `updated_at` is set
        to now.

        Returns:
            The edited copy, now in `messages`.

        Raises:
            InvalidDataError: if the object carries no such message.
            pydantic.ValidationError: if a value cannot be stored faithfully.
        """
        index = self._index_of(message_id)
        messages = self._messages()
        old = messages[index]
        edited = ChatMessage(
            message_id=old.message_id,
            session_id=old.session_id,
            role=old.role,
            content=old.content if content is None else content,
            created_at=old.created_at,
            metadata=old.metadata if metadata is None else metadata,
        )
        list.__setitem__(messages, index, edited)
        self._log_entry(("edit", index, old, edited))
        self._touch()
        return edited

    def rewind(self, message_id: str | None) -> list[ChatMessage]:
        """Keeps the messages up to and including `message_id` (None: keeps none).

        The next save removes the others from the store. On an object loaded with
        `last=`, only messages it carries can be removed.

        Returns:
            The removed messages, oldest first.

        Raises:
            InvalidDataError: if the object carries no such message, or `None` is given
                to an object that does not carry the whole history.
        """
        messages = self._messages()
        if message_id is None:
            if self._omitted:
                raise InvalidDataError(
                    f"rewind(None): this object carries only the newest {len(messages)} of"
                    f" {self._omitted + len(messages)} messages; it cannot remove the"
                    " others (load the whole session to clear it)"
                )
            keep = 0
        else:
            keep = self._index_of(message_id) + 1
        return self._cut(keep)

    def pop_message(self) -> ChatMessage | None:
        """Removes the last message (the next save removes it from the store).

        Returns:
            The removed message, or None if the object carries none.
        """
        messages = self._messages()
        if not messages:
            return None
        return self._cut(len(messages) - 1)[0]

    def _cut(self, keep: int) -> list[ChatMessage]:
        messages = self._messages()
        removed = list(messages[keep:])
        if removed:
            list.__delitem__(messages, slice(keep, None))
            self._log_entry(("cut", keep, None, tuple(removed)))
            self.__dict__["message_count"] = max(self.message_count - len(removed), 0)
            self._touch()
        return removed

    # Bookkeeping: what storages call around their reads and writes.

    def loaded_from(
        self, token: str, revision: int, incarnation: str, metadata: Snapshot, omitted: int = 0
    ) -> None:
        """Records that storage `token` holds this object's state at `revision`.

        `metadata` is the stored metadata as a snapshot the object does not share.
        """
        messages = self._messages()
        self._omitted = omitted
        self._revision = revision
        self._bases[token] = Base(
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
        """
        messages = self._messages()
        base = self._bases.get(token)
        log_at = self._log_start + len(self._log)
        if base is None:
            appends = tuple(messages)
            _check_new_messages(self.session_id, appends)
            return SavePlan(
                session_id=self.session_id,
                revision=None,
                incarnation=None,
                certain=True,
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
                epoch=self._epoch,
            )
        if messages.foreign_changes != base.foreign_at:
            raise InvalidDataError(
                f"session {self.session_id!r}: {messages.first_foreign} directly in"
                " `messages`, which a save cannot express; use add_message, edit_message,"
                " rewind or pop_message, or load the session again"
            )
        pending = replay(base, self._log[base.log_at - self._log_start :])
        appends = tuple(messages[pending.synced :])
        _check_new_messages(self.session_id, appends)
        field_changes = {
            name: (getattr(base, name), self.__dict__[name])
            for name in TRACKED_FIELDS
            if getattr(base, name) != self.__dict__[name]
        }
        stored_metadata = base.metadata.value()
        changes = metadata_changes(stored_metadata, self.metadata)
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
            epoch=self._epoch,
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
    ) -> None:
        """Records that storage `token` confirmed `plan` at `revision`.

        Changes made while the save was in flight stay pending: the new base is the
        object as the plan saw it. `keep_log` keeps what an older base needs (a unit of
        work may still roll back to it).
        """
        self._revision = revision
        if plan.epoch != self._epoch:
            # Rebased while this save was in flight: the plan no longer describes the
            # list. It landed, so the rebased base is behind: the next save checks.
            self.save_failed(token)
            return
        self._bases[token] = Base(
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
        )
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
        """
        plan = self.plan_save(token)
        base = fresh._bases[token].copy()
        removed_ids = {message.message_id for message in plan.removals}
        edited = {edit.current.message_id: edit.current for edit in plan.edits}
        kept: list[ChatMessage] = []
        for message in fresh.messages:
            if message.message_id in removed_ids:
                base.removed[message.message_id] = message
                continue
            current = edited.pop(message.message_id, None)
            if current is not None:
                base.edits[message.message_id] = Edit(message, current)
            kept.append(current or message)
        stored_ids = {message.message_id for message in fresh.messages}
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
        self._bases[token] = base
        self._trim_log()
        return list(edited)

    def stored_updated_at(self, token: str) -> datetime | None:
        """The `updated_at` storage `token` held at this object's last load or save there."""
        base = self._bases.get(token)
        return None if base is None else base.updated_at

    def base_for(self, token: str) -> Base | None:
        """A copy of what storage `token` held of this object (for a unit of work's undo)."""
        base = self._bases.get(token)
        return None if base is None else base.copy()

    def restore_base(self, token: str, base: Base | None) -> None:
        """Puts back a base from `base_for`: the writes since were rolled back."""
        if base is None:
            self._bases.pop(token, None)
        else:
            self._bases[token] = base

    def save_failed(self, token: str) -> None:
        """Records that a save to `token` may or may not have landed: the next one checks."""
        base = self._bases.get(token)
        if base is not None:
            base.certain = False

    def has_changes_for(self, token: str) -> bool:
        """Whether storage `token` lacks something of this object (True if it never held it)."""
        base = self._bases.get(token)
        if base is None or not base.certain:
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
        base = self._bases.get(token)
        if base is None:
            return False
        pending = replay(base, self._log[base.log_at - self._log_start :])
        return bool(pending.edits or pending.removed)

    def note_stored_status(self, token: str, status: Status) -> None:
        """Records a status the store set by itself (an expiry sweep), without a save.

        The object's own status is left alone: if it differs, the next save writes it.
        """
        base = self._bases.get(token)
        if base is not None:
            base.status = status
            base.exact = False

    def _trim_log(self) -> None:
        if not self._bases:
            self._log_start += len(self._log)
            self._log.clear()
            return
        oldest = min(base.log_at for base in self._bases.values())
        drop = oldest - self._log_start
        if drop > 0:
            del self._log[:drop]
            self._log_start = oldest


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


class UploadedFileRecord(_DomainModel):
    """A file uploaded to the model provider, and when it expires there."""

    file_id: Identifier
    gemini_file_name: str
    gemini_file_uri: str
    display_name: str
    size: Annotated[int, Field(ge=0, le=_INT64_MAX)]
    mime_type: str
    uploaded_at: UtcDatetime
    expires_at: UtcDatetime
    metadata: dict[str, Any] = Field(default_factory=dict)
