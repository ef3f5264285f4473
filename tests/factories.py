"""Small builders of domain objects for tests, and a load that must find its session."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from persistence import ChatSession, SessionStorage, UploadedFileRecord


def conversation(turns: int = 2, model: str = "gemini-2.5-flash", **fields: Any) -> ChatSession:
    session = ChatSession.create(model, **fields)
    for turn in range(turns):
        session.add_message("user" if turn % 2 == 0 else "assistant", f"message {turn}")
    return session


def file_record(expires_in: timedelta = timedelta(hours=48), **fields: Any) -> UploadedFileRecord:
    now = datetime.now(UTC)
    values: dict[str, Any] = {
        "file_id": uuid.uuid4().hex,
        "gemini_file_name": "files/abc123",
        "gemini_file_uri": "https://example.invalid/files/abc123",
        "display_name": "report.pdf",
        "size": 1024,
        "mime_type": "application/pdf",
        "uploaded_at": now,
        "expires_at": now + expires_in,
        "metadata": {"source": "upload"},
    }
    values.update(fields)
    return UploadedFileRecord(**values)


async def stored(storage: SessionStorage, session_id: str) -> ChatSession:
    """The session `storage` holds under `session_id`; asserts that it holds one."""
    loaded = await storage.load_session(session_id)
    assert loaded is not None
    return loaded
