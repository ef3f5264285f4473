"""Beanie documents: one session document with its messages embedded, one per file record.

A session is one document, so one read loads a whole conversation and one update
appends to it atomically. Its `_id` is the session id; a file record's is its file id.

Beanie binds a document class to one database, so every storage binds its own
subclasses (`bind_documents`): two storages on two databases never share a class.
The `*View` models are what reads project into; unlike Beanie documents they can be
built without a server, which keeps the mapping testable.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, ClassVar

from beanie import Document
from pydantic import BaseModel, ConfigDict, Field
from pymongo import ASCENDING, DESCENDING, IndexModel

from persistence.models import Role, Status

SESSIONS_COLLECTION = "chat_sessions"
FILES_COLLECTION = "uploaded_files"
# Documents written before revisions carry neither field: they read as revision 1 of a
# fixed incarnation, and their first write stores both (API.md, Writes).
LEGACY_REVISION = 1
LEGACY_INCARNATION = ""

# The domain models validate on the way in; reads trust what was written.
_VIEW_CONFIG = ConfigDict(populate_by_name=True, extra="ignore")

SESSION_INDEXES = [
    # list_sessions(status=...): equality on status, then the page order.
    IndexModel(
        [("status", ASCENDING), ("updated_at", DESCENDING), ("_id", DESCENDING)],
        name="ix_chat_sessions_status_updated",
    ),
    # list_sessions() without a status, in the same order.
    IndexModel([("updated_at", DESCENDING), ("_id", DESCENDING)], name="ix_chat_sessions_updated"),
    # A message id is stored once in the whole store, as the SQL primary key has it.
    # Partial, so sessions without messages (no key at all) do not collide on null.
    IndexModel(
        [("messages.message_id", ASCENDING)],
        name="ux_chat_sessions_message_id",
        unique=True,
        partialFilterExpression={"messages.message_id": {"$exists": True}},
    ),
    # Search: each message's `search_tokens` (persistence.search), multikey; a query's
    # terms are ranges (prefixes) and equalities on them, so the index bounds them.
    IndexModel([("messages.search_tokens", ASCENDING)], name="ix_chat_sessions_search_tokens"),
]

FILE_INDEXES = [
    IndexModel([("expires_at", ASCENDING)], name="ix_uploaded_files_expires_at"),
    IndexModel(
        [("uploaded_at", DESCENDING), ("_id", DESCENDING)], name="ix_uploaded_files_uploaded"
    ),
]


class MessageDocument(BaseModel):
    """A message as embedded in its session; its position is its index in the array."""

    model_config = _VIEW_CONFIG

    message_id: str
    role: Role
    content: str
    created_at: datetime
    metadata: dict[str, Any] = Field(default_factory=dict)
    # The tokens of the message's search document, written with its content.
    search_tokens: list[str] = Field(default_factory=list, exclude=True)


class SessionDocument(Document):
    """A chat session with every message of its history, in stored order."""

    # The session id is the primary key: no second unique index to keep.
    id: str  # type: ignore[assignment]  # Beanie's default is an ObjectId; ours is the session id.
    model: str
    created_at: datetime
    updated_at: datetime
    message_count: int = 0
    metadata: dict[str, Any] = Field(default_factory=dict)
    status: str = "active"
    messages: list[MessageDocument] = Field(default_factory=list)
    # Incremented by every write; the incarnation is drawn when the document is created,
    # so a session deleted and created again is told apart from the one a holder saw.
    revision: int = LEGACY_REVISION
    incarnation: str = LEGACY_INCARNATION

    class Settings:
        name = SESSIONS_COLLECTION
        indexes = SESSION_INDEXES


class FileRecordDocument(Document):
    """An uploaded-file record."""

    id: str  # type: ignore[assignment]  # Beanie's default is an ObjectId; ours is the file id.
    gemini_file_name: str
    gemini_file_uri: str
    display_name: str
    size: int
    mime_type: str
    uploaded_at: datetime
    expires_at: datetime
    metadata: dict[str, Any] = Field(default_factory=dict)

    class Settings:
        name = FILES_COLLECTION
        indexes = FILE_INDEXES


class SessionSummary(BaseModel):
    """A session's own fields: the projection of a listing, which leaves messages out."""

    model_config = _VIEW_CONFIG

    session_id: str = Field(alias="_id")
    model: str
    created_at: datetime
    updated_at: datetime
    message_count: int
    metadata: dict[str, Any]
    status: Status
    revision: int = LEGACY_REVISION
    incarnation: str = LEGACY_INCARNATION


class SessionView(SessionSummary):
    """A session with its whole history."""

    messages: list[MessageDocument]

    class Settings:
        # Each message without its search tokens: only searches read those.
        projection: ClassVar[dict[str, int]] = {
            **{field.alias or name: 1 for name, field in SessionSummary.model_fields.items()},
            **{
                f"messages.{name}": 1
                for name in MessageDocument.model_fields
                if name != "search_tokens"
            },
        }


class FileRecordView(BaseModel):
    model_config = _VIEW_CONFIG

    file_id: str = Field(alias="_id")
    gemini_file_name: str
    gemini_file_uri: str
    display_name: str
    size: int
    mime_type: str
    uploaded_at: datetime
    expires_at: datetime
    metadata: dict[str, Any]


@dataclass(frozen=True, slots=True)
class DocumentSet:
    """The document classes of one storage, bound to its database by `init_beanie`."""

    sessions: type[SessionDocument]
    files: type[FileRecordDocument]

    @property
    def models(self) -> list[type[Document]]:
        return [self.sessions, self.files]


def bind_documents() -> DocumentSet:
    """Returns fresh subclasses for one storage, so its database binding is its own."""
    sessions = type(SessionDocument.__name__, (SessionDocument,), {"__module__": __name__})
    files = type(FileRecordDocument.__name__, (FileRecordDocument,), {"__module__": __name__})
    return DocumentSet(sessions=sessions, files=files)
