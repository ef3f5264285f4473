"""The checked save path without a server: what it reads, what it refuses, what it merges.

Rows are written here as the inspection aggregation returns them (the session with
only the messages the plan names, other sessions holding one of its new ids).
"""

from __future__ import annotations

import copy
from typing import Any

import pytest

from persistence.errors import InvalidDataError, SessionConflictError, SessionDeletedError
from persistence.models import ChatSession
from persistence.mongo import updates
from persistence.mongo.documents import SessionView
from persistence.mongo.inspection import Inspection, inspection, prepare, refuse_shared_ids
from persistence.mongo.mapping import document_from_message, session_from_view
from tests.mongo.test_updates import INCARNATION, TOKEN, assert_no_caller_string_is_parsed, stored


def row(session: ChatSession, *, revision: Any = 3, **changes: Any) -> dict[str, Any]:
    """The session's document as an inspection reads it, with another writer's changes."""
    document: dict[str, Any] = {
        "_id": session.session_id,
        "model": session.model,
        "status": session.status,
        "created_at": session.created_at,
        "metadata": copy.deepcopy(session.metadata),
        "revision": revision,
        "incarnation": INCARNATION,
        "messages": [],
    }
    document.update(changes)
    return document


def prepared(session: ChatSession, *rows: dict[str, Any]) -> updates.Write:
    return Inspection(rows).prepare(session.plan_save(TOKEN), "new-incarnation")


def test_a_session_that_is_gone_is_refused_as_deleted() -> None:
    session = stored(1)
    session.metadata["title"] = "t"
    with pytest.raises(SessionDeletedError):
        prepared(session)


def test_a_session_deleted_and_created_again_is_refused_as_deleted() -> None:
    session = stored(1)
    session.add_message("user", "late")
    with pytest.raises(SessionDeletedError):
        prepared(session, row(session, revision=1, incarnation="another"))


def test_the_same_key_changed_by_another_writer_is_a_conflict() -> None:
    session = stored(1)
    session.metadata["title"] = "mine"
    theirs = row(session, revision=4, metadata={"topic": "x", "title": "theirs"})
    with pytest.raises(SessionConflictError) as raised:
        prepared(session, theirs)
    assert raised.value.conflicts == ["metadata['title']"]


def test_other_keys_and_fields_another_writer_changed_are_kept() -> None:
    session = stored(1)
    session.metadata["title"] = "mine"
    theirs = row(session, revision=5, status="archived", metadata={"topic": "x", "tags": ["b"]})

    write = prepared(session, theirs)

    values = write.pipeline[0]["$set"]
    assert values["metadata"] == {"$literal": {"topic": "x", "tags": ["b"], "title": "mine"}}
    assert "status" not in values
    # Guarded by the revision read: a writer in between makes it match nothing.
    assert write.query == {"_id": "s-1", "revision": 5, "incarnation": INCARNATION}
    assert write.saved == updates.Saved(6, INCARNATION, exact=False)


def test_the_same_value_set_by_both_is_no_conflict() -> None:
    session = stored(1)
    session.status = "archived"
    write = prepared(session, row(session, revision=9, status="archived"))
    # Another writer wrote since: the holder no longer knows all that is stored.
    assert write.saved == updates.Saved(10, INCARNATION, exact=False)


def test_a_field_set_to_another_value_by_another_writer_conflicts() -> None:
    session = stored(1)
    session.status = "expired"
    with pytest.raises(SessionConflictError, match="status"):
        prepared(session, row(session, revision=4, status="archived"))


def test_editing_a_message_another_writer_removed_or_edited_conflicts() -> None:
    session = stored(2)
    target = session.messages[1]
    session.edit_message(target.message_id, content="mine")
    with pytest.raises(SessionConflictError, match="removed by another writer"):
        prepared(session, row(session, revision=4))
    theirs = document_from_message(target.model_copy(update={"content": "theirs"}))
    with pytest.raises(SessionConflictError, match="edited by another writer"):
        prepared(session, row(session, revision=4, messages=[theirs]))
    # Nobody wrote since: no check, the edit goes through.
    assert prepared(session, row(session, messages=[document_from_message(target)])).saved == (
        updates.Saved(4, INCARNATION, exact=True)
    )


def test_a_document_written_before_revisions_is_revision_1_and_its_first_write_sets_both() -> None:
    old = ChatSession.create("gemini-pro", session_id="s-1")
    document = row(old, message_count=0, updated_at=old.updated_at)
    del document["revision"], document["incarnation"]
    legacy = session_from_view(SessionView.model_validate(document), TOKEN)
    assert legacy.revision == 1
    legacy.metadata["title"] = "first write"

    write = prepared(legacy, document)

    # None matches only a document that has no such field.
    assert write.query == {"_id": "s-1", "revision": None, "incarnation": None}
    values = write.pipeline[0]["$set"]
    assert values["revision"] == {"$literal": 2}
    assert values["incarnation"] == {"$literal": ""}


def test_a_new_message_id_held_by_another_session_is_refused_naming_both() -> None:
    session = stored(1)
    taken = session.add_message("user", "dup")
    other = {"_id": "s-other", "messages": [document_from_message(taken)]}
    with pytest.raises(InvalidDataError, match=rf"'{taken.message_id}'.*'s-other'"):
        prepared(session, row(session), other)


def test_a_holder_certain_of_its_base_never_pushes_a_message_twice() -> None:
    session = stored(1)
    added = session.add_message("user", "once")
    here = row(session, revision=4, messages=[document_from_message(added)])
    with pytest.raises(InvalidDataError, match="already stored in this session"):
        prepared(session, here)


def test_after_a_save_of_unknown_outcome_only_the_missing_messages_are_sent() -> None:
    session = stored(1)
    landed = session.add_message("user", "landed")
    missing = session.add_message("user", "missing")
    session.save_failed(TOKEN)
    here = row(session, revision=4, messages=[document_from_message(landed)])

    write = prepared(session, here)

    _mapped, appended = write.pipeline[0]["$set"]["messages"]["$concatArrays"]
    assert [m["message_id"] for m in appended["$literal"]] == [missing.message_id]
    assert write.query["messages.message_id"] == {"$nin": [missing.message_id]}


def test_a_new_object_creates_the_session_when_none_is_stored() -> None:
    session = ChatSession.create("m", session_id="s-new")
    session.add_message("user", "hi")
    write = prepared(session)
    assert write.insert is not None and write.insert["incarnation"] == "new-incarnation"
    assert write.saved == updates.Saved(1, "new-incarnation", exact=True)


def test_a_new_object_under_a_stored_id_wins_its_values_and_adds_only_what_is_missing() -> None:
    old = stored(2, metadata={"a": 1, "b": 2})
    newcomer = ChatSession.create("other-model", session_id="s-1", metadata={"b": 3, "c": 4})
    newcomer.messages.append(old.messages[0])
    added = newcomer.add_message("user", "hello from elsewhere")
    document = row(old, revision=6, messages=[document_from_message(old.messages[0])])

    write = prepared(newcomer, document)

    values = write.pipeline[0]["$set"]
    assert values["model"] == {"$literal": "other-model"}
    assert values["metadata"] == {"$literal": {"topic": "x", "a": 1, "b": 3, "c": 4}}
    _mapped, appended = values["messages"]["$concatArrays"]
    assert [m["message_id"] for m in appended["$literal"]] == [added.message_id]
    assert write.saved == updates.Saved(7, INCARNATION, exact=False)


def test_the_inspection_reads_only_the_messages_a_plan_names() -> None:
    session = stored(3)
    session.edit_message(session.messages[0].message_id, content="e")
    added = session.add_message("user", "$where")
    plan = session.plan_save(TOKEN)

    match, project = inspection([plan])

    assert match == {
        "$match": {
            "$or": [{"_id": {"$in": ["s-1"]}}, {"messages.message_id": {"$in": [added.message_id]}}]
        }
    }
    named = project["$project"]["messages"]["$filter"]["cond"]["$in"][1]["$literal"]
    assert sorted(named) == sorted([added.message_id, session.messages[0].message_id])
    assert_no_caller_string_is_parsed([match, project])


def test_one_refused_session_refuses_the_batch_before_anything_is_sent() -> None:
    sessions = [stored(1, session_id=f"s-{index}") for index in range(3)]
    for index, session in enumerate(sessions):
        session.metadata["n"] = index
    rows = [row(session) for session in sessions]
    rows[1]["revision"] = 4
    rows[1]["metadata"]["n"] = "someone else's"
    seen = Inspection(rows)
    with pytest.raises(SessionConflictError, match=r"metadata\['n'\]"):
        [seen.prepare(session.plan_save(TOKEN), "x") for session in sessions]


def test_a_batch_that_adds_one_message_id_twice_is_refused() -> None:
    first, second = stored(0), ChatSession.create("m", session_id="s-2")

    shared = first.add_message("user", "one")
    second.messages.append(shared.model_copy(update={"session_id": "s-2"}))
    with pytest.raises(InvalidDataError, match=rf"'{shared.message_id}'.*'s-1'.*'s-2'"):
        refuse_shared_ids([first.plan_save(TOKEN), second.plan_save(TOKEN)])


def test_prepare_refuses_a_deleted_session_before_looking_at_anything_else() -> None:
    session = stored(1)
    session.add_message("user", "x")
    with pytest.raises(SessionDeletedError):
        prepare(session.plan_save(TOKEN), None, {"any": "s-2"}, "x")


def test_with_force_the_holders_values_win_for_what_it_changed() -> None:
    session = stored(2)
    gone = session.messages[1]
    session.metadata["title"] = "mine"
    session.status = "expired"
    session.edit_message(gone.message_id, content="edited after it was removed")
    theirs = row(session, revision=4, status="archived", metadata={"topic": "x", "title": "theirs"})

    write = Inspection([theirs]).prepare(session.plan_save(TOKEN), "x", force=True)

    values = write.pipeline[0]["$set"]
    assert values["status"] == {"$literal": "expired"}
    assert values["metadata"] == {"$literal": {"topic": "x", "title": "mine"}}
    # The edit of a message removed meanwhile replaces nothing: $map finds no such id.
    replace = values["messages"]["$map"]["in"]["$let"]
    assert replace["vars"]["at"]["$indexOfArray"][0] == {"$literal": [gone.message_id]}
    assert write.saved == updates.Saved(5, INCARNATION, exact=False)


def test_a_base_that_merged_others_work_is_checked_even_at_its_own_revision() -> None:
    session = stored(1)
    plan = session.plan_save(TOKEN)
    # A save that merged other writers' work: the base is not exact.
    session.saved_to(TOKEN, plan, 5, INCARNATION, exact=False)
    session.metadata["title"] = "mine"
    theirs = row(session, revision=5, metadata={"topic": "x", "title": "set by the merge"})
    with pytest.raises(SessionConflictError, match="title"):
        prepared(session, theirs)
