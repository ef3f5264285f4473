"""SessionManager against what an attack on it found: saves that never end, a deleted
session written into again, cached again, or said saved."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

import pytest

from persistence import ChatSession, InvalidDataError, PersistenceError, SessionStorage
from persistence.clock import utc_now
from persistence.manager import SessionManager
from tests import servers
from tests.factories import conversation


async def _stored(storage: SessionStorage, session_id: str) -> ChatSession:
    session = conversation(1, session_id=session_id)
    await storage.save_session(session)
    return session


def _held_up(monkeypatch: pytest.MonkeyPatch, owner: object, name: str) -> asyncio.Event:
    """Makes `owner.name` wait, once it has done its work, until the returned event is
    set; `owner.name.started` (an Event) tells that it got there."""
    call = getattr(owner, name)
    go_on, started = asyncio.Event(), asyncio.Event()

    async def held(*args: Any, **options: Any) -> Any:
        result = await call(*args, **options)
        started.set()
        await go_on.wait()
        return result

    held.started = started  # type: ignore[attr-defined]
    monkeypatch.setattr(owner, name, held)
    return go_on


async def _while_a_get_loads(
    manager: SessionManager,
    session_id: str,
    call: Coroutine[Any, Any, bool],
    monkeypatch: pytest.MonkeyPatch,
) -> bool:
    """Runs `call` while the manager's get_session of `session_id` has read the session
    and not yet returned; its result."""
    go_on = _held_up(monkeypatch, manager.storage, "load_session")
    getting = asyncio.create_task(manager.get_session(session_id))
    await manager.storage.load_session.started.wait()  # type: ignore[attr-defined]
    calling = asyncio.create_task(call)
    await asyncio.sleep(0.01)
    go_on.set()
    await getting
    result = await calling
    monkeypatch.undo()
    return result


async def test_a_change_undone_before_its_save_leaves_nothing_unsaved_and_eviction_ends(
    sql_storage: SessionStorage,
) -> None:
    """Found by attack: a message added and popped again, with `updated_at` where it
    was (the store's is ahead of this clock), stayed unsaved for good; a manager
    evicting it saved it again and again, and get_session of another never returned."""
    manager = SessionManager(sql_storage, max_cached_sessions=1)
    session = await manager.create_session("m")
    session.updated_at = utc_now().replace(year=utc_now().year + 1)  # a clock ahead
    assert await manager.auto_save(session)
    session.add_message("assistant", "draft")
    session.pop_message()

    assert await manager.auto_save(session)
    assert not manager.has_unsaved_changes(session.session_id)
    other = await _stored(sql_storage, "other")
    assert await asyncio.wait_for(manager.get_session(other.session_id), 10) is not None


class _NeverEqual(str):
    __slots__ = ()

    def __eq__(self, other: object) -> bool:
        return False

    __hash__ = str.__hash__


async def test_a_session_that_never_looks_saved_is_saved_once_on_eviction(
    sql_storage: SessionStorage,
) -> None:
    """Found by attack: a metadata value whose == is never True made every save look
    unfinished, and eviction saved it about 2,000 times a second, for good."""
    manager = SessionManager(sql_storage, max_cached_sessions=1)
    session = await manager.create_session("m")
    session.metadata = {"title": _NeverEqual("odd")}
    assert await manager.auto_save(session)
    revision = session.revision
    assert revision is not None

    other = await _stored(sql_storage, "other")
    assert await asyncio.wait_for(manager.get_session(other.session_id), 10) is not None
    assert session.revision is not None and session.revision <= revision + 1


async def test_conflict_resolution_never_writes_into_a_session_created_again(
    sql_storage: SessionStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by attack: between the conflict and the reload another instance deleted the
    session and created a new one under its id; the manager wrote its changes into it."""
    shared = await _stored(sql_storage, "shared")
    async with servers.second_holder(sql_storage) as other_storage:
        manager = SessionManager(sql_storage)
        held = await manager.get_session("shared")
        assert held is not None
        theirs = await other_storage.load_session("shared")
        assert theirs is not None
        theirs.metadata = {"owner": "them"}
        await other_storage.save_session(theirs)
        load = sql_storage.load_session

        async def created_again_first(session_id: str, **options: Any) -> ChatSession | None:
            # The other instance, between this manager's conflict and its reload.
            assert await other_storage.delete_session(session_id)
            fresh = ChatSession.create("new-model", session_id=session_id)
            fresh.add_message("user", "a new conversation")
            await other_storage.save_session(fresh)
            return await load(session_id, **options)

        monkeypatch.setattr(sql_storage, "load_session", created_again_first)
        held.metadata = {"owner": "us"}
        held.add_message("user", "ours")

        assert await manager.auto_save(held) is False
        monkeypatch.undo()

    stored = await sql_storage.load_session(shared.session_id)
    assert stored is not None
    assert (stored.model, stored.metadata) == ("new-model", {})
    assert [m.content for m in stored.messages] == ["a new conversation"]
    assert manager.cached_session_ids == []


async def test_a_load_in_flight_when_the_manager_deletes_the_session_does_not_cache_it(
    sql_storage: SessionStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by attack: get_session racing the same manager's delete_session cached the
    deleted session, and served it from then on."""
    await _stored(sql_storage, "doomed")
    manager = SessionManager(sql_storage)
    deleting = manager.delete_session("doomed")
    assert await _while_a_get_loads(manager, "doomed", deleting, monkeypatch) is True

    assert manager.cached_session_ids == []
    assert await manager.get_session("doomed") is None


async def test_a_cached_session_is_asked_for_with_a_valid_last_too(
    sql_storage: SessionStorage,
) -> None:
    """Found by attack: only a load checked `last`; a cached copy came back for -1."""
    await _stored(sql_storage, "s")
    manager = SessionManager(sql_storage)
    assert await manager.get_session("s") is not None
    for bad in (-1, 1.5, True, 2**64, "3"):
        with pytest.raises(InvalidDataError, match="last"):
            await manager.get_session("s", last=bad)  # type: ignore[arg-type]


async def test_auto_save_of_an_unchanged_copy_another_instance_deleted_says_so(
    sql_storage: SessionStorage,
) -> None:
    """Found by attack: auto_save of a clean cached copy returned True without asking the
    store, and the deleted session stayed cached."""
    await _stored(sql_storage, "gone")
    async with servers.second_holder(sql_storage) as other_storage:
        manager = SessionManager(sql_storage)
        session = await manager.get_session("gone")
        assert session is not None
        assert await other_storage.delete_session("gone")

        assert await manager.auto_save(session) is False
    assert manager.cached_session_ids == []


async def test_a_session_deleted_while_startup_warms_the_cache_is_not_cached(
    sql_storage: SessionStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by attack: delete_session returned True while the warm-up read the
    session, and the warm-up cached it afterwards; get_session returned it."""
    for session_id in ("kept", "doomed"):
        await _stored(sql_storage, session_id)
    manager = SessionManager(sql_storage)
    go_on = _held_up(monkeypatch, sql_storage, "load_sessions")
    warming = asyncio.create_task(manager.startup())
    await sql_storage.load_sessions.started.wait()  # type: ignore[attr-defined]

    assert await manager.delete_session("doomed") is True
    go_on.set()
    await warming
    monkeypatch.undo()

    assert manager.cached_session_ids == ["kept"]
    assert await manager.get_session("doomed") is None


async def test_changes_handed_to_the_manager_while_shutdown_saves_are_saved_too(
    sql_storage: SessionStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by attack: with auto-save off, a session changed and handed back with
    auto_save() while shutdown() saved another was forgotten unsaved."""
    manager = SessionManager(sql_storage, auto_save_enabled=False)
    late = await manager.create_session("late")
    busy = await manager.create_session("busy")
    for session in (late, busy):
        await manager.save_session(session)
    busy.add_message("user", "saved first")
    go_on = _held_up(monkeypatch, sql_storage, "save_session")
    shutting = asyncio.create_task(manager.shutdown())
    await sql_storage.save_session.started.wait()  # type: ignore[attr-defined]

    late.add_message("user", "must not be lost")
    assert await manager.auto_save(late) is False
    go_on.set()
    await shutting
    monkeypatch.undo()

    assert manager.cached_session_ids == []
    assert not manager.has_unsaved_changes(late.session_id)
    for session in (late, busy):
        stored = await sql_storage.load_session(session.session_id)
        assert stored is not None
        assert [m.content for m in stored.messages] == [m.content for m in session.messages]
    assert [m.content for m in late.messages] == ["must not be lost"]


@pytest.mark.parametrize("failure", ["error", "cancel"])
async def test_a_delete_that_did_not_happen_keeps_the_unsaved_changes(
    sql_storage: SessionStorage, monkeypatch: pytest.MonkeyPatch, failure: str
) -> None:
    """Found by attack: a delete that failed, or was cancelled before the store deleted
    anything, had already dropped the cached copy; its changes were never saved and
    shutdown() reported success."""
    manager = SessionManager(sql_storage, auto_save_enabled=False)
    session = await manager.create_session("m")
    await manager.save_session(session)
    session.add_message("user", "keep me")
    assert await manager.auto_save(session) is False

    async def failing(session_id: str) -> bool:
        if failure == "error":
            raise PersistenceError("delete session: the server went away")
        await asyncio.Event().wait()  # until cancelled
        return True

    monkeypatch.setattr(sql_storage, "delete_session", failing)
    with pytest.raises(PersistenceError if failure == "error" else TimeoutError):
        await asyncio.wait_for(manager.delete_session(session.session_id), 0.2)
    monkeypatch.undo()

    assert manager.has_unsaved_changes(session.session_id)
    await manager.shutdown()
    stored = await sql_storage.load_session(session.session_id)
    assert stored is not None
    assert [m.content for m in stored.messages] == ["keep me"]


async def test_a_session_archived_while_a_get_loads_it_is_archived_in_the_cache(
    sql_storage: SessionStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by attack: an archive made while get_session loaded the session returned
    True, and the load then cached the active copy it had read."""
    await _stored(sql_storage, "shelved")
    manager = SessionManager(sql_storage)
    archiving = manager.archive_session("shelved")
    assert await _while_a_get_loads(manager, "shelved", archiving, monkeypatch) is True

    cached = await manager.get_session("shelved")
    assert cached is not None and cached.status == "archived"
    stored = await sql_storage.load_session("shelved", last=0)
    assert stored is not None and stored.status == "archived"


async def test_a_session_changed_in_the_cache_while_startup_reads_is_not_cached_stale(
    sql_storage: SessionStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by attack: while the warm-up read, a session was loaded, saved, archived
    and evicted; the warm-up then cached the copy it had read (active, one message)."""
    for session_id in ("w", "v", "x"):
        await _stored(sql_storage, session_id)
    manager = SessionManager(sql_storage, max_cached_sessions=2)
    go_on = _held_up(monkeypatch, sql_storage, "load_sessions")
    warming = asyncio.create_task(manager.startup())
    await sql_storage.load_sessions.started.wait()  # type: ignore[attr-defined]
    x = await manager.get_session("x")
    assert x is not None
    x.add_message("user", "acknowledged")
    assert await manager.auto_save(x)
    assert await manager.archive_session("x")
    for session_id in ("w", "v"):  # x leaves the cache
        assert await manager.get_session(session_id) is not None
    del x
    assert await manager.delete_session("w")  # and makes room for the warm-up
    go_on.set()
    await warming
    monkeypatch.undo()

    cached = await manager.get_session("x")
    assert cached is not None
    assert (cached.status, cached.message_count) == ("archived", 2)


async def test_a_cancelled_delete_that_landed_leaves_no_clean_copy_to_serve(
    sql_storage: SessionStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by attack: the cancel of a delete came after the store had deleted the
    session, and the cached copy was served by get_session from then on."""
    await _stored(sql_storage, "doomed")
    manager = SessionManager(sql_storage)
    assert await manager.get_session("doomed") is not None
    delete = sql_storage.delete_session

    async def landed_then_slow(session_id: str) -> bool:
        await delete(session_id)
        await asyncio.Event().wait()  # until cancelled
        return True

    monkeypatch.setattr(sql_storage, "delete_session", landed_then_slow)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(manager.delete_session("doomed"), 0.2)
    monkeypatch.undo()

    assert manager.cached_session_ids == []
    assert await manager.get_session("doomed") is None


async def _changed_on_each_save(
    sql_storage: SessionStorage, monkeypatch: pytest.MonkeyPatch, until: float
) -> tuple[SessionManager, ChatSession]:
    """A manager (auto-save off) holding a session whose metadata another task of the
    caller's changes in place each time a save of it returns, until its step is `until`."""
    manager = SessionManager(sql_storage, auto_save_enabled=False)
    session = await manager.create_session("m", metadata={"step": 0})
    await manager.save_session(session)
    session.metadata["step"] = 1
    save = sql_storage.save_session

    async def changed_meanwhile(saved: ChatSession, **options: Any) -> bool:
        result = await save(saved, **options)
        if saved is session and saved.metadata["step"] < until:
            saved.metadata["step"] += 1
        return result

    monkeypatch.setattr(sql_storage, "save_session", changed_meanwhile)
    return manager, session


async def test_metadata_changed_in_place_while_shutdown_saves_it_is_saved(
    sql_storage: SessionStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by attack: a change of metadata in place, made while shutdown() saved the
    session and again while it saved it once more, looked like a value whose == is never
    True; the session was let go unsaved and shutdown() reported success."""
    manager, session = await _changed_on_each_save(sql_storage, monkeypatch, until=3)
    await manager.shutdown()
    monkeypatch.undo()

    stored = await sql_storage.load_session(session.session_id)
    assert stored is not None and stored.metadata == {"step": 3} == session.metadata


async def test_a_session_changed_on_every_save_of_shutdown_is_reported_and_kept(
    sql_storage: SessionStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by attack: a task changing a session between every save made shutdown()
    save it again for as long as the task ran."""
    manager, session = await _changed_on_each_save(sql_storage, monkeypatch, until=float("inf"))
    with pytest.raises(PersistenceError, match="changed again each time shutdown"):
        await asyncio.wait_for(manager.shutdown(), 10)
    monkeypatch.undo()

    assert manager.has_unsaved_changes(session.session_id)
    await manager.shutdown()
    stored = await sql_storage.load_session(session.session_id)
    assert stored is not None and stored.metadata == session.metadata
