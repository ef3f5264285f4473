"""SessionManager on real SQLite and PostgreSQL storages."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import pytest

from persistence import (
    ChatMessage,
    ChatSession,
    InvalidDataError,
    PersistenceError,
    UploadedFileRecord,
)
from persistence.clock import utc_now
from persistence.manager import SessionManager
from persistence.sql.runner import traced
from persistence.storage import SessionStorage


@contextmanager
def recorded_statements(storage: SessionStorage) -> Iterator[list[str]]:
    """The SQL statements the storage sends while the block runs.

    Every statement goes through the SQL runner, whichever way it runs (inside
    aiosqlite's thread, on an asyncpg connection or in a unit of work).
    """
    assert storage.backend_name in ("sqlite", "postgresql")
    seen: list[str] = []
    with traced(seen.append):
        yield seen


def _writes(statements: list[str]) -> list[str]:
    return [s for s in statements if s.lstrip().upper().startswith(("INSERT", "UPDATE", "DELETE"))]


async def _stored_session(
    storage: SessionStorage, hours_ago: float, *, messages: int = 1, status: str = "active"
) -> ChatSession:
    at = utc_now() - timedelta(hours=hours_ago)
    session = ChatSession(model="m", created_at=at, updated_at=at, status=status)
    for i in range(messages):
        session.messages.append(
            ChatMessage(session_id=session.session_id, role="user", content=f"m{i}", created_at=at)
        )
    session.message_count = messages
    await storage.save_session(session)
    return session


def _file(file_id: str, expires_in_hours: float) -> UploadedFileRecord:
    now = utc_now()
    return UploadedFileRecord(
        file_id=file_id,
        gemini_file_name=f"files/{file_id}",
        gemini_file_uri=f"https://example.invalid/{file_id}",
        display_name=f"{file_id}.txt",
        size=10,
        mime_type="text/plain",
        uploaded_at=now - timedelta(hours=1),
        expires_at=now + timedelta(hours=expires_in_hours),
    )


async def test_create_session_and_auto_save_store_the_conversation(
    sql_storage: SessionStorage,
) -> None:
    manager = SessionManager(sql_storage)
    session = await manager.create_session("gemini-2.5-flash", metadata={"user": "u1"})
    assert (await sql_storage.load_session(session.session_id)) is not None
    session.add_message("user", "Hello!")
    session.add_message("assistant", "Hi there!")
    assert await manager.auto_save(session) is True
    stored = await sql_storage.load_session(session.session_id)
    assert stored is not None
    assert [m.content for m in stored.messages] == ["Hello!", "Hi there!"]
    assert stored.metadata == {"user": "u1"}
    assert not manager.has_unsaved_changes(session.session_id)


async def test_auto_save_disabled_writes_nothing_and_returns_false(
    sql_storage: SessionStorage,
) -> None:
    manager = SessionManager(sql_storage, auto_save_enabled=False)
    session = await manager.create_session("m")
    session.add_message("user", "not yet")
    with recorded_statements(sql_storage) as statements:
        assert await manager.auto_save(session) is False
    assert statements == []
    with recorded_statements(sql_storage) as statements:
        assert await SessionManager(sql_storage).auto_save(session.model_copy()) is True
    assert _writes(statements), "the recorder sees the writes of an enabled auto-save"
    await sql_storage.delete_session(session.session_id)
    assert await sql_storage.load_session(session.session_id) is None
    assert manager.has_unsaved_changes(session.session_id)
    await manager.shutdown()
    stored = await sql_storage.load_session(session.session_id)
    assert stored is not None and [m.content for m in stored.messages] == ["not yet"]


async def test_get_session_serves_the_cached_object_and_loads_the_rest(
    sql_storage: SessionStorage,
) -> None:
    stored = await _stored_session(sql_storage, hours_ago=1, messages=3)
    manager = SessionManager(sql_storage)
    first = await manager.get_session(stored.session_id)
    assert first is not None and len(first.messages) == 3
    with recorded_statements(sql_storage) as statements:
        again = await manager.get_session(stored.session_id)
    assert again is first
    assert statements == []
    with recorded_statements(sql_storage) as statements:
        assert await SessionManager(sql_storage).get_session(stored.session_id) is not None
    assert statements, "a manager with an empty cache reads the store"
    assert await manager.get_session("no-such-session") is None


async def test_cache_is_bounded_and_evicts_the_least_recently_used(
    sql_storage: SessionStorage,
) -> None:
    manager = SessionManager(sql_storage, max_cached_sessions=2)
    a = await manager.create_session("m")
    b = await manager.create_session("m")
    await manager.get_session(a.session_id)  # a becomes the most recently used
    c = await manager.create_session("m")
    assert manager.cached_session_ids == [a.session_id, c.session_id]
    # `b` left the cache, but this caller still holds it: the manager returns it again.
    assert await manager.get_session(b.session_id) is b
    assert manager.cached_session_ids == [c.session_id, b.session_id]


async def test_eviction_saves_unsaved_changes_first(sql_storage: SessionStorage) -> None:
    manager = SessionManager(sql_storage, auto_save_enabled=False, max_cached_sessions=1)
    first = await manager.create_session("m")
    first.add_message("user", "kept on eviction")
    assert await sql_storage.load_session(first.session_id) is None
    await manager.create_session("m")
    stored = await sql_storage.load_session(first.session_id)
    assert stored is not None
    assert [m.content for m in stored.messages] == ["kept on eviction"]
    assert manager.cached_session_ids != [first.session_id]


async def test_startup_sweeps_deletes_expired_files_and_warms_the_cache(
    sql_storage: SessionStorage,
) -> None:
    stale = [await _stored_session(sql_storage, hours_ago=100) for _ in range(3)]
    fresh = [await _stored_session(sql_storage, hours_ago=h) for h in (5, 4, 3, 2, 1)]
    archived = await _stored_session(sql_storage, hours_ago=0.5, status="archived")
    await sql_storage.save_file_record(_file("old", expires_in_hours=-1))
    await sql_storage.save_file_record(_file("new", expires_in_hours=24))

    manager = SessionManager(sql_storage, expiry_hours=72, max_cached_sessions=3)
    result = await manager.startup()

    assert result["expired_sessions"] == 3
    assert result["expired_files_deleted"] == 1
    assert result["active_sessions"] == 5
    assert result["total_sessions"] == 9
    newest_three = [s.session_id for s in fresh[-3:]]
    assert sorted(manager.cached_session_ids) == sorted(newest_three)
    assert manager.cached_session_ids[-1] == fresh[-1].session_id
    assert archived.session_id not in manager.cached_session_ids
    for session in stale:
        loaded = await sql_storage.load_session(session.session_id)
        assert loaded is not None and loaded.status == "expired"
    assert await sql_storage.load_file_record("old") is None
    assert await sql_storage.load_file_record("new") is not None
    warmed = await manager.get_session(fresh[-1].session_id)
    assert warmed is not None and [m.content for m in warmed.messages] == ["m0"]


async def test_startup_warms_no_more_messages_than_its_budget(
    sql_storage: SessionStorage,
) -> None:
    small = await _stored_session(sql_storage, hours_ago=3, messages=3)
    long = await _stored_session(sql_storage, hours_ago=2, messages=40)
    newest = await _stored_session(sql_storage, hours_ago=1, messages=4)
    manager = SessionManager(sql_storage, max_cached_sessions=5)
    manager.warm_up_messages = 10

    result = await manager.startup()

    assert sorted(manager.cached_session_ids) == sorted([small.session_id, newest.session_id])
    assert result["cached_sessions"] == 2
    # The long one is loaded whole on first use.
    loaded = await manager.get_session(long.session_id)
    assert loaded is not None and len(loaded.messages) == 40 and loaded.message_count == 40


async def test_startup_counts_the_budget_again_on_what_it_read(
    sql_storage: SessionStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by attack: a session that grew between the warm-up's listing and its load
    was cached whole, past the budget."""
    grows = await _stored_session(sql_storage, hours_ago=2, messages=3)
    small = await _stored_session(sql_storage, hours_ago=1, messages=4)
    listed = sql_storage.list_sessions

    async def list_then_grow(*args: object, **kwargs: object) -> list[ChatSession]:
        page = await listed(*args, **kwargs)  # type: ignore[arg-type]
        other = await sql_storage.load_session(grows.session_id)
        assert other is not None
        for n in range(20):
            other.add_message("user", f"more {n}")
        await sql_storage.save_session(other)
        return page

    monkeypatch.setattr(sql_storage, "list_sessions", list_then_grow)
    manager = SessionManager(sql_storage, max_cached_sessions=5)
    manager.warm_up_messages = 10
    await manager.startup()

    assert manager.cached_session_ids == [small.session_id]


async def test_startup_cost_does_not_grow_with_the_store(sql_storage: SessionStorage) -> None:
    for _ in range(5):
        await _stored_session(sql_storage, hours_ago=1)
    with recorded_statements(sql_storage) as small:
        await SessionManager(sql_storage, max_cached_sessions=3).startup()
    for _ in range(40):
        await _stored_session(sql_storage, hours_ago=1)
    with recorded_statements(sql_storage) as large:
        await SessionManager(sql_storage, max_cached_sessions=3).startup()
    assert small and len(large) == len(small)


async def test_cleanup_expires_stale_sessions_in_one_statement_and_updates_the_cache(
    sql_storage: SessionStorage,
) -> None:
    stale = [await _stored_session(sql_storage, hours_ago=30) for _ in range(20)]
    recent = await _stored_session(sql_storage, hours_ago=1)
    manager = SessionManager(sql_storage, expiry_hours=24)
    cached = await manager.get_session(stale[0].session_id)
    assert cached is not None and cached.status == "active"

    with recorded_statements(sql_storage) as statements:
        assert await manager.cleanup_expired_sessions() == 20
    assert len(_writes(statements)) == 1
    assert cached.status == "expired"
    assert not manager.has_unsaved_changes(cached.session_id)
    statistics = await manager.get_statistics()
    assert statistics["expired_sessions"] == 20
    assert statistics["active_sessions"] == 1
    loaded = await sql_storage.load_session(recent.session_id)
    assert loaded is not None and loaded.status == "active"
    assert await manager.cleanup_expired_sessions() == 0


async def test_cleanup_saves_cached_changes_first_so_a_used_session_stays_active(
    sql_storage: SessionStorage,
) -> None:
    old = await _stored_session(sql_storage, hours_ago=30)
    manager = SessionManager(sql_storage, expiry_hours=24)
    session = await manager.get_session(old.session_id)
    assert session is not None
    session.add_message("user", "back again")
    assert await manager.cleanup_expired_sessions() == 0
    loaded = await sql_storage.load_session(old.session_id)
    assert loaded is not None and loaded.status == "active" and loaded.message_count == 2


async def test_archive_session_marks_store_and_cache(sql_storage: SessionStorage) -> None:
    manager = SessionManager(sql_storage)
    session = await manager.create_session("m")
    uncached = await _stored_session(sql_storage, hours_ago=1)
    assert await manager.archive_session(session.session_id) is True
    assert await manager.archive_session(uncached.session_id) is True
    assert await manager.archive_session(uncached.session_id) is True
    assert await manager.archive_session("no-such-session") is False
    assert session.status == "archived"
    for session_id in (session.session_id, uncached.session_id):
        loaded = await sql_storage.load_session(session_id)
        assert loaded is not None and loaded.status == "archived"
    assert (await manager.get_statistics())["archived_sessions"] == 2


async def test_get_statistics_counts_inside_the_database(sql_storage: SessionStorage) -> None:
    await _stored_session(sql_storage, hours_ago=1, messages=4)
    await _stored_session(sql_storage, hours_ago=1, messages=2, status="archived")
    await sql_storage.save_file_record(_file("a", expires_in_hours=-1))
    await sql_storage.save_file_record(_file("b", expires_in_hours=1))
    manager = SessionManager(sql_storage)
    with recorded_statements(sql_storage) as statements:
        statistics = await manager.get_statistics()
    assert statements and not _writes(statements)
    assert statistics["backend"] == sql_storage.backend_name
    assert {
        k: statistics[k] for k in statistics if k.endswith(("sessions", "messages", "files"))
    } == {
        "total_sessions": 2,
        "active_sessions": 1,
        "archived_sessions": 1,
        "expired_sessions": 0,
        "total_messages": 6,
        "total_files": 2,
        "expired_files": 1,
        "cached_sessions": 0,
        "unsaved_sessions": 0,
    }


async def test_export_session_in_every_format(sql_storage: SessionStorage) -> None:
    manager = SessionManager(sql_storage)
    session = await manager.create_session("gemini-2.5-flash")
    session.add_message("user", "Hello!")
    session.add_message("assistant", "Hi there!")
    await manager.auto_save(session)
    fresh = SessionManager(sql_storage)
    document = json.loads(await fresh.export_session(session.session_id) or "")
    assert [m["content"] for m in document["messages"]] == ["Hello!", "Hi there!"]
    markdown = await fresh.export_session(session.session_id, "markdown")
    assert markdown is not None and "### 🤖 Assistant" in markdown
    text = await fresh.export_session(session.session_id, "text")
    assert text is not None and "] ASSISTANT:\nHi there!" in text
    assert await fresh.export_session("no-such-session", "text") is None


async def test_export_to_file_replaces_atomically_and_refuses_unknown_sessions(
    sql_storage: SessionStorage, tmp_path: Path
) -> None:
    manager = SessionManager(sql_storage)
    session = await manager.create_session("m")
    session.add_message("user", "Hello!")
    exports = tmp_path / "exports"
    exports.mkdir()
    target = exports / "out.md"
    target.write_text("previous export")
    assert await manager.export_to_file(session.session_id, target, "markdown") is True
    assert target.read_text(encoding="utf-8").startswith(f"# Chat Session: {session.session_id}")
    assert sorted(p.name for p in exports.iterdir()) == ["out.md"]

    missing = exports / "missing.json"
    assert await manager.export_to_file("no-such-session", missing) is False
    assert not missing.exists()
    with pytest.raises(ValueError, match="format"):
        await manager.export_to_file(session.session_id, target, "pdf")
    assert target.read_text(encoding="utf-8").startswith("# Chat Session")
    with pytest.raises(OSError) as raised:
        await manager.export_to_file(session.session_id, exports / "no" / "dir.json")
    assert raised.value.filename == str(exports / "no" / "dir.json")
    assert sorted(p.name for p in exports.iterdir()) == ["out.md"]
    # A failed rename names the caller's path, never the temp file.
    (exports / "a-dir").mkdir()
    with pytest.raises(OSError) as raised:
        await manager.export_to_file(session.session_id, exports / "a-dir")
    assert raised.value.filename == str(exports / "a-dir")
    assert ".tmp" not in str(raised.value)
    assert sorted(p.name for p in exports.iterdir()) == ["a-dir", "out.md"]


async def test_shutdown_saves_every_changed_session_even_when_one_save_fails(
    sql_storage: SessionStorage,
) -> None:
    owner = await _stored_session(sql_storage, hours_ago=1)
    taken_id = owner.messages[0].message_id
    manager = SessionManager(sql_storage, auto_save_enabled=False)
    first = await manager.create_session("m")
    broken = await manager.create_session("m")
    last = await manager.create_session("m")
    first.add_message("user", "first")
    # A message id that the store already holds in another session: this save fails.
    broken.messages.append(
        ChatMessage(message_id=taken_id, session_id=broken.session_id, role="user", content="x")
    )
    last.add_message("user", "last")

    with pytest.raises(PersistenceError, match=broken.session_id) as raised:
        await manager.shutdown()
    assert "1 session(s) could not be saved" in str(raised.value)
    for session, content in ((first, "first"), (last, "last")):
        stored = await sql_storage.load_session(session.session_id)
        assert stored is not None and [m.content for m in stored.messages] == [content]
    assert manager.cached_session_ids == [broken.session_id]
    assert await sql_storage.load_session(broken.session_id) is None

    broken.messages.pop()
    broken.add_message("user", "fixed")
    await manager.shutdown()
    assert manager.cached_session_ids == []
    stored = await sql_storage.load_session(broken.session_id)
    assert stored is not None and [m.content for m in stored.messages] == ["fixed"]


async def test_a_second_object_of_a_cached_session_does_not_lose_the_first_ones_changes(
    sql_storage: SessionStorage,
) -> None:
    stored = await _stored_session(sql_storage, hours_ago=1)
    manager = SessionManager(sql_storage, auto_save_enabled=False)
    cached = await manager.get_session(stored.session_id)
    assert cached is not None
    cached.add_message("user", "from the cached object")
    other = await sql_storage.load_session(stored.session_id)
    assert other is not None
    other.add_message("user", "from another object")
    await manager.save_session(other)
    loaded = await sql_storage.load_session(stored.session_id)
    assert loaded is not None
    assert sorted(m.content for m in loaded.messages) == sorted(
        ["m0", "from the cached object", "from another object"]
    )


async def test_delete_session_removes_it_from_store_and_cache(sql_storage: SessionStorage) -> None:
    manager = SessionManager(sql_storage)
    session = await manager.create_session("m")
    assert await manager.delete_session(session.session_id) is True
    assert manager.cached_session_ids == []
    assert await manager.get_session(session.session_id) is None
    assert await manager.delete_session(session.session_id) is False


def test_bad_settings_are_refused(sqlite_path: Path) -> None:
    from persistence import SQLiteSessionStorage

    storage = SQLiteSessionStorage(sqlite_path)
    # InvalidDataError, a ValueError and a PersistenceError, as every bad input is
    # (found by audit: plain ValueErrors, and a TypeError for a value of another type).
    for bound in (0, -1, "10", 2.5, True, None):
        with pytest.raises(InvalidDataError, match="max_cached_sessions"):
            SessionManager(storage, max_cached_sessions=bound)  # type: ignore[arg-type]
    for hours in (0, -1.5, float("nan"), float("inf"), 10_000_001, "24", True, None):
        with pytest.raises(InvalidDataError, match="expiry_hours"):
            SessionManager(storage, expiry_hours=hours)  # type: ignore[arg-type]
    # Found by attack: "false" turned auto-save on, by its truth value.
    for flag in ("false", "0", 0, 1, None):
        with pytest.raises(InvalidDataError, match="auto_save_enabled: must be True or False"):
            SessionManager(storage, auto_save_enabled=flag)  # type: ignore[arg-type]
    assert SessionManager(storage, max_cached_sessions=1, expiry_hours=0.5) is not None
    assert SessionManager(storage, auto_save_enabled=False).auto_save_enabled is False


async def test_bad_arguments_are_refused_before_the_cache(sqlite_path: Path) -> None:
    """Found by review: a dict given to save_session or auto_save raised a bare
    AttributeError, a list as an id a TypeError from the cache; a loaded session given
    another id was cached under it."""
    from persistence import SQLiteSessionStorage

    storage = SQLiteSessionStorage(sqlite_path)
    await storage.initialize()
    manager = SessionManager(storage)
    try:
        for call in (manager.save_session, manager.auto_save):
            with pytest.raises(InvalidDataError, match="session: expected ChatSession"):
                await call({"session_id": "s"})  # type: ignore[arg-type]
        for call in (manager.get_session, manager.delete_session, manager.archive_session):
            with pytest.raises(InvalidDataError, match="session_id: must be a string"):
                await call(["s"])  # type: ignore[arg-type]

        session = await manager.create_session("m")
        session.add_message("user", "hello")
        await manager.save_session(session)
        first_id = session.session_id
        session.session_id = "another-id"
        for call in (manager.save_session, manager.auto_save):
            with pytest.raises(InvalidDataError, match="a session's id never changes"):
                await call(session)
        assert await manager.get_session("another-id") is None
        stored = await storage.load_session(first_id)
        assert stored is not None and stored.message_count == 1
        session.session_id = first_id  # else shutdown() cannot save it, and says so
    finally:
        await manager.shutdown()
        await storage.close()
