"""The update documents a save sends, checked without a server.

`write_session` sends `save_filter` and `save_update` of exactly the messages that
`ChatSession.unstored_messages` names; these tests pin what that update contains.
"""

from __future__ import annotations

from bson import ObjectId

from persistence.models import ChatSession
from persistence.mongo.mapping import document_from_message, save_filter, save_update

TOKEN = "storage-token"


def _stored_session(messages: int) -> ChatSession:
    session = ChatSession.create("gemini-pro", session_id="s-1", metadata={"topic": "x"})
    for i in range(messages):
        session.add_message("user" if i % 2 == 0 else "assistant", f"message {i}")
    session.mark_stored(TOKEN)
    return session


def test_save_after_one_message_pushes_only_that_message() -> None:
    session = _stored_session(200)
    added = session.add_message("user", "the new one", {"n": 1})

    new, certain = session.unstored_messages(TOKEN)
    update = save_update(session, new)

    assert certain is True
    assert new == [added]
    assert set(update) == {"$set", "$push", "$inc"}
    (pushed,) = update["$push"]["messages"]["$each"]
    assert set(update["$push"]) == {"messages"} and set(update["$push"]["messages"]) == {"$each"}
    assert {k: v for k, v in pushed.items() if k != "seq"} == document_from_message(added)
    assert isinstance(pushed["seq"], ObjectId)
    assert update["$inc"] == {"message_count": 1}


def test_each_pushed_message_gets_a_later_store_sequence() -> None:
    session = _stored_session(0)
    for i in range(3):
        session.add_message("user", f"m{i}")
    pushed = save_update(session, session.messages)["$push"]["messages"]["$each"]
    assert [m["content"] for m in pushed] == ["m0", "m1", "m2"]
    assert pushed[0]["seq"] < pushed[1]["seq"] < pushed[2]["seq"]


def test_save_sets_only_the_session_fields_never_the_history_or_its_count() -> None:
    session = _stored_session(3)
    session.add_message("user", "again")
    update = save_update(session, session.unstored_messages(TOKEN)[0])
    assert update["$set"] == {
        "model": session.model,
        "created_at": session.created_at,
        "updated_at": session.updated_at,
        "metadata": session.metadata,
        "status": session.status,
    }
    assert "messages" not in update["$set"]
    assert "message_count" not in update["$set"]


def test_update_size_does_not_grow_with_the_history() -> None:
    short, long = _stored_session(1), _stored_session(2000)
    for session in (short, long):
        session.add_message("user", "same text")
    short_update = save_update(short, short.unstored_messages(TOKEN)[0])
    long_update = save_update(long, long.unstored_messages(TOKEN)[0])
    assert len(short_update["$push"]["messages"]["$each"]) == 1
    assert len(long_update["$push"]["messages"]["$each"]) == 1


def test_saving_twice_sends_no_message_the_second_time() -> None:
    session = _stored_session(5)
    session.add_message("user", "once")
    first = save_update(session, session.unstored_messages(TOKEN)[0])
    session.mark_stored(TOKEN)
    new, certain = session.unstored_messages(TOKEN)
    second = save_update(session, new)
    assert len(first["$push"]["messages"]["$each"]) == 1
    assert certain is True and new == []
    assert "$push" not in second and "$inc" not in second
    # A session created by this save starts empty; an existing one keeps its history.
    assert second["$setOnInsert"] == {"messages": [], "message_count": 0}


def test_a_fresh_object_is_not_trusted_to_be_new() -> None:
    session = ChatSession.create("gemini-pro", session_id="s-1")
    session.add_message("user", "hello")
    new, certain = session.unstored_messages(TOKEN)
    # The store may already hold these: write_session reads the stored ids first.
    assert certain is False
    assert new == session.messages


def test_filter_refuses_to_push_a_message_the_session_already_holds() -> None:
    session = _stored_session(2)
    added = session.add_message("user", "guarded")
    assert save_filter("s-1", [added]) == {
        "_id": "s-1",
        "messages.message_id": {"$nin": [added.message_id]},
    }
    assert save_filter("s-1", []) == {"_id": "s-1"}


def test_filter_expects_the_history_this_object_saw_stored() -> None:
    session = _stored_session(3)
    added = session.add_message("user", "fourth")
    # Fewer stored (deleted meanwhile): no match, so the save re-sends the history.
    assert save_filter("s-1", [added], 3) == {
        "_id": "s-1",
        "message_count": {"$gte": 3},
        "messages.message_id": {"$nin": [added.message_id]},
    }
    assert save_filter("s-1", [], 3) == {"_id": "s-1", "message_count": {"$gte": 3}}
