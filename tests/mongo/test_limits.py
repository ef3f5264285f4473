"""What MongoDB cannot keep is refused before anything is sent."""

from __future__ import annotations

import bson
import pytest
from pydantic import ValidationError

from persistence.errors import InvalidDataError
from persistence.models import MAX_METADATA_DEPTH, ChatSession
from persistence.mongo.errors import MAX_DOCUMENT_BYTES
from persistence.mongo.mapping import check_save_size, document_from_session, save_update


def _session_with(content_bytes: int) -> ChatSession:
    session = ChatSession.create("gemini-pro", session_id="big")
    session.add_message("user", "x" * content_bytes)
    return session


def test_a_save_crossing_16_mib_is_refused_naming_the_limit() -> None:
    session = _session_with(MAX_DOCUMENT_BYTES)
    update = save_update(session, session.messages)
    with pytest.raises(InvalidDataError, match="16 MiB") as raised:
        check_save_size(session.session_id, update)
    assert "'big'" in str(raised.value)


def test_a_save_just_under_16_mib_is_sent() -> None:
    # One word repeated: its search tokens add a few bytes, not a second copy.
    session = ChatSession.create("gemini-pro", session_id="big")
    session.add_message("user", "x " * ((MAX_DOCUMENT_BYTES - 4096) // 2))
    update = save_update(session, session.messages)
    check_save_size(session.session_id, update)
    assert len(bson.encode(document_from_session(session))) <= MAX_DOCUMENT_BYTES


def test_the_size_check_counts_the_pushed_messages_together() -> None:
    session = ChatSession.create("gemini-pro", session_id="many")
    for _ in range(3):
        session.add_message("user", "y" * (MAX_DOCUMENT_BYTES // 3))
    with pytest.raises(InvalidDataError, match="16 MiB"):
        check_save_size(session.session_id, save_update(session, session.messages))
    # One of them alone fits.
    check_save_size(session.session_id, save_update(session, session.messages[:1]))


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
