"""Pydantic domain models: what every backend stores and returns unchanged.

Validation here refuses, before any I/O, every value that some backend could not
keep identically (API.md, Round trips), so any store can be migrated to any other.
"""

from __future__ import annotations

import copy
import uuid
from collections.abc import Mapping, Sequence
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

from persistence.bookkeeping import Bookkeeping
from persistence.changes import Base, BaseOf, Creation, LogEntry, MessageList, Source
from persistence.clock import utc_now
from persistence.errors import InvalidDataError
from persistence.frozen_metadata import EMPTY, FrozenDict, freeze
from persistence.identifiers import random_hex_id
from persistence.model_slots import set_dict, set_extra, set_fields_set, set_private
from persistence.validation import (
    INT64_MAX,
    MAX_ID_LENGTH,
    Identifier,
    UtcDatetime,
    check_json_object,
    check_text,
)

Role = Literal["user", "assistant", "system", "tool"]
Status = Literal["active", "archived", "expired"]
ROLES: tuple[Role, ...] = ("user", "assistant", "system", "tool")
STATUSES: tuple[Status, ...] = ("active", "archived", "expired")


def new_id() -> str:
    """Returns a fresh random identifier (uuid4, hex)."""
    return random_hex_id()


class _DomainModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # pydantic's two ways past validation validate here (found by attack: a message
    # or record made through them reached the driver with its other fields unchecked:
    # SQLite kept a NUL or an int `content` that PostgreSQL refused, a naive time was
    # read as UTC, a size of 1.5 became 1 on PostgreSQL). Loads build from the store's
    # values without either (`trusted`, persistence.sql.mapping).

    # pydantic's mypy plugin declares model_construct per model, with its fields.
    @classmethod  # type: ignore[no-redef]
    def model_construct(  # type: ignore[override]
        cls, _fields_set: set[str] | None = None, **values: Any
    ) -> Self:
        """Validated, as `cls(**values)` is.

        Raises:
            ValidationError: naming the field.
        """
        made = cls.model_validate(values)
        if _fields_set is not None:
            set_fields_set(made, set(_fields_set))
        return made

    @classmethod
    def trusted(cls, **values: Any) -> Self:
        """Built from values a store guarantees valid, unchecked (pydantic's
        `model_construct`)."""
        return super().model_construct(**values)

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Self:
        """A copy (deep: of every value too) with `update` validated, as a new model's
        values are.

        Raises:
            ValidationError: naming the field.
        """
        if not update:
            return super().model_copy(deep=deep)
        values = copy.deepcopy(self.__dict__) if deep else self.__dict__
        return self.model_validate({**values, **update})

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
    # Defaults skip validators: the frozen EMPTY, not a dict (found by attack: a message
    # made without metadata had a plain one, whose change in place no save wrote).
    metadata: dict[str, Any] = Field(default_factory=lambda: EMPTY)

    def __setstate__(self, state: dict[Any, Any]) -> None:
        # A pickle of a release before frozen metadata holds a plain dict (found by
        # attack: its change in place was then silently left unsaved).
        super().__setstate__(state)
        if type(self.__dict__.get("metadata")) is not FrozenDict:
            self.__dict__["metadata"] = freeze(self.__dict__["metadata"])

    @field_validator("metadata", mode="after")
    @classmethod
    def _frozen(cls, value: dict[str, Any]) -> dict[str, Any]:
        # After _faithful's checks (persistence.frozen_metadata says why).
        return freeze(value)


# The fields add_message gives the model (the others are defaults). Shared by every
# message it builds: a frozen model never changes its fields-set.
_MESSAGE_FIELDS_GIVEN = {"session_id", "role", "content", "metadata"}


def _appended_message(
    session_id: str, role: Any, content: Any, metadata: dict[str, Any] | None
) -> ChatMessage:
    """The message `add_message` appends: equal to `ChatMessage(...)` of these values.

    When every value is plainly valid (the case of nearly every call) the message is
    built without pydantic's machinery, after the same checks: a bulk insert makes
    thousands, and validation cost more than all the rest of it. Anything else goes
    through the model, which raises its ValidationError.
    """
    if (
        type(role) is str
        and role in ROLES
        and type(content) is str
        and (metadata is None or type(metadata) is dict)
    ):
        try:
            check_text(content, "content")
            # Checked as validation checks it, then frozen (a deep copy) as it freezes it.
            copied = EMPTY if not metadata else freeze(check_json_object(metadata, "metadata"))
        except InvalidDataError:
            pass  # the model raises it, as a ValidationError
        else:
            message = _new_message(ChatMessage)
            set_dict(
                message,
                {
                    "message_id": random_hex_id(),
                    "session_id": session_id,
                    "role": role,
                    "content": content,
                    "created_at": utc_now(),
                    "metadata": copied,
                },
            )
            set_fields_set(message, _MESSAGE_FIELDS_GIVEN)
            set_extra(message, None)
            set_private(message, None)
            return message
    return ChatMessage(
        session_id=session_id,
        role=role,
        content=content,
        metadata={} if metadata is None else metadata,
    )


_new_message = ChatMessage.__new__


def _message_list(value: list[ChatMessage]) -> MessageList:
    return value if type(value) is MessageList else MessageList(value)


class ChatSession(_DomainModel, Bookkeeping):
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
    message_count: Annotated[int, Field(ge=0, le=INT64_MAX)] = 0
    messages: Annotated[list[ChatMessage], AfterValidator(_message_list)] = Field(
        default_factory=MessageList
    )
    metadata: dict[str, Any] = Field(default_factory=dict)
    status: Status = "active"

    # Per storage token: what that storage held when this object last loaded or saved.
    # Lambdas, not `dict`/`list`: pydantic inspects a builtin factory on every construct.
    _bases: dict[str, Base] = PrivateAttr(default_factory=lambda: {})
    # A base recorded by from_store as (token, base_of, source, synced, foreign_at),
    # made on first use (_known).
    _loaded: tuple[str, BaseOf[Any], Any, int, int] | None = PrivateAttr(default=None)
    # Edits and cuts since the oldest base, with their absolute log positions. This and
    # `_pins` start as the shared (), a list once they grow (bookkeeping's `_growing`):
    # two lists less per session a page builds, for the collector to track.
    _log: Sequence[LogEntry] = PrivateAttr(default=())
    _log_start: int = PrivateAttr(default=0)
    # Stored messages older than the first one this object carries (a partial load).
    _omitted: int = PrivateAttr(default=0)
    _revision: int | None = PrivateAttr(default=None)
    # Incremented by `rebase`: a plan taken before it no longer describes the list.
    _epoch: int = PrivateAttr(default=0)
    # Log positions an open unit of work may roll a base back to (`base_for`): the log
    # from there on is kept until it ends.
    _pins: Sequence[int] = PrivateAttr(default=())
    # Per storage token: a creation of unknown outcome (it may have landed); the next
    # save creates the session with its incarnation, or finds it deleted.
    _creations: dict[str, Creation] = PrivateAttr(default_factory=lambda: {})
    # Where a listing returned it, (updated_at, session_id) as stored then: the place
    # a page after it (list_sessions' `after`) starts, whatever was saved since.
    _listed: tuple[datetime, str] | None = PrivateAttr(default=None)

    def __deepcopy__(self, memo: dict[int, Any] | None = None) -> Self:
        # The base a listing recorded is made first: found by attack, a PostgreSQL
        # listing's (an asyncpg row) could be neither deep-copied nor pickled.
        self._known()
        return super().__deepcopy__(memo)

    def __getstate__(self) -> dict[Any, Any]:
        # The release before the shared () grows `_log` and `_pins` in place: a pickle
        # holds lists, for a cache shared with it in a rolling deploy (found by review).
        self._known()  # found by attack: a PostgreSQL listing's row (asyncpg's) in it
        state: dict[Any, Any] = super().__getstate__()
        private = state.get("__pydantic_private__")
        if private:
            state["__pydantic_private__"] = {
                **private,
                "_log": list(private["_log"]),
                "_pins": list(private["_pins"]),
            }
        return state

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

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Self:
        """A copy as `copy.copy` makes it (deep: `copy.deepcopy`), then `update` assigned
        (validated, as an assignment is).

        `messages` in `update` is assigned as `copied.messages = ...` is, so that a save
        refuses a list that does not start with the old messages. Found by attack:
        pydantic wrote it into the copy unseen, and the save of a history cut so
        returned True, the store keeping every message.
        """
        copied = BaseModel.model_copy(self, deep=deep)
        for name, value in (update or {}).items():
            if name != "messages":
                setattr(copied, name, value)  # validated (validate_assignment)
        if not update or "messages" not in update:
            return copied
        # Measured against this object's messages, which a deep copy copied anew (found
        # by attack: a deep copy's unchanged history was refused, its first differing).
        copied.__dict__["messages"] = copy.copy(self._messages())
        copied.messages = update["messages"]
        return copied

    def _adopt_bookkeeping(self, source: ChatSession) -> None:
        object.__setattr__(
            self,
            "__pydantic_private__",
            {
                "_bases": {token: base.copy() for token, base in source._known().items()},
                "_loaded": None,
                "_log": list(source._log),
                "_log_start": source._log_start,
                "_omitted": source._omitted,
                "_revision": source._revision,
                "_epoch": source._epoch,
                "_pins": (),
                "_creations": dict(source._creations),
                "_listed": source._listed,
            },
        )

    @classmethod
    def from_store(
        cls,
        values: dict[str, Any],
        token: str,
        revision: int,
        base_of: BaseOf[Source],
        source: Source,
        listed: tuple[datetime, str] | None = None,
    ) -> Self:
        """A session as storage `token` holds it, from values the store guarantees valid.

        Builds it as `model_construct` would, with the bookkeeping of that load, without
        pydantic's per-attribute machinery: a page of sessions is built on every list.
        `values["messages"]` is a MessageList of the messages loaded (a listing: none).
        The storage's base is `base_of(source, synced, foreign_at)`, made on first use:
        most listed or loaded sessions are never saved. `source` must not change after
        (a row, or values copied apart from the object's own). `listed`: where a
        listing returned it (list_sessions' `after`).
        """
        messages: MessageList = values["messages"]
        session = cls.__new__(cls)
        set_dict(session, values)
        set_fields_set(session, _SESSION_FIELDS)
        set_extra(session, None)
        set_private(
            session,
            {
                "_bases": {},
                "_loaded": (token, base_of, source, len(messages), messages.foreign_changes),
                "_log": (),
                "_log_start": 0,
                "_omitted": values["message_count"] - len(messages),
                "_revision": revision,
                "_epoch": 0,
                "_pins": (),
                "_creations": {},
                "_listed": listed,
            },
        )
        return session

    def listed_at(self) -> tuple[datetime, str]:
        """Where a page that follows this session starts (list_sessions' `after`): where
        a listing returned it, else where it is now: (updated_at, session_id)."""
        listed = self._listed
        if listed is not None and listed[1] == self.session_id:
            return listed
        return self.updated_at, self.session_id

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
        if self._known():
            self._growing("_log").append(entry)

    def add_message(
        self, role: str, content: str, metadata: dict[str, Any] | None = None
    ) -> ChatMessage:
        """Appends a message, bumps `message_count` and moves `updated_at` forward to now.

        Raises:
            pydantic.ValidationError: if the role is unknown or a value cannot be stored.
        """
        message = _appended_message(self.session_id, role, content, metadata)
        self._messages().append(message)
        # Both values are valid by construction: skip validate_assignment on the hot path.
        self.__dict__["message_count"] = self.message_count + 1
        # Never backwards, as the store keeps it (a clock stepped back by NTP).
        if message.created_at > self.updated_at:
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
            The removed message, or None if the session has none.

        Raises:
            InvalidDataError: the object carries none of the messages the session has (it
                was loaded with `last=0`, or listed): the last one is not here to remove.
        """
        messages = self._messages()
        if not messages:
            if self._omitted:
                # Found by audit: None said the session was empty.
                raise InvalidDataError(
                    f"pop_message(): this object carries none of the session's"
                    f" {self._omitted} messages (loaded with last= or listed); load it with"
                    " its messages to remove the last one"
                )
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


class UploadedFileRecord(_DomainModel):
    """A file uploaded to the model provider, and when it expires there."""

    file_id: Identifier
    gemini_file_name: str
    gemini_file_uri: str
    display_name: str
    # Strict: True, 1.0 or "5" is not a byte count (pydantic's lax mode would take them).
    size: Annotated[int, Field(ge=0, le=INT64_MAX, strict=True)]
    mime_type: str
    uploaded_at: UtcDatetime
    expires_at: UtcDatetime
    metadata: dict[str, Any] = Field(default_factory=dict)


# Shared: every field of a session built from the store is set, so the set never grows.
_SESSION_FIELDS = set(ChatSession.model_fields)
# from_store builds the private state itself: it must name every private attribute.
assert set(ChatSession.__private_attributes__) == {
    "_bases",
    "_loaded",
    "_log",
    "_log_start",
    "_omitted",
    "_revision",
    "_epoch",
    "_pins",
    "_creations",
    "_listed",
}, "ChatSession.from_store must build every private attribute"
