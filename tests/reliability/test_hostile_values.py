"""Hostile ids, names, nesting and sizes, on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from pydantic import ValidationError

from persistence import (
    ChatMessage,
    ChatSession,
    InvalidDataError,
    SessionStorage,
    UploadedFileRecord,
)
from persistence.clock import utc_now
from tests.reliability.conftest import Figures

HOSTILE_IDS = [
    "../../etc/passwd",
    "..",
    "a/b/c",
    "a\\b\\c",
    "C:\\Windows\\system32",
    "'",
    '"',
    "`",
    "x' OR '1'='1",
    "1; DROP TABLE chat_sessions; --",
    "') ON CONFLICT DO NOTHING; --",
    "%",
    "_",
    "%_%",
    "\\",
    " leading and trailing ",
    "line\nbreak",
    "tab\there",
    "\u202eright-to-left",
    "\U0001f600 emoji",
    "é" * 255,
    "i" * 255,
]


def _record(file_id: str, **changes: Any) -> UploadedFileRecord:
    now = utc_now()
    fields: dict[str, Any] = {
        "file_id": file_id,
        "gemini_file_name": "files/x",
        "gemini_file_uri": "https://example.invalid/x",
        "display_name": "x",
        "size": 1,
        "mime_type": "text/plain",
        "uploaded_at": now,
        "expires_at": now + timedelta(days=1),
    }
    fields.update(changes)
    return UploadedFileRecord(**fields)


async def test_hostile_ids_and_names_round_trip_and_touch_nothing_else(
    sql_storage: SessionStorage, figures: Figures
) -> None:
    bystander = ChatSession.create("bystander")
    bystander.add_message("user", "must survive")
    await sql_storage.save_session(bystander)
    for value in HOSTILE_IDS:
        # A key holding '.' or starting with '$' is refused (MongoDB), tested elsewhere.
        metadata = {"value": value, value.replace(".", ",").lstrip("$"): [value]}
        session = ChatSession.create(value[:255], session_id=value, metadata=metadata)
        message = session.add_message("user", value, metadata)
        await sql_storage.save_session(session)
        record = _record(value, gemini_file_name=value, display_name=value, mime_type=value)
        await sql_storage.save_file_record(record)
        loaded = await sql_storage.load_session(value)
        assert loaded is not None and loaded.model_dump() == session.model_dump()
        assert loaded.messages[0] == message
        assert await sql_storage.load_file_record(value) == record
    for value in HOSTILE_IDS:
        assert await sql_storage.delete_session(value) is True
        assert await sql_storage.load_session(value) is None
    # The SQL fragments were data: nothing else was read, changed or deleted.
    assert await sql_storage.load_session("%") is None
    survivor = await sql_storage.load_session(bystander.session_id)
    assert survivor is not None and survivor.message_count == 1
    counts = await sql_storage.count()
    assert counts.sessions_by_status["active"] == 1 and counts.files == len(HOSTILE_IDS)
    figures["hostile_ids"] = len(HOSTILE_IDS)


@pytest.mark.parametrize("length", [256, 10 * 1024])
@pytest.mark.parametrize(
    ("build", "field"),
    [
        (lambda v: ChatSession.create("m", session_id=v), "session_id"),
        (lambda v: ChatSession.create(v), "model"),
        (lambda v: ChatMessage(session_id=v, role="user", content="x"), "session_id"),
        (
            lambda v: ChatMessage(message_id=v, session_id="s", role="user", content="x"),
            "message_id",
        ),
        (lambda v: _record(v), "file_id"),
    ],
)
def test_ids_past_255_characters_are_refused_naming_the_field(
    build: Any, field: str, length: int
) -> None:
    with pytest.raises(ValidationError) as caught:
        build("x" * length)
    assert [error["loc"][0] for error in caught.value.errors()] == [field]
    assert f"got {length}" in str(caught.value) or "at most 255" in str(caught.value)


async def test_lookups_with_10_kb_ids_find_nothing_and_do_not_fail(
    sql_storage: SessionStorage,
) -> None:
    long_id = "x' OR '1'='1" * 900
    assert await sql_storage.load_session(long_id) is None
    assert await sql_storage.delete_session(long_id) is False
    assert await sql_storage.load_file_record(long_id) is None
    assert await sql_storage.load_sessions([long_id, "../" * 4000]) == []


def _nested(depth: int, kind: str) -> Any:
    value: Any = "leaf"
    for _ in range(depth):
        value = {"k": value} if kind == "dict" else [value]
    return value


@pytest.mark.parametrize("kind", ["dict", "list"])
@pytest.mark.parametrize("depth", [1_000, 20_000])
def test_metadata_nested_deeply_is_refused_clearly_without_recursion_error(
    kind: str, depth: int
) -> None:
    builders = [
        ("metadata", lambda m: ChatSession.create("m", metadata=m)),
        ("metadata", lambda m: ChatMessage(session_id="s", role="user", content="x", metadata=m)),
        ("metadata", lambda m: _record("f", metadata=m)),
    ]
    for field, build in builders:
        with pytest.raises(ValidationError) as caught:
            build({"deep": _nested(depth, kind)})
        assert [error["loc"][0] for error in caught.value.errors()] == [field]
        assert "nested deeper than" in str(caught.value)
    session = ChatSession.create("m")
    with pytest.raises(ValidationError, match="nested deeper than"):
        session.add_message("user", "x", {"deep": _nested(depth, kind)})
    assert session.messages == [] and session.message_count == 0


async def test_sixteen_megabyte_content_round_trips(
    sql_storage: SessionStorage, figures: Figures
) -> None:
    content = ("sixteen megabytes of text " * 700_000)[: 16 * 1024 * 1024 - 9] + " needle"
    session = ChatSession.create("big")
    session.add_message("user", content)
    session.add_message("assistant", "small")
    await sql_storage.save_session(session)
    loaded = await sql_storage.load_session(session.session_id)
    assert loaded is not None
    assert loaded.messages[0].content == content
    assert [m.content for m in loaded.messages[1:]] == ["small"]
    found = await sql_storage.search_messages("sixteen megabytes")
    assert [m.message_id for m in found] == [session.messages[0].message_id]
    figures["content_bytes"] = len(content.encode())


async def test_messages_of_another_session_or_repeated_ids_are_refused_and_nothing_written(
    sql_storage: SessionStorage,
) -> None:
    session = ChatSession.create("m", session_id="owner")
    session.messages.append(ChatMessage(session_id="someone-else", role="user", content="x"))
    with pytest.raises(InvalidDataError, match="session_id"):
        await sql_storage.save_session(session)
    twice = ChatSession.create("m", session_id="twice")
    message = twice.add_message("user", "x")
    twice.messages.append(message)
    with pytest.raises(InvalidDataError, match="appears twice"):
        await sql_storage.save_session(twice)
    thief = ChatSession.create("m", session_id="thief")
    stored = ChatSession.create("m", session_id="stored")
    taken = stored.add_message("user", "mine")
    await sql_storage.save_session(stored)
    thief.messages.append(taken.model_copy(update={"session_id": "thief"}))
    with pytest.raises(InvalidDataError, match="already stored in another session"):
        await sql_storage.save_session(thief)
    for session_id in ("owner", "twice", "thief"):
        assert await sql_storage.load_session(session_id) is None
    counts = await sql_storage.count()
    assert counts.messages == 1


async def test_a_word_past_100_000_characters_is_found_on_every_sql_backend(
    sql_storage: SessionStorage,
) -> None:
    session = ChatSession.create("big")
    message = session.add_message("user", "filler " * 20_000 + "needle")
    await sql_storage.save_session(session)
    found = await sql_storage.search_messages("needle")
    assert [m.message_id for m in found] == [message.message_id]
