"""The commands a save sends, checked without a server.

`writes.write_plan` sends `updates.append` (appends only), `updates.compare_and_set`
(an exact base) or the write `inspection.prepare` builds from what it read; these
tests pin what those commands contain, and that no caller's string is ever read as
an expression.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from bson import ObjectId

from persistence.models import ChatSession
from persistence.mongo import updates
from persistence.mongo.mapping import document_from_message
from persistence.mongo.repositories import status_update

TOKEN = "storage-token"
INCARNATION = "0123456789abcdef"

# Operators and paths the pipelines may spell; every other "$" string must sit in a $literal.
OPERATORS = {
    "$set",
    "$max",
    "$literal",
    "$ifNull",
    "$filter",
    "$not",
    "$in",
    "$map",
    "$let",
    "$indexOfArray",
    "$cond",
    "$eq",
    "$mergeObjects",
    "$arrayElemAt",
    "$concatArrays",
    "$size",
    "$add",
    "$match",
    "$or",
    "$project",
}
PATHS = {"$updated_at", "$messages", "$$m", "$$m.message_id", "$$at", "$revision", "$incarnation"}


def stored(
    messages: int = 0,
    *,
    revision: int = 3,
    session_id: str = "s-1",
    metadata: dict[str, Any] | None = None,
) -> ChatSession:
    """A session as a storage holds it at `revision` (bookkeeping only, no server)."""
    session = ChatSession.create(
        "gemini-pro", session_id=session_id, metadata={"topic": "x", **(metadata or {})}
    )
    for i in range(messages):
        session.add_message("user" if i % 2 == 0 else "assistant", f"message {i}")
    session.saved_to(TOKEN, session.plan_save(TOKEN), revision, INCARNATION, exact=True)
    return session


def unquoted(node: Any) -> Iterator[str]:
    """Every string of a command that the server would parse: outside any $literal."""
    if isinstance(node, dict):
        for key, child in node.items():
            yield key
            if key != "$literal":
                yield from unquoted(child)
    elif isinstance(node, list):
        for child in node:
            yield from unquoted(child)
    elif isinstance(node, str):
        yield node


def assert_no_caller_string_is_parsed(pipeline: Any) -> None:
    for text in unquoted(pipeline):
        if text.startswith("$"):
            assert text in OPERATORS | PATHS, text


def test_save_after_one_message_pushes_only_that_message() -> None:
    session = stored(200)
    added = session.add_message("user", "the new one", {"n": 1})

    query, update = updates.append(session.plan_save(TOKEN))

    assert query == {
        "_id": "s-1",
        "incarnation": INCARNATION,
        "messages.message_id": {"$nin": [added.message_id]},
    }
    assert set(update) == {"$push", "$inc", "$max"}
    (pushed,) = update["$push"]["messages"]["$each"]
    assert {k: v for k, v in pushed.items() if k != "seq"} == document_from_message(added)
    assert isinstance(pushed["seq"], ObjectId)
    assert update["$inc"] == {"revision": 1, "message_count": 1}
    assert update["$max"] == {"updated_at": session.updated_at}


def test_an_append_never_sets_a_field_another_writer_may_have_changed() -> None:
    session = stored(3)
    session.add_message("user", "again")
    _query, update = updates.append(session.plan_save(TOKEN))
    assert "$set" not in update and "$unset" not in update


def test_each_pushed_message_gets_a_later_store_sequence() -> None:
    session = stored(0)
    for i in range(3):
        session.add_message("user", f"m{i}")
    _query, update = updates.append(session.plan_save(TOKEN))
    pushed = update["$push"]["messages"]["$each"]
    assert [m["content"] for m in pushed] == ["m0", "m1", "m2"]
    assert pushed[0]["seq"] < pushed[1]["seq"] < pushed[2]["seq"]


def test_append_size_does_not_grow_with_the_history() -> None:
    sizes = []
    for history in (1, 2000):
        session = stored(history)
        session.add_message("user", "same text")
        query, update = updates.append(session.plan_save(TOKEN))
        sizes.append(
            (len(query["messages.message_id"]["$nin"]), len(update["$push"]["messages"]["$each"]))
        )
    assert sizes == [(1, 1), (1, 1)]


def test_a_save_of_updated_at_alone_pushes_nothing() -> None:
    session = stored(2)
    session.add_message("user", "x")
    session.pop_message()  # never stored: the plan is only the later updated_at
    plan = session.plan_save(TOKEN)
    assert plan.appends_only and not plan.appends
    query, update = updates.append(plan)
    assert query == {"_id": "s-1", "incarnation": INCARNATION}
    assert update == {"$inc": {"revision": 1}, "$max": {"updated_at": session.updated_at}}


def test_compare_and_set_is_guarded_by_the_revision_the_holder_saw() -> None:
    session = stored(2, revision=7)
    session.metadata["title"] = "Trip"
    session.status = "archived"

    write = updates.compare_and_set(session.plan_save(TOKEN))

    assert write.query == {"_id": "s-1", "revision": 7, "incarnation": INCARNATION}
    assert write.saved == updates.Saved(8, INCARNATION, exact=True)
    (stage,) = write.pipeline
    values = stage["$set"]
    assert values["status"] == {"$literal": "archived"}
    assert values["metadata"] == {"$literal": {"topic": "x", "title": "Trip"}}
    assert values["revision"] == {"$literal": 8}
    assert values["updated_at"] == {"$max": ["$updated_at", {"$literal": session.updated_at}]}
    # Fields the holder did not change are left to whoever changed them.
    assert "model" not in values and "created_at" not in values and "messages" not in values


def test_edits_removals_and_appends_go_in_one_pipeline_update() -> None:
    session = stored(4)
    first, second = session.messages[0], session.messages[1]
    cut = [m.message_id for m in session.messages[2:]]
    session.edit_message(first.message_id, content="edited")
    session.rewind(second.message_id)
    added = session.add_message("user", "new")

    write = updates.compare_and_set(session.plan_save(TOKEN))

    assert write.query["messages.message_id"] == {"$nin": [added.message_id]}
    first_stage, count_stage = write.pipeline
    mapped, appended = first_stage["$set"]["messages"]["$concatArrays"]
    assert [m["message_id"] for m in appended["$literal"]] == [added.message_id]
    filtered = mapped["$map"]["input"]["$filter"]
    assert filtered["input"] == {"$ifNull": ["$messages", []]}
    assert sorted(filtered["cond"]["$not"][0]["$in"][1]["$literal"]) == sorted(cut)
    replace = mapped["$map"]["in"]["$let"]
    assert replace["vars"]["at"]["$indexOfArray"][0] == {"$literal": [first.message_id]}
    kept, edited = replace["in"]["$cond"][1:]
    assert kept == "$$m"
    # What the holder changed of the message over the stored one (its content: not its
    # metadata, which another writer may have changed meanwhile).
    document = document_from_message(session.messages[0])
    assert edited["$mergeObjects"][1]["$arrayElemAt"][0] == {
        "$literal": [{name: document[name] for name in ("message_id", "content", "search_tokens")}]
    }
    # message_count is counted after the history changed, in a stage of its own.
    assert count_stage == {"$set": {"message_count": {"$size": "$messages"}}}


def test_hostile_strings_are_never_read_as_expressions() -> None:
    session = ChatSession.create("$model", session_id="$s", metadata={"k": "$$ROOT"})
    hostile = session.add_message("user", "$where", {"v": "$messages"})
    session.add_message("user", "{$literal: 1}")
    session.saved_to(TOKEN, session.plan_save(TOKEN), 1, INCARNATION, exact=True)
    session.edit_message(hostile.message_id, content="$$m.message_id", metadata={"x": "$concat"})
    session.pop_message()
    session.messages.append(
        session.messages[0].model_copy(update={"message_id": "$$at", "content": "$size"})
    )
    session.model = "$$CURRENT"
    session.metadata["ok"] = "$$REMOVE"  # a "$ok" key is refused by the save itself

    write = updates.compare_and_set(session.plan_save(TOKEN))

    assert_no_caller_string_is_parsed(write.pipeline)
    assert_no_caller_string_is_parsed(status_update("expired"))


def test_a_new_session_is_revision_1_of_a_fresh_incarnation() -> None:
    session = ChatSession.create("m", session_id="s-9", metadata={"a": 1})
    session.add_message("user", "hello")

    document = updates.new_document(session.plan_save(TOKEN), "fresh")

    assert document["revision"] == 1 and document["incarnation"] == "fresh"
    assert document["message_count"] == 1 == len(document["messages"])
    assert isinstance(document["messages"][0]["seq"], ObjectId)
    assert document["metadata"] == {"a": 1} and document["_id"] == "s-9"


def test_status_changes_move_the_revision_of_old_documents_too() -> None:
    (stage,) = status_update("archived")
    values = stage["$set"]
    assert values["status"] == {"$literal": "archived"}
    # A document written before revisions reads as revision 1: it becomes 2.
    assert values["revision"] == {"$add": [{"$ifNull": ["$revision", 1]}, 1]}
    assert values["incarnation"] == {"$ifNull": ["$incarnation", ""]}
