"""Documents <-> domain models, and the update a save sends, as pure functions.

On the way out, views become domain objects without re-validation: the validation
on the way in already guarantees every value.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import bson
from bson import ObjectId

from persistence.errors import InvalidDataError
from persistence.models import ChatMessage, ChatSession, UploadedFileRecord
from persistence.mongo.documents import FileRecordView, MessageDocument, SessionSummary, SessionView
from persistence.mongo.errors import MAX_DOCUMENT_BYTES
from persistence.search import search_document


def session_fields(session: ChatSession) -> dict[str, Any]:
    """The session's own fields, as a save `$set`s them (never the history or its count)."""
    return {
        "model": session.model,
        "created_at": session.created_at,
        "updated_at": session.updated_at,
        "metadata": session.metadata,
        "status": session.status,
    }


def document_from_message(message: ChatMessage) -> dict[str, Any]:
    """The embedded form of a message: its session is the document it lives in."""
    return {
        "message_id": message.message_id,
        "role": message.role,
        "content": message.content,
        "created_at": message.created_at,
        "metadata": message.metadata,
        "search_tokens": search_document(message.content).split(),
    }


def document_from_session(session: ChatSession) -> dict[str, Any]:
    """The whole document of a session whose store holds exactly what it carries."""
    return {
        "_id": session.session_id,
        **session_fields(session),
        "message_count": len(session.messages),
        "messages": [document_from_message(message) for message in session.messages],
    }


def save_filter(
    session_id: str, new: Sequence[ChatMessage], stored_before: int = 0
) -> dict[str, Any]:
    """Matches the session only while it holds none of `new` and at least `stored_before`.

    If another writer stored one of `new` meanwhile, or the session was deleted since
    this object saw `stored_before` messages stored, nothing matches: the save then
    checks what is stored instead of pushing a message twice or a history with a hole.
    """
    query: dict[str, Any] = {"_id": session_id}
    if stored_before:
        query["message_count"] = {"$gte": stored_before}
    if new:
        query["messages.message_id"] = {"$nin": [m.message_id for m in new]}
    return query


def save_update(session: ChatSession, new: Sequence[ChatMessage]) -> dict[str, Any]:
    """The update of a save: the session's fields, and only the messages not stored yet.

    `$push` appends under the document lock and `$inc` counts exactly what it pushed,
    so concurrent writers both keep their messages and the count stays exact.
    """
    update: dict[str, Any] = {"$set": session_fields(session)}
    if new:
        # `seq` orders equal timestamps across sessions by when they were stored, as the
        # SQL backends' message ids do; it never leaves the store.
        pushed = [{**document_from_message(m), "seq": ObjectId()} for m in new]
        update["$push"] = {"messages": {"$each": pushed}}
        update["$inc"] = {"message_count": len(new)}
    else:
        update["$setOnInsert"] = {"messages": [], "message_count": 0}
    return update


def check_save_size(session_id: str, update: dict[str, Any]) -> None:
    """Refuses, before anything is sent, a save whose own content crosses 16 MiB.

    The stored document is at least as large as the fields and messages one save
    sends; growth of a document already near the limit is refused by the server
    atomically (code 17419) and translated to the same error.

    Raises:
        InvalidDataError: naming the session and the limit.
    """
    pushed = update.get("$push", {}).get("messages", {}).get("$each", [])
    lower_bound = len(bson.encode({"_id": session_id, **update["$set"], "messages": pushed}))
    if lower_bound > MAX_DOCUMENT_BYTES:
        raise InvalidDataError(
            f"session {session_id!r}: {lower_bound} bytes of BSON exceed MongoDB's"
            f" 16 MiB document limit ({MAX_DOCUMENT_BYTES} bytes); nothing was written"
        )


def message_from_document(session_id: str, document: MessageDocument) -> ChatMessage:
    return ChatMessage.model_construct(
        message_id=document.message_id,
        session_id=session_id,
        role=document.role,
        content=document.content,
        created_at=document.created_at,
        metadata=document.metadata,
    )


def session_from_view(view: SessionSummary) -> ChatSession:
    """A session from a full view (with its history) or a summary (without)."""
    history = view.messages if isinstance(view, SessionView) else []
    return ChatSession.model_construct(
        session_id=view.session_id,
        model=view.model,
        created_at=view.created_at,
        updated_at=view.updated_at,
        message_count=view.message_count,
        messages=[message_from_document(view.session_id, m) for m in history],
        metadata=view.metadata,
        status=view.status,
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
