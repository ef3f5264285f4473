"""Several holders of one session: revisions, merges, conflicts, deletes and edits.

Each test has a second holder open the same store through its own storage (its own
connections), as another server process would; objects keep their own bookkeeping.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
from pydantic import ValidationError

from persistence import (
    ChatMessage,
    ChatSession,
    InvalidDataError,
    SessionConflictError,
    SessionDeletedError,
    SessionManager,
    SessionStorage,
    SQLiteSessionStorage,
)
from tests.contract.conftest import Reopen
from tests.factories import conversation
from tests.factories import stored as _load


async def _stored(storage: SessionStorage, turns: int = 2, **fields: object) -> ChatSession:
    session = conversation(turns, **fields)  # type: ignore[arg-type]
    await storage.save_session(session)
    return session


async def test_every_write_increments_the_revision_and_the_holder_remembers_it(
    storage: SessionStorage,
) -> None:
    session = await _stored(storage)
    first = session.revision
    assert first is not None

    session.add_message("user", "again")
    await storage.save_session(session)
    assert session.revision == first + 1

    loaded = await _load(storage, session.session_id)
    assert loaded.revision == first + 1
    loaded.metadata["title"] = "t"
    await storage.save_session(loaded)
    assert loaded.revision == first + 2
    assert await storage.set_status([session.session_id], "archived") == 1
    assert (await _load(storage, session.session_id)).revision == first + 3


async def test_a_save_with_nothing_changed_writes_nothing(storage: SessionStorage) -> None:
    session = await _stored(storage)
    revision = session.revision

    assert await storage.save_session(session) is True
    assert await storage.save_session(session) is True

    loaded = await _load(storage, session.session_id)
    assert loaded.revision == revision and loaded.message_count == 2


async def test_a_count_assigned_by_hand_is_set_back_by_a_save_that_writes_nothing(
    storage: SessionStorage,
) -> None:
    """Found by attack: `message_count = 99` on a stored session, saved with nothing
    else changed, returned True and stayed on the object (and in a SessionManager's
    exports of it), though the store kept 2. The count is derived: the save sets the
    object's back to what it knows of the store, as a save that writes does."""
    session = await _stored(storage)
    partial = await storage.load_session(session.session_id, last=1)
    assert partial is not None and partial.message_count == 2

    for held in (session, partial):
        held.message_count = 99
        assert await storage.save_session(held) is True
        assert held.message_count == 2
    manager = SessionManager(storage)
    managed = await manager.get_session(session.session_id)
    assert managed is not None
    managed.message_count = 50
    assert await manager.auto_save(managed) is True
    exported = await manager.export_session(session.session_id, "json")
    assert exported is not None and json.loads(exported)["message_count"] == 2
    assert (await _load(storage, session.session_id)).message_count == 2


async def test_every_read_records_exactly_what_the_store_held(
    storage: SessionStorage,
) -> None:
    # Every field away from its default: a read's record of the store (made when first
    # needed) must hold each as read, or the holder sees changes it never made.
    session = await _stored(storage, model="m-recorded", metadata={"title": "t", "n": [1]})
    session.status = "archived"
    session.created_at -= timedelta(days=3)
    await storage.save_session(session)
    sid = session.session_id

    page = await storage.list_sessions(status="archived")
    partial = await storage.load_session(sid, last=1)
    assert partial is not None
    for read in (
        await _load(storage, sid),
        partial,
        *await storage.load_sessions([sid]),
        *[listed for listed in page if listed.session_id == sid],
    ):
        assert not storage.has_unsaved_changes(read)
        revision = read.revision
        assert await storage.save_session(read) is True
        assert read.revision == revision  # nothing to write
        read.metadata["title"] = "changed"
        assert storage.has_unsaved_changes(read)
    assert (await _load(storage, sid)).revision == session.revision


async def test_a_session_loaded_through_one_storage_is_known_to_another_on_the_store(
    storage: SessionStorage, reopen: Reopen
) -> None:
    # A service that opens its storage again (a reconnect, a second pool) or hands a
    # loaded session to another storage of the same store: the save must still write
    # edits and removals, see conflicts, and never re-insert a deleted session.
    session = await _stored(storage, turns=4)
    sid = session.session_id
    async with reopen(storage) as other:
        assert other.token == storage.token
        loaded = await _load(other, sid)
        loaded.rewind(loaded.messages[1].message_id)
        loaded.edit_message(loaded.messages[0].message_id, content="edited")
        await storage.save_session(loaded)
        assert not storage.has_unsaved_changes(loaded)
        assert [m.content for m in (await _load(other, sid)).messages] == ["edited", "message 1"]

        stale = await _load(other, sid)
        fresh = await _load(storage, sid)
        fresh.metadata["k"] = "theirs"
        await storage.save_session(fresh)
        stale.metadata["k"] = "mine"
        with pytest.raises(SessionConflictError):
            await storage.save_session(stale)

        held = await _load(other, sid)
        assert await other.delete_session(sid)
        held.add_message("user", "after the delete")
        with pytest.raises(SessionDeletedError):
            await storage.save_session(held)
    assert await storage.load_session(sid) is None


async def test_a_save_planned_inside_a_unit_of_work_that_rolls_back_loses_nothing(
    storage: SessionStorage, reopen: Reopen
) -> None:
    # Another task saves the object the unit of work holds: it plans from what the
    # unit wrote, then the unit rolls back. The unit's message must not be lost.
    session = await _stored(storage, turns=1)
    go = asyncio.Event()

    async def save_beside() -> bool:
        await go.wait()
        return await storage.save_session(session)

    beside = asyncio.create_task(save_beside())  # before the unit: not inside it
    session.add_message("user", "in the unit")
    async with storage.unit_of_work() as uow:
        await uow.sessions.add(session)
        session.add_message("user", "saved beside it")
        go.set()
        await asyncio.sleep(0.2)  # it plans now, then waits for the unit's lock
    assert await beside is True
    await storage.save_session(session)
    assert not storage.has_unsaved_changes(session)
    async with reopen(storage) as other:
        stored = await _load(other, session.session_id)
    assert sorted(m.content for m in stored.messages) == sorted(
        ["message 0", "in the unit", "saved beside it"]
    )
    assert stored.message_count == 3


async def test_a_stale_copy_keeps_what_another_writer_set(
    storage: SessionStorage, reopen: Reopen
) -> None:
    session = await _stored(storage)
    async with reopen(storage) as other:
        stale = await _load(other, session.session_id)

        session.metadata["title"] = "Trip plans"
        session.status = "archived"
        await storage.save_session(session)

        stale.add_message("user", "one more thing")
        await other.save_session(stale)

    loaded = await _load(storage, session.session_id)
    assert loaded.status == "archived"
    assert loaded.metadata == {"title": "Trip plans"}
    assert [m.content for m in loaded.messages] == ["message 0", "message 1", "one more thing"]
    assert loaded.message_count == 3


async def test_metadata_merges_per_top_level_key(storage: SessionStorage, reopen: Reopen) -> None:
    session = await _stored(storage, metadata={"keep": 1, "drop": 2})
    async with reopen(storage) as other:
        copy = await _load(other, session.session_id)

        session.metadata["title"] = "A"
        del session.metadata["drop"]
        await storage.save_session(session)

        copy.metadata["tags"] = ["b"]
        await other.save_session(copy)

    loaded = await _load(storage, session.session_id)
    assert loaded.metadata == {"keep": 1, "title": "A", "tags": ["b"]}


async def test_the_same_key_changed_by_two_holders_is_a_conflict_and_nothing_is_written(
    storage: SessionStorage, reopen: Reopen
) -> None:
    session = await _stored(storage)
    async with reopen(storage) as other:
        copy = await _load(other, session.session_id)

        session.metadata["title"] = "from A"
        await storage.save_session(session)

        copy.metadata["title"] = "from B"
        copy.metadata["tags"] = ["b"]
        copy.add_message("user", "B's message")
        with pytest.raises(SessionConflictError, match=r"metadata\['title'\]") as raised:
            await other.save_session(copy)
        assert raised.value.conflicts == ["metadata['title']"]

        # Nothing of B's save landed, and B's object still holds its changes.
        loaded = await _load(storage, session.session_id)
        assert loaded.metadata == {"title": "from A"}
        assert loaded.message_count == 2
        assert copy.metadata == {"title": "from B", "tags": ["b"]}
        assert [m.content for m in copy.messages][-1] == "B's message"

        # Reload and reapply.
        again = await _load(other, session.session_id)
        again.metadata["title"] = "from B"
        again.add_message("user", "B's message")
        await other.save_session(again)

    loaded = await _load(storage, session.session_id)
    assert loaded.metadata == {"title": "from B"}
    assert loaded.message_count == 3


async def test_the_same_field_set_to_different_values_conflicts_and_to_the_same_does_not(
    storage: SessionStorage, reopen: Reopen
) -> None:
    session = await _stored(storage)
    async with reopen(storage) as other:
        same = await _load(other, session.session_id)
        different = await _load(other, session.session_id)

        session.status = "archived"
        await storage.save_session(session)

        same.status = "archived"
        await other.save_session(same)

        different.status = "expired"
        with pytest.raises(SessionConflictError, match="status"):
            await other.save_session(different)

    assert (await _load(storage, session.session_id)).status == "archived"


async def test_updated_at_never_moves_backwards(storage: SessionStorage, reopen: Reopen) -> None:
    session = await _stored(storage)
    async with reopen(storage) as other:
        stale = await _load(other, session.session_id)
        stale.updated_at = stale.updated_at - timedelta(days=3)

        session.add_message("user", "recent activity")
        await storage.save_session(session)
        newest = session.updated_at

        stale.metadata["note"] = "only metadata"
        await other.save_session(stale)

    loaded = await _load(storage, session.session_id)
    assert loaded.updated_at == newest
    assert loaded.metadata == {"note": "only metadata"}


async def test_appends_from_several_holders_all_land_in_commit_order(
    storage: SessionStorage, reopen: Reopen
) -> None:
    session = await _stored(storage, turns=0)
    async with reopen(storage) as other:
        copy = await _load(other, session.session_id)
        for turn in range(3):
            session.add_message("user", f"A{turn}")
            await storage.save_session(session)
            copy.add_message("assistant", f"B{turn}")
            await other.save_session(copy)

        loaded = await _load(storage, session.session_id)
        assert [m.content for m in loaded.messages] == ["A0", "B0", "A1", "B1", "A2", "B2"]
        assert loaded.message_count == 6
        assert (await storage.count()).messages == 6


async def test_concurrent_appends_from_many_holders_never_conflict(
    storage: SessionStorage, reopen: Reopen
) -> None:
    session = await _stored(storage, turns=1)
    async with reopen(storage) as other:
        copies = [await _load(other, session.session_id) for _ in range(4)]

        async def append(copy: ChatSession, holder: SessionStorage, tag: int) -> None:
            for turn in range(5):
                copy.add_message("user", f"{tag}-{turn}")
                await holder.save_session(copy)

        await asyncio.gather(*(append(c, other, i) for i, c in enumerate(copies)))

    loaded = await _load(storage, session.session_id)
    assert loaded.message_count == 21 == len(loaded.messages)
    assert len({m.message_id for m in loaded.messages}) == 21


async def _save_via(holder: SessionStorage, session: ChatSession, via: str) -> None:
    if via == "save_session":
        await holder.save_session(session)
        return
    async with holder.unit_of_work() as uow:
        await uow.sessions.add(session)
        await uow.commit()


# Appends alone take each backend's shortest way (one statement on PostgreSQL; from
# writes.COPIED_APPENDS messages on, a COPY sent in parts), also in a unit of work and
# for many messages at once: each must still see the deletion.
VIA = pytest.mark.parametrize("via", ["save_session", "unit_of_work"])
APPENDED = pytest.mark.parametrize("appended", [1, 40, 600])


@VIA
@APPENDED
async def test_a_session_deleted_by_another_holder_is_never_brought_back(
    storage: SessionStorage, reopen: Reopen, via: str, appended: int
) -> None:
    session = await _stored(storage, turns=3)
    async with reopen(storage) as other:
        stale = await _load(other, session.session_id)
        assert await storage.delete_session(session.session_id)

        for turn in range(appended):
            stale.add_message("user", f"are you there? {turn}")
        with pytest.raises(SessionDeletedError):
            await _save_via(other, stale, via)
        stale.metadata["title"] = "x"
        with pytest.raises(SessionDeletedError):
            await _save_via(other, stale, via)

    assert await storage.load_session(session.session_id) is None
    assert (await storage.count()).messages == 0


@VIA
@APPENDED
async def test_a_stale_copy_of_a_deleted_and_recreated_session_is_refused(
    storage: SessionStorage, reopen: Reopen, via: str, appended: int
) -> None:
    session = await _stored(storage)
    async with reopen(storage) as other:
        stale = await _load(other, session.session_id)
        await storage.delete_session(session.session_id)
        fresh = ChatSession.create("m", session_id=session.session_id)
        fresh.add_message("user", "new conversation")
        await storage.save_session(fresh)
        for _ in range(3):
            fresh.add_message("user", "more")
            await storage.save_session(fresh)

        for turn in range(appended):
            stale.add_message("user", f"from the old one {turn}")
        with pytest.raises(SessionDeletedError):
            await _save_via(other, stale, via)

    loaded = await _load(storage, session.session_id)
    assert [m.content for m in loaded.messages] == ["new conversation", "more", "more", "more"]


async def test_edit_message_writes_the_edit_and_search_sees_the_new_text(
    storage: SessionStorage,
) -> None:
    session = await _stored(storage, turns=0)
    session.add_message("system", "You are terse. zebraword")
    session.add_message("user", "hello")
    await storage.save_session(session)
    first = session.messages[0]

    edited = session.edit_message(first.message_id, content="You are kind. yakword")
    assert edited.message_id == first.message_id and edited.created_at == first.created_at
    await storage.save_session(session)

    loaded = await _load(storage, session.session_id)
    assert loaded.messages[0].content == "You are kind. yakword"
    assert loaded.message_count == 2 == len(loaded.messages)
    assert [m.message_id for m in await storage.search_messages("yakword")] == [first.message_id]
    assert await storage.search_messages("zebraword") == []

    session.edit_message(first.message_id, metadata={"v": 2})
    await storage.save_session(session)
    loaded = await _load(storage, session.session_id)
    assert loaded.messages[0].metadata == {"v": 2}
    assert loaded.messages[0].content == "You are kind. yakword"


@pytest.mark.parametrize(
    ("old", "new"),
    [(1, True), (0, False), (1, 1.0), (2.0, 2), ([1], [1.0]), ({"x": True}, {"x": 1})],
    ids=repr,
)
async def test_an_edit_that_changes_only_a_metadata_values_type_is_written(
    storage: SessionStorage, reopen: Reopen, old: object, new: object
) -> None:
    """Found by attack: Python takes 1, 1.0 and True for one value, and an edit of
    {"k": 1} to {"k": True} (or 1.0) was never written, though save_session returned
    normally; the stores, and `verify`, tell them apart."""
    session = await _stored(storage, turns=0)
    message = session.add_message("user", "hi", metadata={"k": old})
    await storage.save_session(session)
    session.edit_message(message.message_id, metadata={"k": new})
    await storage.save_session(session)
    stored = (await _load(storage, session.session_id)).messages[0].metadata["k"]
    assert repr(stored) == repr(new)
    # Through a unit of work and the manager's auto-save, by another holder, and back.
    async with reopen(storage) as other:
        held = await _load(other, session.session_id)
        held.edit_message(message.message_id, metadata={"k": old})
        async with other.unit_of_work() as uow:
            await uow.sessions.add(held)
            await uow.commit()
        stored = (await _load(storage, session.session_id)).messages[0].metadata["k"]
        assert repr(stored) == repr(old)
        manager = SessionManager(other)
        managed = await manager.get_session(session.session_id)
        assert managed is not None
        managed.edit_message(message.message_id, metadata={"k": new})
        assert await manager.save_session(managed)
    stored = (await _load(storage, session.session_id)).messages[0].metadata["k"]
    assert repr(stored) == repr(new)


async def test_rewind_and_pop_remove_messages_from_the_store(storage: SessionStorage) -> None:
    session = await _stored(storage, turns=5)
    keep = session.messages[1]

    removed = session.rewind(keep.message_id)
    assert [m.content for m in removed] == ["message 2", "message 3", "message 4"]
    assert session.message_count == 2
    await storage.save_session(session)
    loaded = await _load(storage, session.session_id)
    assert [m.content for m in loaded.messages] == ["message 0", "message 1"]
    assert loaded.message_count == 2 and (await storage.count()).messages == 2

    # Regenerate: drop the last reply and add another.
    popped = session.pop_message()
    assert popped is not None and popped.content == "message 1"
    session.add_message("assistant", "a better answer")
    await storage.save_session(session)
    loaded = await _load(storage, session.session_id)
    assert [m.content for m in loaded.messages] == ["message 0", "a better answer"]

    session.rewind(None)
    await storage.save_session(session)
    loaded = await _load(storage, session.session_id)
    assert loaded.messages == [] and loaded.message_count == 0
    session.add_message("user", "start over")
    await storage.save_session(session)
    assert [m.content for m in (await _load(storage, session.session_id)).messages] == [
        "start over"
    ]


async def test_edits_and_removals_of_unsaved_messages_are_just_appends(
    storage: SessionStorage,
) -> None:
    session = await _stored(storage, turns=1)
    draft = session.add_message("assistant", "draft")
    session.edit_message(draft.message_id, content="final")
    session.add_message("user", "oops")
    session.pop_message()
    await storage.save_session(session)

    loaded = await _load(storage, session.session_id)
    assert [m.content for m in loaded.messages] == ["message 0", "final"]


async def test_editing_a_message_another_holder_edited_or_removed_conflicts(
    storage: SessionStorage, reopen: Reopen
) -> None:
    session = await _stored(storage, turns=3)
    target = session.messages[1].message_id
    async with reopen(storage) as other:
        editor = await _load(other, session.session_id)
        remover = await _load(other, session.session_id)

        session.edit_message(target, content="A's edit")
        await storage.save_session(session)

        editor.edit_message(target, content="B's edit")
        with pytest.raises(SessionConflictError, match=f"message '{target}'"):
            await other.save_session(editor)

        remover.rewind(remover.messages[0].message_id)
        with pytest.raises(SessionConflictError, match="edited by another writer"):
            await other.save_session(remover)

        session.rewind(session.messages[0].message_id)
        await storage.save_session(session)
        late = await _load(other, session.session_id)
        assert len(late.messages) == 1
        editor2 = editor.model_copy()
        editor2.edit_message(target, content="too late")
        with pytest.raises(SessionConflictError, match="removed by another writer"):
            await other.save_session(editor2)

    loaded = await _load(storage, session.session_id)
    assert [m.content for m in loaded.messages] == ["message 0"]


async def test_a_message_replaced_directly_is_refused_and_nothing_is_written(
    storage: SessionStorage,
) -> None:
    session = await _stored(storage, turns=2)
    revision = session.revision
    prompt = session.messages[0]
    session.add_message("user", "pending")
    session.messages[0] = prompt.model_copy(update={"content": "new system prompt"})

    with pytest.raises(InvalidDataError, match=f"message '{prompt.message_id}'.*replaced"):
        await storage.save_session(session)
    with pytest.raises(InvalidDataError):
        await storage.save_session(session)

    loaded = await _load(storage, session.session_id)
    assert loaded.revision == revision
    assert [m.content for m in loaded.messages] == ["message 0", "message 1"]


@pytest.mark.parametrize(
    "change",
    [
        lambda s: s.messages.reverse(),
        lambda s: s.messages.insert(0, s.messages[-1]),
        lambda s: s.messages.pop(0),
        lambda s: s.messages.clear(),
        lambda s: setattr(s, "messages", list(reversed(s.messages))),
        lambda s: s.messages.__delitem__(slice(0, 1)),
        # Found by attack: pydantic's update wrote the list into the copy unseen.
        lambda s: s.model_copy(update={"messages": s.messages[:1]}),
        lambda s: s.model_copy(update={"messages": s.messages[1:], "status": "archived"}),
        lambda s: s.model_copy(update={"messages": []}, deep=True),
    ],
    ids=["reverse", "insert", "list-pop", "clear", "reassign", "del", "copy", "copy-2", "deep"],
)
async def test_a_history_reordered_or_cut_directly_is_refused(
    storage: SessionStorage, change: Callable[[ChatSession], object]
) -> None:
    session = await _stored(storage, turns=3)
    changed = change(session)
    session = changed if isinstance(changed, ChatSession) else session

    with pytest.raises(InvalidDataError, match="directly in `messages`"):
        await storage.save_session(session)
    assert (await _load(storage, session.session_id)).message_count == 3


@pytest.mark.parametrize(
    "make",
    [
        lambda sid: ChatMessage(session_id=sid, role="user", content="x"),
        lambda sid: ChatMessage.model_construct(
            session_id=sid, role="user", content="x", metadata={"k": [1]}
        ),
        lambda sid: ChatMessage(session_id=sid, role="user", content="x").model_copy(
            update={"metadata": {"k": [1]}}
        ),
    ],
    ids=["default", "model_construct", "model_copy"],
)
async def test_a_message_made_past_validation_is_checked_and_frozen_by_its_save(
    storage: SessionStorage, make: Callable[[str], ChatMessage]
) -> None:
    """Found by attack: such a message, appended and saved, kept a plain metadata dict
    whose changes in place the next save returned True for and never wrote."""
    session = await _stored(storage, turns=1)
    message = make(session.session_id)
    session.messages = [*session.messages, message]
    await storage.save_session(session)

    with pytest.raises(TypeError, match="edit_message"):
        message.metadata["k"] = 2
    stored = (await _load(storage, session.session_id)).messages[-1]
    assert (stored.metadata == message.metadata and "k" not in stored.metadata) or (
        stored.metadata["k"] == [1]
    )


@pytest.mark.parametrize("metadata", [[1], "text", 0, []])
async def test_a_message_made_past_validation_with_metadata_not_an_object_is_refused(
    storage: SessionStorage, metadata: object
) -> None:
    """Found by attack: a list failed the save with an AttributeError naming nothing,
    and [] or 0 were stored as {}. (`model_construct` validates now; what a store
    builds unchecked, `trusted`, is still checked by the save.)"""
    with pytest.raises(ValidationError, match="metadata"):
        ChatMessage.model_construct(session_id="s", role="user", content="x", metadata=metadata)
    session = await _stored(storage, turns=1)
    stored = len(session.messages)
    odd = ChatMessage.trusted(
        session_id=session.session_id, role="user", content="x", metadata=metadata
    )
    session.messages = [*session.messages, odd]

    with pytest.raises(InvalidDataError, match="expected a JSON object"):
        await storage.save_session(session)
    assert (await _load(storage, session.session_id)).message_count == stored


async def test_a_deep_copy_with_its_history_given_again_saves(storage: SessionStorage) -> None:
    """Found by attack: `model_copy(update={"messages": ...}, deep=True)` of an
    unchanged or appended history was refused, the copy's first message differing."""
    session = await _stored(storage, turns=2)
    extra = conversation(1).messages[0].model_copy(update={"session_id": session.session_id})
    same = session.model_copy(update={"messages": list(session.messages)}, deep=True)
    longer = session.model_copy(update={"messages": [*session.messages, extra]}, deep=True)

    await storage.save_session(same)
    await storage.save_session(longer)

    assert (await _load(storage, session.session_id)).message_count == len(session.messages) + 1


async def test_messages_appended_to_the_list_directly_are_saved(storage: SessionStorage) -> None:
    session = await _stored(storage, turns=1)
    extra = conversation(1).messages[0].model_copy(update={"session_id": session.session_id})
    session.messages.append(extra)
    session.messages = [*session.messages]
    await storage.save_session(session)

    loaded = await _load(storage, session.session_id)
    assert [m.message_id for m in loaded.messages][-1] == extra.message_id
    # The object counts what the store counts (found by audit: it went on saying 1).
    assert loaded.message_count == session.message_count == 2


@pytest.mark.parametrize(
    "change",
    [
        lambda m: m.metadata.__setitem__("k", 2),
        lambda m: m.metadata.update(k=2),
        lambda m: m.metadata.pop("k"),
        lambda m: m.metadata.clear(),
        lambda m: m.metadata.setdefault("new", 1),
        lambda m: m.metadata["nested"]["list"].append(3),
        lambda m: m.metadata["nested"]["list"].__setitem__(0, 9),
        lambda m: m.metadata["nested"].__delitem__("list"),
        lambda m: m.metadata["nested"]["list"].sort(reverse=True),
    ],
    ids=["set", "update", "pop", "clear", "setdefault", "append", "item", "del", "sort"],
)
async def test_message_metadata_cannot_be_changed_in_place(
    storage: SessionStorage, change: Callable[[ChatMessage], object]
) -> None:
    """Found by attack: a stored message's metadata changed in place was saved by no
    save (it returned True, the store kept the old value); and one added or edited
    then changed in place skipped add_message's checks (found by review). Every
    message's metadata now refuses the change at once; edit_message makes it."""
    metadata = {"k": 1, "nested": {"list": [1, 2]}}
    session = ChatSession.create("m")
    stored = session.add_message("user", "stored", metadata=metadata)
    await storage.save_session(session)
    loaded = await _load(storage, session.session_id)
    added = loaded.add_message("user", "added", metadata=metadata)
    edited = loaded.edit_message(stored.message_id, content="edited", metadata=metadata)
    found = (await storage.search_messages("stored"))[0]

    for message in (stored, loaded.messages[0], added, edited, found):
        with pytest.raises(TypeError, match="edit_message"):
            change(message)
        assert message.metadata == metadata
    metadata["nested"]["list"].append(4)  # the caller's dict stays the caller's
    assert added.metadata["nested"]["list"] == [1, 2]

    await storage.save_session(loaded)
    again = await _load(storage, session.session_id)
    assert [m.metadata for m in again.messages] == [{"k": 1, "nested": {"list": [1, 2]}}] * 2
    changed = dict(again.messages[0].metadata) | {"k": 2}
    again.edit_message(again.messages[0].message_id, metadata=changed)
    await storage.save_session(again)
    assert (await _load(storage, session.session_id)).messages[0].metadata["k"] == 2


async def test_a_new_message_whose_id_another_session_stores_is_invalid_data(
    storage: SessionStorage,
) -> None:
    owner = await _stored(storage, turns=1)
    session = await _stored(storage, turns=1)
    stolen = owner.messages[0].model_copy(update={"session_id": session.session_id})
    session.messages.append(stolen)

    with pytest.raises(InvalidDataError, match=repr(stolen.message_id)):
        await storage.save_session(session)
    assert (await _load(storage, session.session_id)).message_count == 1

    fresh = ChatSession.create("m")
    fresh.messages.append(stolen.model_copy(update={"session_id": fresh.session_id}))
    with pytest.raises(InvalidDataError, match=repr(stolen.message_id)):
        await storage.save_session(fresh)


@VIA
async def test_a_large_append_whose_last_id_another_session_stores_writes_nothing(
    storage: SessionStorage, reopen: Reopen, via: str
) -> None:
    owner = await _stored(storage, turns=1)
    session = await _stored(storage, turns=1)
    for turn in range(599):
        session.add_message("user", f"turn {turn} quince{turn}")
    # The last of 600 new messages: on PostgreSQL, in the last part of the COPY.
    session.messages.append(owner.messages[0].model_copy(update={"session_id": session.session_id}))

    with pytest.raises(InvalidDataError, match="already stored"):
        await _save_via(storage, session, via)

    async with reopen(storage) as other:
        loaded = await _load(other, session.session_id)
        assert loaded.messages == session.messages[:1]
        assert await other.search_messages("quince598") == []
        assert (await other.count()).messages == 2
        loaded.add_message("user", "still writable")
        await other.save_session(loaded)
        assert (await _load(other, session.session_id)).message_count == 2


async def test_a_message_added_while_a_save_is_in_flight_stays_pending(
    storage: SessionStorage,
) -> None:
    session = await _stored(storage, turns=1)
    session.add_message("user", "sent")
    saving = asyncio.create_task(storage.save_session(session))
    await asyncio.sleep(0)  # the save has taken what it sends
    session.add_message("assistant", "added meanwhile")
    await saving

    assert storage.has_unsaved_changes(session)
    assert [m.content for m in (await _load(storage, session.session_id)).messages] == [
        "message 0",
        "sent",
    ]
    await storage.save_session(session)
    assert not storage.has_unsaved_changes(session)
    assert (await _load(storage, session.session_id)).message_count == 3


async def test_an_edit_made_while_a_save_is_in_flight_stays_pending(
    storage: SessionStorage,
) -> None:
    session = await _stored(storage, turns=1)
    reply = session.add_message("assistant", "first draft")
    saving = asyncio.create_task(storage.save_session(session))
    await asyncio.sleep(0)
    session.edit_message(reply.message_id, content="second draft")
    await saving

    assert storage.has_unsaved_changes(session)
    await storage.save_session(session)
    loaded = await _load(storage, session.session_id)
    assert [m.content for m in loaded.messages] == ["message 0", "second draft"]


async def test_a_new_object_under_a_stored_id_adds_to_it(storage: SessionStorage) -> None:
    session = await _stored(storage, turns=2, metadata={"a": 1, "b": 2})
    newcomer = ChatSession.create("other-model", session_id=session.session_id)
    newcomer.metadata = {"b": 3, "c": 4}
    newcomer.add_message("user", "hello from elsewhere")
    await storage.save_session(newcomer)

    loaded = await _load(storage, session.session_id)
    assert loaded.model == "other-model"
    assert loaded.metadata == {"a": 1, "b": 3, "c": 4}
    assert [m.content for m in loaded.messages][-1] == "hello from elsewhere"
    assert loaded.message_count == 3


async def test_a_new_object_without_messages_under_a_stored_id_keeps_its_history(
    storage: SessionStorage,
) -> None:
    """The save of a new empty object tries the session's row alone (one statement on
    PostgreSQL); the id is taken, so it merges as any new object does."""
    session = await _stored(storage, turns=2, metadata={"a": 1, "b": 2})
    newcomer = ChatSession.create("other-model", session_id=session.session_id)
    newcomer.metadata = {"b": 3}
    await storage.save_session(newcomer)

    loaded = await _load(storage, session.session_id)
    assert loaded.model == "other-model"
    assert loaded.metadata == {"a": 1, "b": 3}
    assert [m.content for m in loaded.messages] == [m.content for m in session.messages]
    # The object saves on from what it merged into.
    newcomer.add_message("user", "after the merge")
    await storage.save_session(newcomer)
    again = await _load(storage, session.session_id)
    assert again.message_count == 3
    assert again.messages[-1].content == "after the merge"


async def test_load_last_returns_the_newest_messages_with_the_full_count(
    storage: SessionStorage,
) -> None:
    session = await _stored(storage, turns=10)

    tail = await storage.load_session(session.session_id, last=3)
    assert tail is not None
    assert [m.content for m in tail.messages] == ["message 7", "message 8", "message 9"]
    assert tail.message_count == 10 and tail.omitted_messages == 7
    none = await storage.load_session(session.session_id, last=0)
    assert none is not None and none.messages == [] and none.message_count == 10
    everything = await storage.load_session(session.session_id, last=50)
    assert everything is not None and len(everything.messages) == 10
    with pytest.raises(InvalidDataError, match="last"):
        await storage.load_session(session.session_id, last=-1)


async def test_load_last_after_removals_returns_the_newest_that_remain(
    storage: SessionStorage,
) -> None:
    """Removed messages leave their positions unused: the newest N skip those gaps."""
    session = await _stored(storage, turns=30)
    session.rewind(session.messages[19].message_id)  # removes "message 20" .. "message 29"
    for index in range(30, 35):
        session.add_message("user", f"message {index}")
    session.pop_message()  # removes "message 34"
    await storage.save_session(session)

    kept = [f"message {index}" for index in (*range(20), 30, 31, 32, 33)]
    for last in (1, 5, 8, 24, 25):
        tail = await storage.load_session(session.session_id, last=last)
        assert tail is not None and tail.message_count == 24
        assert [m.content for m in tail.messages] == kept[-last:]


async def test_a_load_sees_one_moment_while_another_holder_writes(
    storage: SessionStorage, reopen: Reopen
) -> None:
    """The row (counts, metadata, revision) and the history come from one snapshot."""
    session = ChatSession.create("m")
    await storage.save_session(session)
    loads = 0

    async def write(other: SessionStorage) -> None:
        held = await _load(other, session.session_id)
        for turn in range(1, 41):
            held.add_message("user", f"turn {turn}")
            held.metadata["turns"] = turn
            await other.save_session(held)
            await asyncio.sleep(0)

    def check(loaded: ChatSession | None, last: int | None) -> None:
        assert loaded is not None
        turns = loaded.metadata.get("turns", 0)
        assert loaded.message_count == turns
        expected = [f"turn {n}" for n in range(1, turns + 1)]
        assert [m.content for m in loaded.messages] == (expected[-last:] if last else expected)

    async with reopen(storage) as other:
        writer = asyncio.ensure_future(write(other))
        try:
            while not writer.done():
                for last in (None, 5):
                    check(await storage.load_session(session.session_id, last=last), last)
                    loads += 1
        finally:
            await writer
    check(await storage.load_session(session.session_id), None)
    assert loads >= 10


async def test_a_partial_session_appends_and_rewinds_within_what_it_carries(
    storage: SessionStorage,
) -> None:
    session = await _stored(storage, turns=10)
    tail = await storage.load_session(session.session_id, last=3)
    assert tail is not None

    tail.add_message("user", "message 10")
    await storage.save_session(tail)
    assert tail.message_count == 11
    loaded = await _load(storage, session.session_id)
    assert loaded.message_count == 11 and loaded.messages[-1].content == "message 10"

    tail.rewind(tail.messages[0].message_id)  # keeps message 7
    await storage.save_session(tail)
    loaded = await _load(storage, session.session_id)
    assert [m.content for m in loaded.messages] == [f"message {i}" for i in range(8)]
    assert loaded.message_count == 8

    with pytest.raises(InvalidDataError, match="newest"):
        tail.rewind(session.messages[2].message_id)
    with pytest.raises(InvalidDataError, match="carries only"):
        tail.rewind(None)
    assert tail.pop_message() is not None
    await storage.save_session(tail)
    assert (await _load(storage, session.session_id)).message_count == 7


async def test_a_conflict_leaves_the_object_as_it_was(
    storage: SessionStorage, reopen: Reopen
) -> None:
    session = await _stored(storage, turns=2)
    async with reopen(storage) as other:
        copy = await _load(other, session.session_id)
        session.model = "model-a"
        await storage.save_session(session)

        copy.model = "model-b"
        copy.add_message("user", "b")
        before = copy.model_dump()
        for _ in range(2):
            with pytest.raises(SessionConflictError, match="model"):
                await other.save_session(copy)
        assert copy.model_dump() == before
        assert other.has_unsaved_changes(copy)


async def test_a_forced_save_makes_this_holders_values_win(
    storage: SessionStorage, reopen: Reopen
) -> None:
    session = await _stored(storage, turns=3)
    target = session.messages[1].message_id
    async with reopen(storage) as other:
        copy = await _load(other, session.session_id)
        session.metadata["title"] = "A"
        session.status = "archived"
        session.edit_message(target, content="A's edit")
        await storage.save_session(session)

        copy.metadata["title"] = "B"
        copy.edit_message(target, content="B's edit")
        copy.edit_message(copy.messages[0].message_id, content="B's first")
        await other.save_session(copy, force=True)

    loaded = await _load(storage, session.session_id)
    assert loaded.metadata == {"title": "B"}
    assert loaded.status == "archived"  # B did not change it
    assert [m.content for m in loaded.messages] == ["B's first", "B's edit", "message 2"]


@pytest.mark.parametrize("through", ["force", "manager"])
@pytest.mark.parametrize("mine", ["content", "metadata"])
async def test_a_forced_edit_of_one_half_of_a_message_keeps_anothers_edit_of_the_other(
    storage: SessionStorage, reopen: Reopen, through: str, mine: str
) -> None:
    """Found by attack: a forced save (and a manager resolving a conflict) of a message
    whose content alone this holder edited wrote back the metadata it had loaded, over
    another writer's acknowledged edit of it: its values win for what it changed only."""
    session = await _stored(storage, turns=1)
    target = session.messages[0].message_id
    manager = SessionManager(storage)
    if through == "manager":
        session = await manager.get_session(session.session_id)  # type: ignore[assignment]
    async with reopen(storage) as other:
        copy = await _load(other, session.session_id)
        if mine == "content":
            copy.edit_message(target, metadata={"by": "other"})
        else:
            copy.edit_message(target, content="the other's content")
        await other.save_session(copy)

    if mine == "content":
        session.edit_message(target, content="my content")
    else:
        session.edit_message(target, metadata={"by": "me"})
    if through == "manager":
        assert await manager.auto_save(session) is True
    else:
        await storage.save_session(session, force=True)

    stored = (await _load(storage, session.session_id)).messages[0]
    if mine == "content":
        assert (stored.content, stored.metadata) == ("my content", {"by": "other"})
    else:
        assert (stored.content, stored.metadata) == ("the other's content", {"by": "me"})
    if through == "manager":  # its copy now holds what the store holds
        held = session.messages[0]
        assert (held.content, held.metadata) == (stored.content, stored.metadata)


async def test_a_holder_whose_save_merged_others_work_still_sees_their_edits_and_removals(
    storage: SessionStorage, reopen: Reopen
) -> None:
    session = await _stored(storage, turns=4)
    first, last = session.messages[0].message_id, session.messages[-1].message_id
    async with reopen(storage) as other:
        copy = await _load(other, session.session_id)
        session.edit_message(first, content="edited by A")
        session.pop_message()
        await storage.save_session(session)

        copy.add_message("user", "B appends")  # lands beside A's work
        await other.save_session(copy)
        copy.metadata["k"] = 1  # a save that merges: B's base no longer equals the store
        await other.save_session(copy)

        copy.edit_message(first, content="edited by B")
        with pytest.raises(SessionConflictError, match=f"message '{first}'"):
            await other.save_session(copy)

        again = await _load(other, session.session_id)
        assert last not in [m.message_id for m in again.messages]
        stale = copy.model_copy()
        stale.rewind(stale.messages[-3].message_id)  # B's view: drops `last`, already gone
        with pytest.raises(SessionConflictError):
            await other.save_session(stale)

    loaded = await _load(storage, session.session_id)
    assert loaded.message_count == len(loaded.messages) == (await storage.count()).messages
    assert loaded.messages[0].content == "edited by A"


async def test_a_partial_session_is_never_saved_as_a_shortened_copy_into_another_store(
    storage: SessionStorage, tmp_path: Path
) -> None:
    # Loaded with last=, it carries the newest messages only; a store that does not hold
    # the session would take it for the whole and store 2 of its 5 messages.
    session = await _stored(storage, turns=5)
    partial = await storage.load_session(session.session_id, last=2)
    assert partial is not None and partial.omitted_messages == 3
    async with SQLiteSessionStorage(tmp_path / "another.db") as another:
        with pytest.raises(InvalidDataError, match="newest 2 of 5 messages"):
            await another.save_session(partial)
        with pytest.raises(InvalidDataError, match="newest 2 of 5 messages"):
            async with another.unit_of_work() as uow:
                await uow.sessions.add(partial)
                await uow.commit()
        # Found by attack: the bulk path of migrations and imports stored 2 of 5.
        with pytest.raises(InvalidDataError, match="newest 2 of 5 messages"):
            await another.insert_sessions([partial])
        assert await another.load_session(session.session_id) is None

        # Loaded whole, the same session is copied whole; the partial one still saves
        # where it came from.
        await another.save_session(await _load(storage, session.session_id))
        assert (await _load(another, session.session_id)).message_count == 5
        # Held there now (as after a migration), the partial object is still refused
        # there, and the error says why (found by attack: "this store does not hold it").
        with pytest.raises(InvalidDataError, match="not loaded from or saved to this store"):
            await another.save_session(partial)
    partial.add_message("user", "after")
    assert await storage.save_session(partial) is True
    assert (await _load(storage, session.session_id)).message_count == 6


@pytest.mark.parametrize("other_id_stored", [False, True])
async def test_a_loaded_session_given_another_id_is_refused(
    storage: SessionStorage, other_id_stored: bool
) -> None:
    """Found by audit: the save looked for the new id's row and said the session had been
    deleted, where it had not (and SessionManager then dropped the caller's changes)."""
    session = await _stored(storage, turns=2)
    other = await _stored(storage, turns=1) if other_id_stored else None
    loaded = await _load(storage, session.session_id)
    loaded.add_message("user", "under another id")
    loaded.session_id = other.session_id if other is not None else "never-stored"

    with pytest.raises(InvalidDataError, match="a session's id never changes"):
        await storage.save_session(loaded)

    assert (await _load(storage, session.session_id)).message_count == 2
    if other is None:
        assert await storage.load_session("never-stored") is None
    else:
        assert (await _load(storage, other.session_id)).message_count == 1


async def test_pop_message_on_an_object_carrying_none_of_the_history_is_refused(
    storage: SessionStorage,
) -> None:
    """Found by audit: it returned None, as if the session had no messages."""
    session = await _stored(storage, turns=3)
    for carrying_none in (
        await storage.load_session(session.session_id, last=0),
        (await storage.list_sessions())[0],
    ):
        assert carrying_none is not None and carrying_none.message_count == 3
        with pytest.raises(InvalidDataError, match="carries none of the session's 3 messages"):
            carrying_none.pop_message()
        assert carrying_none.message_count == 3

    tail = await storage.load_session(session.session_id, last=1)
    assert tail is not None
    popped = tail.pop_message()
    assert popped is not None and popped.content == "message 2"
    await storage.save_session(tail)
    assert (await _load(storage, session.session_id)).message_count == 2
