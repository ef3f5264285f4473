"""A sharded cluster: what initialize() creates there, without a server."""

from __future__ import annotations

from persistence.mongo.connection import indexes_to_create
from persistence.mongo.documents import FILE_INDEXES, SESSION_INDEXES


def _names(indexes: list) -> list[str]:
    return [index.document["name"] for index in indexes]


def test_a_replica_set_or_standalone_server_gets_every_index() -> None:
    assert _names(indexes_to_create(SESSION_INDEXES, sharded_cluster=False)) == _names(
        SESSION_INDEXES
    )


def test_a_sharded_cluster_gets_no_unique_index_that_would_stop_sharding_by_session() -> None:
    created = indexes_to_create(SESSION_INDEXES, sharded_cluster=True)
    assert "ux_chat_sessions_message_id" in _names(SESSION_INDEXES)
    assert _names(created) == [
        "ix_chat_sessions_message_id" if name == "ux_chat_sessions_message_id" else name
        for name in _names(SESSION_INDEXES)
    ]
    assert not any(index.document.get("unique") for index in created)
    assert "ix_chat_sessions_search_tokens" in _names(created)


def test_a_sharded_cluster_still_looks_message_ids_up_through_an_index() -> None:
    """Found by review: the unique index was dropped with nothing in its place, so a
    save's look for the message ids it adds scanned the collection on every shard."""
    (lookup,) = [
        index.document
        for index in indexes_to_create(SESSION_INDEXES, sharded_cluster=True)
        if index.document["name"] == "ix_chat_sessions_message_id"
    ]
    (unique,) = [
        index.document
        for index in SESSION_INDEXES
        if index.document["name"] == "ux_chat_sessions_message_id"
    ]
    assert lookup == {
        **{key: value for key, value in unique.items() if key != "unique"},
        "name": "ix_chat_sessions_message_id",
    }
    assert _names(indexes_to_create(FILE_INDEXES, sharded_cluster=True)) == _names(FILE_INDEXES)
