"""The documents a bulk insert sends, checked without a server."""

from __future__ import annotations

import pytest
from bson import ObjectId
from pymongo.errors import BulkWriteError

from persistence import ChatSession, InvalidDataError
from persistence.mongo.bulk import documents_for_insert, duplicate_only
from persistence.mongo.mapping import document_from_session


def _session(session_id: str, messages: int) -> ChatSession:
    session = ChatSession.create("m", session_id=session_id)
    for turn in range(messages):
        session.add_message("user", f"turn {turn}")
    return session


def test_each_new_session_is_one_whole_document_with_a_seq_per_message() -> None:
    sessions = [_session("a", 3), _session("b", 0)]

    documents = documents_for_insert(sessions)

    assert [d["_id"] for d in documents] == ["a", "b"]
    assert documents[0]["message_count"] == 3 and documents[1]["messages"] == []
    seqs = [m.pop("seq") for m in documents[0]["messages"]]
    assert all(isinstance(seq, ObjectId) for seq in seqs) and len(set(seqs)) == 3
    expected = document_from_session(sessions[0])
    # Each document draws its own incarnation.
    assert len(documents[0].pop("incarnation")) == len(expected.pop("incarnation")) == 32
    assert documents[0] == expected


def test_a_session_beyond_16_mib_is_refused_before_anything_is_sent() -> None:
    huge = ChatSession.create("m", session_id="huge")
    for _ in range(17):
        huge.add_message("user", "x" * 1_000_000)

    with pytest.raises(InvalidDataError, match="16 MiB"):
        documents_for_insert([_session("small", 1), huge])


def test_repeated_ids_in_one_batch_are_refused() -> None:
    with pytest.raises(InvalidDataError, match="appears twice"):
        documents_for_insert([_session("a", 1), _session("a", 1)])


def test_only_duplicate_key_errors_mean_already_stored() -> None:
    duplicate = {"writeErrors": [{"index": 1, "code": 11000, "errmsg": "E11000"}], "nInserted": 1}
    other = {"writeErrors": [{"index": 0, "code": 121, "errmsg": "validation"}], "nInserted": 0}

    assert duplicate_only(BulkWriteError(duplicate)) is True
    assert duplicate_only(BulkWriteError(other)) is False
