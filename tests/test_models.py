"""The domain models: what a session and its messages are before any backend sees them."""

from __future__ import annotations

import pickle
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone

import pytest
from pydantic import ValidationError

from persistence import ChatMessage, ChatSession, UploadedFileRecord
from persistence.changes import Snapshot
from tests.factories import file_record


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


_AT = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize(
    ("make", "update"),
    [
        (lambda: ChatMessage(session_id="s", role="user", content="x"), {"content": "a\x00b"}),
        (lambda: ChatMessage(session_id="s", role="user", content="x"), {"content": "\ud800"}),
        (lambda: ChatMessage(session_id="s", role="user", content="x"), {"content": 5}),
        (lambda: ChatMessage(session_id="s", role="user", content="x"), {"message_id": 7}),
        (lambda: ChatMessage(session_id="s", role="user", content="x"), {"message_id": "m" * 300}),
        (lambda: ChatMessage(session_id="s", role="user", content="x"), {"role": "boss"}),
        (
            lambda: ChatMessage(session_id="s", role="user", content="x"),
            {"created_at": datetime(2026, 1, 1)},  # naive on purpose
        ),
        (lambda: ChatMessage(session_id="s", role="user", content="x"), {"unknown": 1}),
        (lambda: ChatSession(model="m"), {"model": "gpt\x00"}),
        (lambda: ChatSession(model="m"), {"session_id": "s" * 300}),
        (lambda: ChatSession(model="m"), {"status": "bogus"}),
        (lambda: ChatSession(model="m"), {"created_at": "not a time"}),
        (file_record, {"size": 1.5}),
        (file_record, {"size": 2**64}),
        (file_record, {"display_name": "a\x00b"}),
        (file_record, {"mime_type": "\ud800"}),
        (file_record, {"expires_at": datetime(2026, 1, 1)}),
    ],
)
def test_model_copy_and_model_construct_validate_what_they_are_given(
    make: Callable[[], ChatMessage | ChatSession | UploadedFileRecord], update: dict[str, object]
) -> None:
    """Found by attack: both were ways past validation, so a save met values the
    backends disagree on (SQLite kept a NUL PostgreSQL refused; a size of 1.5 became 1
    on PostgreSQL; a naive time was read as UTC). Both validate now, as `cls(...)` does."""
    model = make()
    with pytest.raises(ValueError, match=next(iter(update))):
        model.model_copy(update=update)
    values = {**model.__dict__, **update}
    with pytest.raises(ValueError, match=next(iter(update))):
        type(model).model_construct(**values)


def test_model_copy_and_model_construct_keep_what_they_always_made() -> None:
    message = ChatMessage(session_id="s", role="user", content="x", metadata={"k": [1]})
    edited = message.model_copy(update={"content": "y", "created_at": _AT})
    assert (edited.content, edited.created_at, edited.message_id) == ("y", _AT, message.message_id)
    assert edited.metadata == {"k": [1]}
    with pytest.raises(TypeError, match="edit_message"):
        edited.metadata["k"] = 2  # type: ignore[index]
    built = ChatMessage.model_construct(**message.__dict__)
    assert built == message
    session = ChatSession(model="m")
    session.add_message("user", "hi")
    archived = session.model_copy(update={"status": "archived"})
    assert archived.status == "archived" and archived.messages == session.messages
    assert file_record().model_copy(update={"size": 2}).size == 2
