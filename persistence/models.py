"""Pydantic domain models: what every backend stores and returns unchanged.

Validation here refuses, before any I/O, every value that some backend could not
keep identically (API.md, Round trips), so any store can be migrated to any other.
"""

from __future__ import annotations

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


class ChatSession(_DomainModel):
    """A conversation with its ordered messages."""

    session_id: Identifier = Field(default_factory=lambda: str(uuid.uuid4()))
    model: Annotated[str, Field(min_length=1, max_length=MAX_ID_LENGTH)]
    created_at: UtcDatetime = Field(default_factory=utc_now)
    updated_at: UtcDatetime = Field(default_factory=utc_now)
    message_count: Annotated[int, Field(ge=0, le=_INT64_MAX)] = 0
    messages: list[ChatMessage] = Field(default_factory=list)
    metadata: dict[str, Any] = Field(default_factory=dict)
    status: Status = "active"

    # Which leading messages each storage already holds: storage token -> (count, last id).
    # It lets a save send only the new messages without reading the history back.
    _stored: dict[str, tuple[int, str | None]] = PrivateAttr(default_factory=dict)

    def __eq__(self, other: object) -> bool:
        # Fields only: which storages hold the messages is bookkeeping, not data.
        if not isinstance(other, ChatSession):
            return NotImplemented
        return self.__dict__ == other.__dict__

    __hash__ = None  # type: ignore[assignment]  # mutable, like every pydantic model

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
        self.messages.append(message)
        # Both values are valid by construction: skip validate_assignment on the hot path.
        self.__dict__["message_count"] = self.message_count + 1
        self.__dict__["updated_at"] = message.created_at
        return message

    def mark_stored(self, token: str, count: int | None = None) -> None:
        """Records that storage `token` now holds this object's first `count` messages.

        `count` defaults to all of them; a save passes the number it sent, since
        messages appended while it was in flight were not part of it.
        """
        count = len(self.messages) if count is None else count
        last = self.messages[count - 1].message_id if count else None
        self._stored[token] = (count, last)

    def forget_stored(self, token: str) -> None:
        """Records that a save to storage `token` may or may not have landed.

        A commit whose acknowledgement was lost (connection dropped, task cancelled)
        may still have landed, so the next save must check what the store holds.
        """
        self._stored.pop(token, None)

    def stored_marker(self, token: str) -> tuple[int, str | None] | None:
        """Returns what storage `token` is known to hold, to restore after a rollback."""
        return self._stored.get(token)

    def restore_stored_marker(self, token: str, marker: tuple[int, str | None] | None) -> None:
        """Puts back a marker from `stored_marker` (the writes it covered were undone)."""
        if marker is None:
            self._stored.pop(token, None)
        else:
            self._stored[token] = marker

    def unstored_messages(self, token: str) -> tuple[list[ChatMessage], bool]:
        """Returns the messages storage `token` may lack, and whether that is certain.

        Certain means every earlier message is known to be stored there, so the
        returned ones are exactly the new ones; otherwise the caller must check.
        """
        marker = self._stored.get(token)
        if marker is None:
            return list(self.messages), not self.messages
        count, last = marker
        if count and (count > len(self.messages) or self.messages[count - 1].message_id != last):
            return list(self.messages), False
        # A session saved empty is known to hold nothing: its first messages are new.
        return self.messages[count:], True


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
