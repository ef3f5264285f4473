"""Sessions a caller holds are never lost by the manager, in or out of its cache.

Found by attack: a bounded cache hands out objects, then evicts them (saving their
changes first); with auto-save off, changes a caller made after the eviction were
never written, and under concurrent use `get_session` could even return an object
it had already evicted. The manager now keeps knowing such objects while they are
held: it returns the same object again, and `shutdown()` saves them.
"""

from __future__ import annotations

import asyncio
import gc
import random
import weakref
from typing import Any

import pytest

from persistence import (
    ChatSession,
    InvalidDataError,
    PersistenceError,
    SessionManager,
    SessionStorage,
)
from tests import servers
from tests.reliability.unknown_outcomes import outcomes, save_unknown


async def _stored(storage: SessionStorage, messages: int = 0) -> ChatSession:
    session = ChatSession.create("held")
    for turn in range(messages):
        session.add_message("user", f"m{turn}")
    await storage.save_session(session)
    return session


async def _left_the_cache(
    storage: SessionStorage,
) -> tuple[SessionManager, ChatSession, ChatSession]:
    """A manager caching one session, auto-save off; the first session it returned,
    which its caller still holds, and a second one, whose get evicted the first."""
    first, second = await _stored(storage), await _stored(storage)
    manager = SessionManager(storage, auto_save_enabled=False, max_cached_sessions=1)
    held = await manager.get_session(first.session_id)
    assert held is not None
    await manager.get_session(second.session_id)
    assert manager.cached_session_ids == [second.session_id]
    return manager, held, second


async def _contents(storage: SessionStorage, session_id: str) -> list[str]:
    stored = await storage.load_session(session_id)
    assert stored is not None
    return [message.content for message in stored.messages]


async def test_get_session_returns_a_held_object_while_another_task_uses_the_cache(
    sql_storage: SessionStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = await _stored(sql_storage), await _stored(sql_storage)
    manager = SessionManager(sql_storage, auto_save_enabled=False, max_cached_sessions=1)
    (await manager.get_session(first.session_id)).add_message("user", "pending in first")
    saving = asyncio.Event()
    save = sql_storage.save_session

    async def slow_save(session: ChatSession, **options: Any) -> bool:
        saving.set()
        await asyncio.sleep(0.05)
        return await save(session, **options)

    monkeypatch.setattr(sql_storage, "save_session", slow_save)

    async def gets_second() -> ChatSession:
        # Evicts `first`, saving it; meanwhile the other task uses `first` again.
        got = await manager.get_session(second.session_id)
        assert got is not None and manager.cached_session_ids == [second.session_id]
        got.add_message("user", "written to second")
        return got

    async def uses_first() -> None:
        await saving.wait()
        await manager.get_session(first.session_id)

    await asyncio.gather(gets_second(), uses_first())
    monkeypatch.undo()
    await manager.shutdown()

    assert await _contents(sql_storage, first.session_id) == ["pending in first"]
    assert await _contents(sql_storage, second.session_id) == ["written to second"]


async def test_a_session_evicted_while_held_is_the_same_object_and_saved_at_shutdown(
    sql_storage: SessionStorage,
) -> None:
    manager, held, _ = await _left_the_cache(sql_storage)

    held.add_message("user", "after eviction")
    assert manager.has_unsaved_changes(held.session_id)
    assert (await manager.get_statistics())["unsaved_sessions"] == 1
    assert await manager.get_session(held.session_id) is held  # the same object again
    held.add_message("user", "after return")
    await manager.shutdown()

    assert await _contents(sql_storage, held.session_id) == ["after eviction", "after return"]


async def test_a_released_session_nobody_holds_is_forgotten(sql_storage: SessionStorage) -> None:
    manager, session, _ = await _left_the_cache(sql_storage)
    session_id, held = session.session_id, weakref.ref(session)
    del session
    gc.collect()

    assert held() is None
    again = await manager.get_session(session_id)
    assert again is not None and manager.cached_session_ids == [session_id]


async def test_auto_save_off_takes_back_a_session_that_left_the_cache(
    sql_storage: SessionStorage,
) -> None:
    # The usual loop of a chat server: get the session, await the model for a while
    # (other requests evict it meanwhile), add the reply, call auto_save.
    manager, session, _ = await _left_the_cache(sql_storage)
    session_id = session.session_id
    session.add_message("assistant", "the reply")
    assert await manager.auto_save(session) is False
    assert manager.cached_session_ids == [session_id]
    del session
    gc.collect()

    await manager.shutdown()
    assert await _contents(sql_storage, session_id) == ["the reply"]


async def test_many_tasks_with_auto_save_off_lose_no_message(sql_storage: SessionStorage) -> None:
    # Tasks share a small cache, each appending to random sessions and sometimes saving:
    # every message must be in the store after shutdown.
    ids = [(await _stored(sql_storage)).session_id for _ in range(6)]
    manager = SessionManager(sql_storage, auto_save_enabled=False, max_cached_sessions=3)
    sent: dict[str, str] = {}
    rng = random.Random(7)

    async def worker(name: str) -> None:
        for turn in range(30):
            session_id = rng.choice(ids)
            session = await manager.get_session(session_id)
            assert session is not None
            session.add_message("user", f"{name}-{turn}")
            sent[f"{name}-{turn}"] = session_id
            await asyncio.sleep(0)
            if rng.random() < 0.5:
                await manager.save_session(session)

    await asyncio.gather(*(worker(f"w{number}") for number in range(5)))
    await manager.shutdown()

    stored: set[str] = set()
    for session_id in ids:
        stored |= set(await _contents(sql_storage, session_id))
    assert set(sent) - stored == set()


async def test_export_of_a_partial_copy_is_whole_or_refused(sql_storage: SessionStorage) -> None:
    session = await _stored(sql_storage, messages=6)
    manager = SessionManager(sql_storage, auto_save_enabled=False)

    partial = await manager.get_session(session.session_id, last=2)
    assert partial is not None and partial.omitted_messages == 4
    rendered = await manager.export_session(session.session_id, "text")
    assert rendered is not None and all(f"m{turn}" in rendered for turn in range(6))

    manager = SessionManager(sql_storage, auto_save_enabled=False)
    partial = await manager.get_session(session.session_id, last=2)
    assert partial is not None and partial.omitted_messages == 4
    partial.add_message("user", "unsaved")
    with pytest.raises(InvalidDataError, match="newest 3 of 7 messages"):
        await manager.export_session(session.session_id)
    await manager.save_session(partial)
    rendered = await manager.export_session(session.session_id, "text")
    assert rendered is not None and "m0" in rendered and "unsaved" in rendered


async def test_a_held_whole_copy_older_than_the_cached_partial_one_is_not_served_again(
    sql_storage: SessionStorage,
) -> None:
    """Found by attack: a partial copy, then the whole one (loaded again: the partial
    one left the cache, still held); the partial copy saved a message and came back to
    the cache; asked for the whole again, the manager served the old whole copy, which
    lacked that message, and so did export_session. A rewind through it left the
    message behind the rewind point."""
    session = await _stored(sql_storage, messages=6)
    manager = SessionManager(sql_storage)
    tail = await manager.get_session(session.session_id, last=2)
    whole = await manager.get_session(session.session_id)
    assert tail is not None and whole is not None and whole is not tail
    tail.add_message("user", "new")
    assert await manager.auto_save(tail)

    again = await manager.get_session(session.session_id)
    assert again is not None and again is not whole
    expected = [f"m{turn}" for turn in range(6)] + ["new"]
    assert [m.content for m in again.messages] == expected
    exported = await manager.export_session(session.session_id, "text")
    assert exported is not None and "new" in exported
    again.rewind(again.messages[3].message_id)
    assert await manager.auto_save(again)
    assert await _contents(sql_storage, session.session_id) == ["m0", "m1", "m2", "m3"]
    await manager.shutdown()


async def test_a_conflict_after_a_save_that_landed_unseen_is_resolved_on_a_partial_copy(
    sql_storage: SessionStorage,
) -> None:
    session = await _stored(sql_storage, messages=5)
    manager = SessionManager(sql_storage)
    partial = await manager.get_session(session.session_id, last=2)
    assert partial is not None
    partial.add_message("user", "X")
    outcomes(sql_storage, "landed")
    await save_unknown(sql_storage, partial)
    async with servers.second_holder(sql_storage) as other:
        theirs = await other.load_session(session.session_id)
        assert theirs is not None
        theirs.metadata["t"] = "theirs"
        for turn in range(5):
            theirs.add_message("assistant", f"B{turn}")
        await other.save_session(theirs)
    partial.metadata["t"] = "mine"

    assert await manager.auto_save(partial) is True

    stored = await sql_storage.load_session(session.session_id)
    assert stored is not None and stored.metadata == {"t": "mine"}
    assert [m.content for m in stored.messages] == [
        *(f"m{turn}" for turn in range(5)),
        "X",
        *(f"B{turn}" for turn in range(5)),
    ]
    assert partial.message_count == stored.message_count == 11
    assert [m.message_id for m in partial.messages] == [
        m.message_id for m in stored.messages[-len(partial.messages) :]
    ]


def _slow_saves(storage: SessionStorage, monkeypatch: pytest.MonkeyPatch, delay: float) -> None:
    save = storage.save_session

    async def slow_save(session: ChatSession, **options: Any) -> bool:
        await asyncio.sleep(delay)
        return await save(session, **options)

    monkeypatch.setattr(storage, "save_session", slow_save)


async def test_concurrent_gets_of_one_session_share_one_object(
    sql_storage: SessionStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = await _stored(sql_storage), await _stored(sql_storage)
    manager = SessionManager(sql_storage, auto_save_enabled=False, max_cached_sessions=1)
    (await manager.get_session(first.session_id)).add_message("user", "dirty")
    _slow_saves(sql_storage, monkeypatch, 0.05)  # the eviction's save lets the other get in

    one, other = await asyncio.gather(
        manager.get_session(second.session_id), manager.get_session(second.session_id)
    )
    assert one is other is await manager.get_session(second.session_id)


async def test_startup_warms_the_cache_with_held_objects_within_its_bound(
    sql_storage: SessionStorage,
) -> None:
    manager, held, second = await _left_the_cache(sql_storage)
    held.add_message("user", "pending in held")
    await manager.delete_session(second.session_id)  # frees the only place
    others = [await _stored(sql_storage) for _ in range(3)]

    await asyncio.gather(manager.startup(), *(manager.get_session(o.session_id) for o in others))

    assert len(manager.cached_session_ids) <= 1
    assert await manager.get_session(held.session_id) is held
    await manager.shutdown()
    assert await _contents(sql_storage, held.session_id) == ["pending in held"]


async def test_a_clean_partial_copy_never_hides_a_held_whole_one(
    sql_storage: SessionStorage,
) -> None:
    session = await _stored(sql_storage, messages=4)
    manager = SessionManager(sql_storage, auto_save_enabled=False, max_cached_sessions=5)
    partial = await manager.get_session(session.session_id, last=1)
    whole = await manager.get_session(session.session_id)  # replaces the partial copy
    await manager.auto_save(partial)  # the partial copy back in the cache; `whole` held
    assert whole is not None
    whole.add_message("user", "pending in whole")

    assert await manager.get_session(session.session_id) is whole
    rendered = await manager.export_session(session.session_id, "text")
    assert rendered is not None and "pending in whole" in rendered


async def test_a_session_no_save_can_store_does_not_block_the_manager(
    sql_storage: SessionStorage,
) -> None:
    bad = await _stored(sql_storage, messages=2)
    others = [await _stored(sql_storage) for _ in range(3)]
    manager = SessionManager(sql_storage, auto_save_enabled=False, max_cached_sessions=2)
    broken = await manager.get_session(bad.session_id)
    assert broken is not None
    broken.messages.reverse()  # a change a save cannot express
    fine = await manager.get_session(others[0].session_id)
    assert fine is not None
    fine.add_message("user", "kept")

    for other in others[1:]:  # each evicts: the broken one goes, unsaved
        assert await manager.get_session(other.session_id) is not None
    with pytest.raises(PersistenceError, match=bad.session_id):
        await manager.shutdown()  # it is still held: reported
    assert await _contents(sql_storage, others[0].session_id) == ["kept"]
    assert await _contents(sql_storage, bad.session_id) == ["m0", "m1"]


async def test_shutdown_saves_every_other_session_when_one_holds_bad_metadata(
    sql_storage: SessionStorage,
) -> None:
    first, second = await _stored(sql_storage), await _stored(sql_storage)
    manager = SessionManager(sql_storage, auto_save_enabled=False)
    bad = await manager.get_session(first.session_id)
    good = await manager.get_session(second.session_id)
    assert bad is not None and good is not None
    bad.metadata["tags"] = {"a", "b"}  # in place: no validation until the save
    good.add_message("user", "saved anyway")

    with pytest.raises(PersistenceError, match=r"metadata\.tags"):
        await manager.shutdown()
    assert await _contents(sql_storage, second.session_id) == ["saved anyway"]
    assert (await manager.get_statistics())["unsaved_sessions"] == 1


async def test_statistics_count_sessions_and_archive_reaches_held_copies(
    sql_storage: SessionStorage,
) -> None:
    manager, held, second = await _left_the_cache(sql_storage)
    cached = await manager.storage.load_session(held.session_id)
    assert cached is not None
    await manager.save_session(cached)  # a second object of the session, cached
    held.add_message("user", "one")
    cached.add_message("user", "two")
    assert (await manager.get_statistics())["unsaved_sessions"] == 1

    await manager.get_session(second.session_id)  # `cached` leaves too, saved
    assert await manager.archive_session(held.session_id) is True
    assert held.status == "archived"
    await manager.shutdown()
    stored = await sql_storage.load_session(held.session_id)
    assert stored is not None and stored.status == "archived"
    assert sorted(m.content for m in stored.messages) == ["one", "two"]


async def test_a_cancelled_auto_save_still_leaves_the_session_known(
    sql_storage: SessionStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A session the manager never had, handed to auto_save (auto-save off), which is
    # cancelled while it makes room: the caller still holds it, shutdown() saves it.
    manager = SessionManager(sql_storage, auto_save_enabled=False, max_cached_sessions=1)
    blocker = await manager.get_session((await _stored(sql_storage)).session_id)
    assert blocker is not None
    blocker.add_message("user", "makes the eviction save")
    newcomer = await _stored(sql_storage)
    newcomer.add_message("user", "answer")
    _slow_saves(sql_storage, monkeypatch, 0.2)
    saving = asyncio.create_task(manager.auto_save(newcomer))
    await asyncio.sleep(0.05)  # inside the eviction's save
    saving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await saving
    monkeypatch.undo()

    assert manager.has_unsaved_changes(newcomer.session_id)
    await manager.shutdown()
    assert await _contents(sql_storage, newcomer.session_id) == ["answer"]


async def test_a_broken_copy_does_not_block_saving_another_copy_of_its_session(
    sql_storage: SessionStorage,
) -> None:
    session = await _stored(sql_storage, messages=2)
    manager = SessionManager(sql_storage, auto_save_enabled=False)
    broken = await manager.get_session(session.session_id)
    assert broken is not None
    broken.messages.reverse()
    other = await sql_storage.load_session(session.session_id)
    assert other is not None
    other.add_message("user", "from the other copy")

    assert await manager.save_session(other) is True
    assert await _contents(sql_storage, session.session_id) == ["m0", "m1", "from the other copy"]
