"""The domain models: what a session and its messages are before any backend sees them."""

from __future__ import annotations

import pickle
from datetime import UTC, datetime, timedelta, timezone

import pytest
from pydantic import ValidationError

from persistence import ChatMessage, ChatSession
from persistence.changes import Snapshot


def test_create_starts_an_empty_active_session() -> None:
    session = ChatSession.create("gemini-2.5-flash", metadata={"user": "ada"})

    assert (session.model, session.status, session.message_count) == (
        "gemini-2.5-flash",
        "active",
        0,
    )
    assert session.messages == [] and session.metadata == {"user": "ada"}
    assert session.created_at == session.updated_at
    assert session.created_at.tzinfo is not None


def test_add_message_appends_counts_and_touches_updated_at() -> None:
    session = ChatSession.create("m", session_id="abc-123")
    before = session.updated_at

    message = session.add_message("user", "Hello!", metadata={"lang": "en"})

    assert session.messages == [message] and session.message_count == 1
    assert message.session_id == "abc-123" and message.role == "user"
    assert len(message.message_id) == 32 and int(message.message_id, 16) >= 0
    assert session.updated_at >= before and session.updated_at == message.created_at


def test_add_message_never_moves_updated_at_backwards() -> None:
    """Found by review: a clock stepped back set updated_at earlier, unlike the store
    (which keeps the later one) and the other mutators."""
    session = ChatSession.create("m")
    ahead = session.updated_at + timedelta(hours=3)  # written by a clock 3 h fast
    session.updated_at = ahead

    message = session.add_message("user", "after the clock stepped back")

    assert message.created_at < ahead
    assert session.updated_at == ahead


def test_a_message_is_immutable() -> None:
    message = ChatSession.create("m").add_message("user", "hi")

    with pytest.raises(ValidationError):
        message.content = "edited"  # type: ignore[misc]


def test_naive_datetimes_are_refused() -> None:
    with pytest.raises(ValidationError, match="timezone-aware"):
        ChatMessage(session_id="s", role="user", content="x", created_at=datetime(2025, 1, 1))


@pytest.mark.parametrize("value", [0, 1.5, 1_700_000_000_123, "1700000000", " 17e8 ", b"0"])
def test_numbers_are_refused_as_timestamps(value: object) -> None:
    """Found by review: pydantic read them as Unix time, guessing seconds or milliseconds."""
    with pytest.raises(ValidationError, match="Unix time is ambiguous"):
        ChatMessage.model_validate(
            {"session_id": "s", "role": "user", "content": "x", "created_at": value}
        )
    session = ChatSession.create("m")
    with pytest.raises(ValidationError, match="Unix time is ambiguous"):
        session.updated_at = value  # type: ignore[assignment]


def test_datetimes_become_utc_truncated_to_the_millisecond() -> None:
    local = datetime(2025, 1, 1, 12, 0, 0, 999999, tzinfo=timezone(timedelta(hours=-3)))

    message = ChatMessage(session_id="s", role="user", content="x", created_at=local)

    assert message.created_at == datetime(2025, 1, 1, 15, 0, 0, 999000, tzinfo=UTC)
    assert message.created_at.utcoffset() == timedelta(0)


def test_iso_strings_with_an_offset_are_accepted() -> None:
    message = ChatMessage.model_validate(
        {
            "session_id": "s",
            "role": "assistant",
            "content": "x",
            "created_at": "2025-10-16T10:00:01.5+02:00",
        }
    )

    assert message.created_at.isoformat() == "2025-10-16T08:00:01.500000+00:00"


def test_unknown_fields_are_refused() -> None:
    with pytest.raises(ValidationError, match="extra"):
        ChatSession.model_validate({"model": "m", "colour": "blue"})


def test_equality_ignores_where_a_session_is_stored() -> None:
    session = ChatSession.create("m")
    session.add_message("user", "hi")
    copy = ChatSession.model_validate(session.model_dump())
    session.loaded_from("some-storage", 3, "incarnation", Snapshot(value={}))

    assert copy == session
    assert session.revision == 3 and copy.revision is None


def test_a_pickle_holds_the_lists_the_release_before_grows_in_place() -> None:
    """Found by review: this release starts `_log` and `_pins` as the shared (); the
    release before appends to them, so a pickle it reads must hold lists."""
    session = ChatSession(model="m")
    session.add_message("user", "hello")
    private = session.__getstate__()["__pydantic_private__"]
    assert type(private["_log"]) is list and type(private["_pins"]) is list
    private["_log"].append(("edit", 0, None, None))  # what the release before does
    assert session._private()["_log"] == ()  # the object itself is not changed
    copy = pickle.loads(pickle.dumps(session))
    assert copy == session
    copy.add_message("assistant", "hi")
    assert [m.content for m in copy.messages] == ["hello", "hi"]
