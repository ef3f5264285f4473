"""Rows <-> domain models, as pure functions.

On the way out, rows become domain objects without re-validation: the schema and
the validation on the way in already guarantee every value.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from persistence.models import ChatMessage, ChatSession, UploadedFileRecord
from persistence.sql.tables import FileRow, MessageRow, SessionRow

SESSION_COLUMNS = (
    SessionRow.session_id,
    SessionRow.model,
    SessionRow.created_at,
    SessionRow.updated_at,
    SessionRow.message_count,
    SessionRow.metadata_,
    SessionRow.status,
)
MESSAGE_COLUMNS = (
    MessageRow.message_id,
    MessageRow.session_id,
    MessageRow.role,
    MessageRow.content,
    MessageRow.created_at,
    MessageRow.metadata_,
)
FILE_COLUMNS = (
    FileRow.file_id,
    FileRow.gemini_file_name,
    FileRow.gemini_file_uri,
    FileRow.display_name,
    FileRow.size,
    FileRow.mime_type,
    FileRow.uploaded_at,
    FileRow.expires_at,
    FileRow.metadata_,
)


def session_from_row(row: Sequence[Any], messages: list[ChatMessage]) -> ChatSession:
    return ChatSession.model_construct(
        session_id=row[0],
        model=row[1],
        created_at=row[2],
        updated_at=row[3],
        message_count=row[4],
        messages=messages,
        metadata=row[5],
        status=row[6],
    )


def message_from_row(row: Sequence[Any]) -> ChatMessage:
    return ChatMessage.model_construct(
        message_id=row[0],
        session_id=row[1],
        role=row[2],
        content=row[3],
        created_at=row[4],
        metadata=row[5],
    )


def file_record_from_row(row: Sequence[Any]) -> UploadedFileRecord:
    return UploadedFileRecord.model_construct(
        file_id=row[0],
        gemini_file_name=row[1],
        gemini_file_uri=row[2],
        display_name=row[3],
        size=row[4],
        mime_type=row[5],
        uploaded_at=row[6],
        expires_at=row[7],
        metadata=row[8],
    )


def row_from_session(session: ChatSession, message_count: int) -> dict[str, Any]:
    return {
        "session_id": session.session_id,
        "model": session.model,
        "created_at": session.created_at,
        "updated_at": session.updated_at,
        "message_count": message_count,
        "metadata": session.metadata,
        "status": session.status,
    }


def rows_from_messages(
    session_id: str, messages: Sequence[ChatMessage], first_position: int
) -> list[dict[str, Any]]:
    return [
        {
            "message_id": message.message_id,
            "session_id": session_id,
            "position": first_position + offset,
            "role": message.role,
            "content": message.content,
            "created_at": message.created_at,
            "metadata": message.metadata,
        }
        for offset, message in enumerate(messages)
    ]


def row_from_file_record(record: UploadedFileRecord) -> dict[str, Any]:
    return {
        "file_id": record.file_id,
        "gemini_file_name": record.gemini_file_name,
        "gemini_file_uri": record.gemini_file_uri,
        "display_name": record.display_name,
        "size": record.size,
        "mime_type": record.mime_type,
        "uploaded_at": record.uploaded_at,
        "expires_at": record.expires_at,
        "metadata": record.metadata,
    }
