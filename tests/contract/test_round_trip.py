"""Whatever one backend accepts, every backend returns unchanged; the rest is refused."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from pydantic import ValidationError

from persistence import ChatSession, InvalidDataError, SessionStorage
from tests.factories import file_record

UNUSUAL_METADATA: dict[str, Any] = {
    "ключ": "значение",
    "emoji 🙂": ["🚀", {"deep": {"deeper": {"deepest": [1, 2.5, None, True, False]}}}],
    "empty": {},
    "list": [],
    "big": 2**63 - 1,
    "small": -(2**63),
    "float": 0.1,
    "tiny": 1e-300,
    "one": 1.0,
    "quote": 'she said "hi" \\ ok',
    "newline": "a\nb\r\nc\t",
    "": "empty key",
    "with space": " padded ",
}


async def test_unusual_values_round_trip(storage: SessionStorage) -> None:
    session = ChatSession.create("model/with:odd chars", metadata=UNUSUAL_METADATA)
    session.add_message("system", "🙂 emoji, ünïcödé, 日本語, RTL עברית", metadata=UNUSUAL_METADATA)
    session.add_message("tool", "", metadata={"empty content": True})
    session.add_message("assistant", "x" * 1_000_000)
    await storage.save_session(session)

    loaded = await storage.load_session(session.session_id)

    assert loaded == session
    assert loaded is not None
    assert loaded.metadata == UNUSUAL_METADATA
    assert type(loaded.messages[0].metadata["one"]) is float
    assert type(loaded.messages[0].metadata["big"]) is int


async def test_datetimes_come_back_utc_to_the_millisecond(storage: SessionStorage) -> None:
    plus_five = timezone(timedelta(hours=5, minutes=30))
    created = datetime(2025, 10, 16, 15, 30, 1, 123456, tzinfo=plus_five)
    session = ChatSession.create("m")
    session.created_at = created
    session.updated_at = created
    record = file_record(uploaded_at=created, expires_at=created + timedelta(days=2))
    await storage.save_session(session)
    await storage.save_file_record(record)

    loaded = await storage.load_session(session.session_id)
    loaded_record = await storage.load_file_record(record.file_id)

    assert loaded is not None and loaded_record is not None
    expected = datetime(2025, 10, 16, 10, 0, 1, 123000, tzinfo=UTC)
    assert loaded.created_at == expected and loaded.created_at.utcoffset() == timedelta(0)
    assert loaded_record.uploaded_at == expected


class _WallClockStamp(datetime):
    """Some library's timestamp type, whose isoformat() prints local time without offset."""

    def isoformat(self, sep: str = "T", timespec: str = "auto") -> str:
        return datetime.isoformat(self.replace(tzinfo=None), sep, timespec)


async def test_a_datetime_subclass_is_stored_as_the_instant_it_names(
    storage: SessionStorage,
) -> None:
    """Found by review: the model kept the subclass, and SQLite stored its isoformat()."""
    stamp = _WallClockStamp(2024, 1, 1, 12, 0, 0, 123456, tzinfo=timezone(timedelta(hours=2)))
    session = ChatSession(model="m", session_id="stamped", created_at=stamp, updated_at=stamp)
    assert type(session.created_at) is datetime
    record = file_record(uploaded_at=stamp, expires_at=stamp)
    assert type(record.uploaded_at) is datetime
    await storage.save_session(session)

    loaded = await storage.load_session("stamped")

    assert loaded is not None
    assert loaded.created_at == datetime(2024, 1, 1, 10, 0, 0, 123000, tzinfo=UTC)
    assert loaded == session


async def test_the_earliest_and_latest_instants_round_trip(storage: SessionStorage) -> None:
    earliest = datetime(1, 1, 1, 0, 0, 0, 1000, tzinfo=UTC)
    latest = datetime(9999, 12, 31, 23, 59, 59, 999000, tzinfo=UTC)
    session = ChatSession.create("m")
    session.created_at, session.updated_at = earliest, latest
    session.add_message("user", "first")
    session.updated_at = latest
    record = file_record(uploaded_at=earliest, expires_at=latest)
    await storage.save_session(session)
    await storage.save_file_record(record)

    loaded = await storage.load_session(session.session_id)
    assert loaded == session
    assert (loaded.created_at, loaded.updated_at) == (earliest, latest)
    assert await storage.load_file_record(record.file_id) == record


async def test_hostile_identifiers_round_trip(storage: SessionStorage) -> None:
    for session_id in ["../../etc/passwd", "a/b\\c", "'; DROP TABLE x; --", '"quoted"', "x" * 255]:
        session = ChatSession.create("m", session_id=session_id)
        session.add_message("user", session_id)
        await storage.save_session(session)
        assert await storage.load_session(session_id) == session


@pytest.mark.parametrize(
    ("build", "field"),
    [
        (lambda s: s.add_message("user", "nul \x00 inside"), "content"),
        (lambda s: s.add_message("user", "lone \ud800 surrogate"), "content"),
        (lambda s: s.add_message("wizard", "hi"), "role"),
        (lambda s: s.add_message("user", "hi", metadata={"$where": 1}), "metadata"),
        (lambda s: s.add_message("user", "hi", metadata={"a.b": 1}), "metadata"),
        (lambda s: s.add_message("user", "hi", metadata={"n": float("nan")}), "metadata"),
        (lambda s: s.add_message("user", "hi", metadata={"n": 2**64}), "metadata"),
        (lambda s: s.add_message("user", "hi", metadata={"n": 1e20}), "metadata"),
        (lambda s: s.add_message("user", "hi", metadata={"k": "nul\x00"}), "metadata"),
        (lambda s: s.add_message("user", "hi", metadata={"k": object()}), "metadata"),
        (lambda s: setattr(s, "status", "deleted"), "status"),
        (lambda s: setattr(s, "metadata", {"k\x00": 1}), "metadata"),
        (lambda s: setattr(s, "updated_at", datetime(2025, 1, 1)), "updated_at"),
        # asyncpg writes it as '-infinity' and reads a naive datetime.min back.
        (lambda s: setattr(s, "created_at", datetime(1, 1, 1, tzinfo=UTC)), "created_at"),
        (
            lambda s: setattr(s, "updated_at", datetime(1, 1, 1, 0, 0, 0, 999, tzinfo=UTC)),
            "updated_at",
        ),
        (lambda s: setattr(s, "model", ""), "model"),
    ],
)
def test_values_no_backend_can_keep_are_refused_naming_the_field(build: Any, field: str) -> None:
    session = ChatSession.create("m")

    with pytest.raises(ValidationError) as raised:
        build(session)

    assert field in str(raised.value)
    assert session.messages == []


def test_metadata_nested_too_deep_is_refused_without_recursion_error() -> None:
    deep: dict[str, Any] = {}
    cursor = deep
    for _ in range(1000):
        cursor["d"] = {}
        cursor = cursor["d"]

    with pytest.raises(ValidationError, match="nested deeper"):
        ChatSession.create("m", metadata=deep)


def test_an_id_longer_than_255_characters_is_refused() -> None:
    with pytest.raises(ValidationError, match="session_id"):
        ChatSession.create("m", session_id="x" * 10_000)


@pytest.mark.parametrize("size", [-1, 2**63, True, 1.0, "5", None])
def test_a_file_size_that_is_not_a_byte_count_is_refused(size: Any) -> None:
    with pytest.raises(ValidationError, match="size"):
        file_record(size=size)


@pytest.mark.parametrize("path", ["k", "a.0"])
async def test_minus_zero_put_in_place_of_a_stored_zero_is_refused(
    storage: SessionStorage, path: str
) -> None:
    """Found by attack: -0.0 == 0.0 in Python, so -0.0 put in place of a stored 0.0 was
    no change: the save neither wrote it nor refused it (as it refuses -0.0 anywhere
    else), and the holder's copy disagreed with the store, unsaid."""
    session = ChatSession.create("m", metadata={"k": 0.0, "a": [0.0]})
    await storage.save_session(session)
    if path == "k":
        session.metadata["k"] = -0.0
    else:
        session.metadata["a"][0] = -0.0
    with pytest.raises(InvalidDataError, match=r"metadata\.(k|a\[0\]): -0\.0"):
        await storage.save_session(session)
    stored = await storage.load_session(session.session_id)
    assert stored is not None and stored.metadata == {"k": 0.0, "a": [0.0]}


@pytest.mark.parametrize("bad", [{1, 2}, "nul\x00", -0.0, float("nan"), 2**64])
async def test_metadata_changed_in_place_is_checked_by_the_save(
    storage: SessionStorage, bad: Any
) -> None:
    # Mutating the dict skips the model's validation; the save must not store what
    # some backend would alter (or fail on with a raw error).
    session = ChatSession.create("m", metadata={"kept": 1})
    await storage.save_session(session)
    session.metadata["k"] = bad
    with pytest.raises(InvalidDataError, match=r"metadata\.k"):
        await storage.save_session(session)
    fresh = ChatSession.create("m")
    fresh.metadata["k"] = bad
    with pytest.raises(InvalidDataError, match=r"metadata\.k"):
        await storage.save_session(fresh)

    stored = await storage.load_session(session.session_id)
    assert stored is not None and stored.metadata == {"kept": 1}
    assert await storage.load_session(fresh.session_id) is None
