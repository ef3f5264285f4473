"""Document classes and index definitions, checked without a server."""

from __future__ import annotations

from typing import Any

from beanie.odm.utils.projection import get_projection
from pymongo import IndexModel

from persistence.mongo.documents import (
    FILE_INDEXES,
    FILES_COLLECTION,
    SESSION_INDEXES,
    SESSIONS_COLLECTION,
    FileRecordDocument,
    SessionDocument,
    SessionSummary,
    SessionView,
    bind_documents,
)


def _by_name(indexes: list[IndexModel]) -> dict[str, dict[str, Any]]:
    return {index.document["name"]: index.document for index in indexes}


def test_session_listing_indexes_follow_the_page_order() -> None:
    indexes = _by_name(list(SESSION_INDEXES))
    assert list(indexes["ix_chat_sessions_status_updated"]["key"].items()) == [
        ("status", 1),
        ("updated_at", -1),
        ("_id", -1),
    ]
    assert list(indexes["ix_chat_sessions_updated"]["key"].items()) == [
        ("updated_at", -1),
        ("_id", -1),
    ]


def test_search_tokens_have_an_ascending_index_that_bounds_prefix_ranges() -> None:
    indexes = _by_name(list(SESSION_INDEXES))
    assert indexes["ix_chat_sessions_search_tokens"]["key"] == {"messages.search_tokens": 1}
    # No text index is left to keep in step on every write.
    assert not any("text" in index["key"].values() for index in indexes.values())


def test_message_ids_are_unique_across_sessions_without_colliding_on_empty_histories() -> None:
    unique = _by_name(list(SESSION_INDEXES))["ux_chat_sessions_message_id"]
    assert unique["key"] == {"messages.message_id": 1}
    assert unique["unique"] is True
    assert unique["partialFilterExpression"] == {"messages.message_id": {"$exists": True}}


def test_file_indexes_serve_expiry_and_listing() -> None:
    indexes = _by_name(list(FILE_INDEXES))
    assert indexes["ix_uploaded_files_expires_at"]["key"] == {"expires_at": 1}
    assert list(indexes["ix_uploaded_files_uploaded"]["key"].items()) == [
        ("uploaded_at", -1),
        ("_id", -1),
    ]


def test_documents_name_their_collections_and_indexes() -> None:
    assert SessionDocument.Settings.name == SESSIONS_COLLECTION
    assert SessionDocument.Settings.indexes is SESSION_INDEXES
    assert FileRecordDocument.Settings.name == FILES_COLLECTION
    assert FileRecordDocument.Settings.indexes is FILE_INDEXES


def test_listing_projection_leaves_messages_out() -> None:
    summary = get_projection(SessionSummary)
    full = get_projection(SessionView)
    assert summary is not None and full is not None
    assert "messages" not in summary
    # The history without the search tokens, which only searches read.
    assert full == {
        **summary,
        **{f"messages.{field}": 1 for field in ("message_id", "role", "content")},
        **{f"messages.{field}": 1 for field in ("created_at", "metadata")},
    }
    assert summary["_id"] == 1


def test_each_storage_binds_its_own_document_classes() -> None:
    first, second = bind_documents(), bind_documents()
    assert first.sessions is not second.sessions
    assert first.files is not second.files
    assert issubclass(first.sessions, SessionDocument)
    assert issubclass(second.files, FileRecordDocument)
    assert first.models == [first.sessions, first.files]
