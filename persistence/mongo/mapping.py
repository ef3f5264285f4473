"""Documents <-> domain models, as pure functions.

On the way out, views become domain objects without re-validation: the validation
on the way in already guarantees every value. Every session read carries the
bookkeeping of that load (revision, incarnation, a snapshot of the metadata).
"""

from __future__ import annotations

import pickle
from typing import Any

from persistence.changes import Base, MessageList, Snapshot
from persistence.frozen_metadata import freeze
from persistence.identifiers import new_incarnation
from persistence.models import ChatMessage, ChatSession, UploadedFileRecord
from persistence.mongo.documents import FileRecordView, MessageDocument, SessionSummary, SessionView
from persistence.search import search_document


def document_from_message(message: ChatMessage) -> dict[str, Any]:
    """The embedded form of a message: its session is the document it lives in."""
    return {
        "message_id": message.message_id,
        "role": message.role,
        "content": message.content,
        "created_at": message.created_at,
        "metadata": message.metadata,
        "search_tokens": search_tokens(message.content),
    }


def search_tokens(content: str) -> list[str]:
    """A message's search document as the tokens its embedded form holds."""
    return search_document(content).split()


def document_from_session(session: ChatSession, incarnation: str | None = None) -> dict[str, Any]:
    """The whole document of a new session: revision 1 of a fresh incarnation."""
    return {
        "_id": session.session_id,
        "model": session.model,
        "created_at": session.created_at,
        "updated_at": session.updated_at,
        "metadata": session.metadata,
        "status": session.status,
        "message_count": len(session.messages),
        "messages": [document_from_message(message) for message in session.messages],
        "revision": 1,
        "incarnation": new_incarnation() if incarnation is None else incarnation,
    }


class _PickledSnapshot(Snapshot):
    """Stored metadata kept as pickle bytes of our own making, unpickled if a save needs it."""

    __slots__ = ("_loaded", "_pickled")

    def __init__(self, pickled: bytes) -> None:
        super().__init__()
        self._pickled = pickled
        self._loaded: dict[str, Any] | None = None

    def value(self) -> dict[str, Any]:
        if self._loaded is None:
            self._loaded = pickle.loads(self._pickled)  # noqa: S301  # bytes pickled just above
        return self._loaded


def metadata_snapshot(metadata: dict[str, Any]) -> Snapshot:
    """The stored metadata as a snapshot the loaded object does not share.

    Pickling costs a fraction of a deep copy (or of JSON text), keeps every type
    exactly, and the copy is made only if a save needs it: a page of sessions pays
    a few microseconds each for its bookkeeping.
    """
    if not metadata:
        return Snapshot(value={})
    return _PickledSnapshot(pickle.dumps(metadata, pickle.HIGHEST_PROTOCOL))


def message_from_document(session_id: str, document: MessageDocument) -> ChatMessage:
    return ChatMessage.trusted(
        message_id=document.message_id,
        session_id=session_id,
        role=document.role,
        content=document.content,
        created_at=document.created_at,
        metadata=freeze(document.metadata),
    )


def session_from_view(view: SessionSummary, token: str) -> ChatSession:
    """A session as storage `token` holds it, with the bookkeeping of that load.

    A summary (a listing) carries no history; a view may carry only the newest
    messages (`last=`): `message_count` is always the stored count.
    """
    history = view.messages if isinstance(view, SessionView) else []
    return ChatSession.from_store(
        {
            "session_id": view.session_id,
            "model": view.model,
            "created_at": view.created_at,
            "updated_at": view.updated_at,
            "message_count": view.message_count,
            "messages": MessageList(message_from_document(view.session_id, m) for m in history),
            "metadata": view.metadata,
            "status": view.status,
        },
        token,
        view.revision,
        _base_of_view,
        (view, metadata_snapshot(view.metadata)),
        None if isinstance(view, SessionView) else (view.updated_at, view.session_id),
    )


def _base_of_view(source: tuple[SessionSummary, Snapshot], synced: int, foreign_at: int) -> Base:
    """The base session_from_view records: the view as read, with the snapshot of its
    metadata taken at the load (the loaded object holds the view's own dict)."""
    view, metadata = source
    return Base(
        session_id=view.session_id,
        revision=view.revision,
        incarnation=view.incarnation,
        exact=True,
        certain=True,
        model=view.model,
        status=view.status,
        created_at=view.created_at,
        updated_at=view.updated_at,
        metadata=metadata,
        synced=synced,
        log_at=0,
        foreign_at=foreign_at,
    )


def document_from_file_record(record: UploadedFileRecord) -> dict[str, Any]:
    return {
        "_id": record.file_id,
        "gemini_file_name": record.gemini_file_name,
        "gemini_file_uri": record.gemini_file_uri,
        "display_name": record.display_name,
        "size": record.size,
        "mime_type": record.mime_type,
        "uploaded_at": record.uploaded_at,
        "expires_at": record.expires_at,
        "metadata": record.metadata,
    }


def file_record_from_view(view: FileRecordView) -> UploadedFileRecord:
    return UploadedFileRecord.trusted(
        file_id=view.file_id,
        gemini_file_name=view.gemini_file_name,
        gemini_file_uri=view.gemini_file_uri,
        display_name=view.display_name,
        size=view.size,
        mime_type=view.mime_type,
        uploaded_at=view.uploaded_at,
        expires_at=view.expires_at,
        metadata=view.metadata,
    )
