"""What the two raw-driver targets share: the session handle and a streaming export."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any


class RawHandle:
    """The raw targets' stand-in for an in-memory session: its id and its message count."""

    __slots__ = ("count", "session_id")

    def __init__(self, session_id: str, count: int = 0) -> None:
        self.session_id = session_id
        self.count = count


def _plain(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime) else value


def _session_document(row: Any, messages: list[dict[str, Any]]) -> dict[str, Any]:
    fields = ("session_id", "model", "created_at", "updated_at", "message_count", "metadata")
    document = {name: _plain(value) for name, value in zip(fields, row, strict=False)}
    document["status"] = row[6]
    document["messages"] = [{key: _plain(value) for key, value in m.items()} for m in messages]
    return document


async def export_stream(
    batches: AsyncIterator[tuple[list[Any], list[dict[str, Any]]]], path: Path
) -> dict[str, Any]:
    """Writes {"sessions": [...]} one keyset batch at a time, so memory stays flat."""
    sessions = messages = 0
    with path.open("w", encoding="utf-8") as out:
        out.write('{"sessions": [')
        async for rows, batch_messages in batches:
            by_session: dict[str, list[dict[str, Any]]] = {row[0]: [] for row in rows}
            for message in batch_messages:
                by_session[message["session_id"]].append(message)
            for row in rows:
                out.write(("," if sessions else "") + "\n")
                out.write(json.dumps(_session_document(row, by_session[row[0]])))
                sessions += 1
                messages += len(by_session[row[0]])
        out.write("\n]}\n")
    return {"sessions_exported": sessions, "messages_exported": messages}
