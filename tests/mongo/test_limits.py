"""What MongoDB cannot keep is refused before anything is sent."""

from __future__ import annotations

import bson
import pytest
from pydantic import ValidationError

from persistence.errors import InvalidDataError
from persistence.models import ChatSession
from persistence.mongo import repositories, updates
from persistence.mongo.errors import MAX_DOCUMENT_BYTES
from persistence.validation import MAX_METADATA_DEPTH

TOKEN = "storage-token"


def _session_with(content_bytes: int) -> ChatSession:
    session = ChatSession.create("gemini-pro", session_id="big")
    # One short word repeated: its search tokens add a few bytes, not a second copy.
    session.add_message("user", "x " * (content_bytes // 2))
    return session


def test_a_new_session_crossing_16_mib_is_refused_naming_the_limit() -> None:
    session = _session_with(MAX_DOCUMENT_BYTES)
    with pytest.raises(InvalidDataError, match="16 MiB") as raised:
        updates.new_document(session.plan_save(TOKEN), "inc")
    assert "'big'" in str(raised.value)


def test_a_new_session_just_under_16_mib_is_sent() -> None:
    session = _session_with(MAX_DOCUMENT_BYTES - 4096)
    document = updates.new_document(session.plan_save(TOKEN), "inc")
    assert len(bson.encode(document)) <= MAX_DOCUMENT_BYTES


def test_the_size_check_counts_the_pushed_messages_together() -> None:
    session = ChatSession.create("gemini-pro", session_id="many")
    session.saved_to(TOKEN, session.plan_save(TOKEN), 1, "inc", exact=True)
    for _ in range(3):
        session.add_message("user", "y" * (MAX_DOCUMENT_BYTES // 3))
    with pytest.raises(InvalidDataError, match="16 MiB"):
        updates.append(session.plan_save(TOKEN))


def test_one_message_that_fits_is_pushed() -> None:
    session = ChatSession.create("gemini-pro", session_id="one")
    session.saved_to(TOKEN, session.plan_save(TOKEN), 1, "inc", exact=True)
    session.add_message("user", "y" * (MAX_DOCUMENT_BYTES // 3))
    _query, update = updates.append(session.plan_save(TOKEN))
    assert len(update["$push"]["messages"]["$each"]) == 1


def test_an_edit_crossing_16_mib_is_refused_before_anything_is_sent() -> None:
    session = ChatSession.create("gemini-pro", session_id="edit")
    first = session.add_message("user", "short")
    session.saved_to(TOKEN, session.plan_save(TOKEN), 1, "inc", exact=True)
    session.edit_message(first.message_id, content="z" * MAX_DOCUMENT_BYTES)
    with pytest.raises(InvalidDataError, match="16 MiB"):
        updates.compare_and_set(session.plan_save(TOKEN))


@pytest.mark.parametrize("key", ["$where", "a.b", "$", ".", "x."])
def test_metadata_keys_mongodb_cannot_keep_are_refused(key: str) -> None:
    with pytest.raises((InvalidDataError, ValidationError), match="MongoDB"):
        ChatSession.create("gemini-pro", metadata={"ok": {key: 1}})
    session = ChatSession.create("gemini-pro")
    with pytest.raises((InvalidDataError, ValidationError), match="MongoDB"):
        session.add_message("user", "hi", {key: 1})


def test_metadata_nested_deeper_than_mongodb_keeps_is_refused() -> None:
    deep: dict[str, object] = {}
    level = deep
    for _ in range(MAX_METADATA_DEPTH + 1):
        child: dict[str, object] = {}
        level["d"] = child
        level = child
    with pytest.raises((InvalidDataError, ValidationError), match="nested deeper"):
        ChatSession.create("gemini-pro", metadata=deep)


def test_integers_beyond_int64_are_refused() -> None:
    with pytest.raises((InvalidDataError, ValidationError), match="64 bits"):
        ChatSession.create("gemini-pro", metadata={"n": 2**63})


@pytest.mark.parametrize(
    ("last", "sent"),
    [
        (1, -1),
        (20, -20),
        (2**31 - 1, -(2**31 - 1)),
        (2**32 - 1, -(2**31 - 1)),
        (2**63 - 1, -(2**31 - 1)),
    ],
)
def test_the_newest_messages_are_asked_for_in_a_32_bit_slice(last: int, sent: int) -> None:
    """Found by review: the server reads `$slice` as a 32-bit int, keeping a 64-bit
    count's low 32 bits: `last=2**32 - 1` asked for the oldest message, `2**32` for none.
    A 32-bit count, encoded as BSON int32, goes as it is."""
    projection = repositories.newest_messages_projection(last)
    assert projection["messages"] == {"$slice": sent}
    assert bson.decode(bson.encode({"s": sent}))["s"] == sent
    assert -sent < 2**31


@pytest.mark.parametrize(
    ("limit", "offset", "asked"),
    [(100, 0, 100), (0, 5, 0), (1, 2**63 - 1, 0), (2**63 - 1, 1, 2**63 - 2), (5, 2**63 - 3, 2)],
)
def test_a_page_never_asks_past_a_64_bit_count(limit: int, offset: int, asked: int) -> None:
    """Found by review: mongos refuses a skip and limit whose sum passes 2**63 - 1."""
    assert repositories.page_limit(limit, offset) == asked
    assert offset + asked <= 2**63 - 1
