"""Documents <-> domain models, as pure functions.

On the way out, views become domain objects without re-validation: the validation
on the way in already guarantees every value. Every session read carries the
bookkeeping of that load (revision, incarnation, a snapshot of the metadata).
"""

from __future__ import annotations

import copy
import json
import uuid
from typing import Any

from persistence.changes import Snapshot
from persistence.models import ChatMessage, ChatSession, UploadedFileRecord
from persistence.mongo.documents import FileRecordView, MessageDocument, SessionSummary, SessionView


def document_from_message(message: ChatMessage) -> dict[str, Any]:
    """The embedded form of a message: its session is the document it lives in."""
    return {
        "message_id": message.message_id,
        "role": message.role,
        "content": message.content,
        "created_at": message.created_at,
        "metadata": message.metadata,
    }


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
        "incarnation": uuid.uuid4().hex if incarnation is None else incarnation,
    }


def metadata_snapshot(metadata: dict[str, Any]) -> Snapshot:
    """The stored metadata as a snapshot the loaded object does not share.

    JSON text costs less than a deep copy and is parsed only if a save needs it; the
    values the models accept (JSON objects) survive it exactly.
    """
    if not metadata:
        return Snapshot(value={})
    try:
        return Snapshot(text=json.dumps(metadata))
    except (TypeError, ValueError):
        # A value some other tool stored that JSON cannot carry: copy it instead.
        return Snapshot(value=copy.deepcopy(metadata))


def message_from_document(session_id: str, document: MessageDocument) -> ChatMessage:
    return ChatMessage.model_construct(
        message_id=document.message_id,
        session_id=session_id,
        role=document.role,
        content=document.content,
        created_at=document.created_at,
        metadata=document.metadata,
    )


def session_from_view(view: SessionSummary, token: str) -> ChatSession:
    """A session as storage `token` holds it, with the bookkeeping of that load.

    A summary (a listing) carries no history; a view may carry only the newest
    messages (`last=`): `message_count` is always the stored count.
    """
    history = view.messages if isinstance(view, SessionView) else []
    session = ChatSession.model_construct(
        session_id=view.session_id,
        model=view.model,
        created_at=view.created_at,
        updated_at=view.updated_at,
        message_count=view.message_count,
        messages=[message_from_document(view.session_id, m) for m in history],
        metadata=view.metadata,
        status=view.status,
    )
    session.loaded_from(
        token,
        view.revision,
        view.incarnation,
        metadata_snapshot(view.metadata),
        view.message_count - len(history),
    )
    return session


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
    return UploadedFileRecord.model_construct(
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
