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
        name for name in _names(SESSION_INDEXES) if name != "ux_chat_sessions_message_id"
    ]
    assert "ix_chat_sessions_search_tokens" in _names(created)
    assert _names(indexes_to_create(FILE_INDEXES, sharded_cluster=True)) == _names(FILE_INDEXES)
