"""A store worth moving, and an exact picture of a store to compare with."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

from persistence import ChatMessage, ChatSession, SessionStorage, UploadedFileRecord

LARGE_CONTENT = "large content " + "x" * 1_000_000 + " end"
UNICODE = "héllo wörld 😀 — 中文 עברית ﷽ e\u0301 \u200d\U0001f469\u200d\U0001f4bb"
METADATA = {
    "nested": {"list": [1, 2.5, "three", None, True, {"deep": []}]},
    "float": 0.1,
    "integral_float": 3.0,
    "big": 2**62,
    "negative": -7,
    "bool": False,
    "null": None,
    "unicode": UNICODE,
}
# Numbers at the edges of what validation accepts, which an export must give back as
# they were: both ends of int64 (the C JSON parser refuses -2**63 as a float read), ints
# past 2**53, 1 beside 1.0, the smallest subnormal and normal floats, the largest
# integral float below the limit, and floats needing all 17 digits.
EDGE_NUMBERS: dict[str, Any] = {
    "int64_min": -(2**63),
    "int64_max": 2**63 - 1,
    "int64_min_plus_one": -(2**63) + 1,
    "int64_max_negated": -(2**63 - 1),
    "past_2_53": 2**53 + 1,
    "int_one": 1,
    "float_one": 1.0,
    "int_zero": 0,
    "float_zero": 0.0,
    "tenth": 0.1,
    "subnormal": 5e-324,
    "negative_subnormal": -5e-324,
    "smallest_normal": 2.2250738585072014e-308,
    "small": 1e-7,
    "largest_integral": 9999999999999998.0,
    "negative_largest_integral": -9999999999999998.0,
    "half_past_2_52": 4503599627370495.5,
    "seventeen_digits": 0.30000000000000004,
    "in_a_list": [-(2**63), 2**63 - 1, 1, 1.0, -0.5, {"deep": -(2**63)}],
}
# Ids whose order differs between byte order and linguistic collations.
SESSION_IDS = ["a-b", "ab", "AB", "a_b", "Zz", "é", "s-0", "s 1", "s.2", "x" * 255]


def _at(minutes: float) -> datetime:
    return datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC) + timedelta(minutes=minutes)


def build_sessions() -> list[ChatSession]:
    """Sessions of every status, unicode, large content, equal timestamps, empty ones."""
    sessions = []
    statuses = ["active", "archived", "expired"]
    for index, session_id in enumerate(SESSION_IDS):
        session = ChatSession(
            session_id=session_id,
            model=f"gemini-{index}",
            created_at=_at(index),
            updated_at=_at(index + 30),
            metadata={**METADATA, "index": index},
            status=statuses[index % 3],
        )
        turns = 0 if index == 3 else 3 + index
        for turn in range(turns):
            content = f"{UNICODE} {index}/{turn}"
            if index == 1 and turn == 1:
                content = LARGE_CONTENT
            session.messages.append(
                ChatMessage(
                    message_id=f"{session_id[:200]}-m{turn}",
                    session_id=session_id,
                    role=("user", "assistant", "system", "tool")[turn % 4],
                    content=content,
                    # Equal timestamps: only the stored position keeps the order.
                    created_at=_at(index + 10),
                    metadata={"turn": turn, "score": turn / 3} if turn % 2 else {},
                )
            )
        session.message_count = len(session.messages)
        sessions.append(session)
    return sessions


def build_edge_session() -> ChatSession:
    """A session and a message whose metadata hold EDGE_NUMBERS."""
    session = ChatSession.create("m", session_id="edge numbers", metadata=EDGE_NUMBERS)
    session.add_message("user", "numbers", metadata=EDGE_NUMBERS)
    return session


def build_edge_file_record() -> UploadedFileRecord:
    """A file record whose metadata hold EDGE_NUMBERS."""
    return UploadedFileRecord(
        file_id="edge numbers",
        gemini_file_name="files/edge",
        gemini_file_uri="https://example.invalid/files/edge",
        display_name="edge.pdf",
        size=2**63 - 1,
        mime_type="application/pdf",
        uploaded_at=_at(0),
        expires_at=_at(60),
        metadata=EDGE_NUMBERS,
    )


def edge_numbers_kept(session: ChatSession | None) -> bool:
    """True when the session's and its message's metadata are EDGE_NUMBERS exactly."""
    assert session is not None
    expected = _exact(EDGE_NUMBERS)
    return _exact(session.metadata) == expected == _exact(session.messages[0].metadata)


def build_file_records() -> list[UploadedFileRecord]:
    return [
        UploadedFileRecord(
            file_id=f"file-{index}-{name}",
            gemini_file_name=f"files/{name}",
            gemini_file_uri=f"https://example.invalid/files/{name}",
            display_name=f"{UNICODE} {index}.pdf",
            size=index * 1_000_000_007,
            mime_type="application/pdf",
            uploaded_at=_at(-index),
            # One record expired long ago: migration must not drop it.
            expires_at=_at(48 * 60) if index else _at(-60 * 24 * 365),
            metadata={"index": index, **METADATA},
        )
        for index, name in enumerate(["a", "b", "ü"])
    ]


async def populate(storage: SessionStorage) -> None:
    for session in build_sessions():
        await storage.save_session(session)
    for record in build_file_records():
        await storage.save_file_record(record)


def _exact(value: Any) -> str:
    # JSON text keeps what == blurs: 1 vs 1.0 vs true, and the microseconds of a time.
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


async def snapshot(storage: SessionStorage) -> dict[str, dict[str, str]]:
    """Every session (messages in order) and file record of the store, as exact text."""
    sessions: dict[str, str] = {}
    async for batch in storage.iter_sessions(3, with_messages=True):
        for session in batch:
            sessions[session.session_id] = _exact(session.model_dump(mode="json"))
    files: dict[str, str] = {}
    async for records in storage.iter_file_records(2):
        for record in records:
            files[record.file_id] = _exact(record.model_dump(mode="json"))
    return {"sessions": sessions, "files": files}
