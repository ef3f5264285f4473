"""The collector pause around big reads: nestable, thread-safe, leaves the app's choice alone."""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from persistence import ChatSession, SQLiteSessionStorage
from persistence.garbage_collection import collection_paused


@pytest.fixture(autouse=True)
def collector_enabled() -> Iterator[None]:
    was = gc.isenabled()
    gc.enable()
    yield
    if not was:
        gc.disable()


def test_paused_inside_resumed_after_even_on_error() -> None:
    with pytest.raises(RuntimeError), collection_paused():
        assert not gc.isenabled()
        raise RuntimeError("boom")
    assert gc.isenabled()


def test_nested_pauses_resume_only_at_the_outermost() -> None:
    with collection_paused():
        with collection_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()


def test_a_collector_the_application_disabled_stays_disabled() -> None:
    gc.disable()
    with collection_paused():
        pass
    assert not gc.isenabled()


def test_overlapping_pauses_in_two_threads_resume_once_both_end() -> None:
    inside, release = threading.Event(), threading.Event()

    def other() -> None:
        with collection_paused():
            inside.set()
            release.wait(10)

    thread = threading.Thread(target=other)
    with collection_paused():
        thread.start()
        assert inside.wait(10)
    assert not gc.isenabled()  # the other thread's pause still holds
    release.set()
    thread.join(10)
    assert gc.isenabled()


@pytest.mark.sqlite
async def test_a_sqlite_read_fetches_and_builds_with_no_collection_in_between(
    tmp_path: Path,
) -> None:
    """Collections in the SQLite thread while a big history is read: none but those the
    pause held off, once it ends, and the collector is on again afterwards (low
    thresholds make any unpaused stretch show: dozens of collections)."""
    async with SQLiteSessionStorage(tmp_path / "gc.db") as storage:
        session = ChatSession.create("m")
        for n in range(3000):
            session.add_message("user", f"message {n}", {"n": n})
        await storage.save_session(session)

        threads: list[str] = []

        def seen(phase: str, info: dict[str, int]) -> None:
            if phase == "start":
                threads.append(threading.current_thread().name)

        thresholds = gc.get_threshold()
        gc.set_threshold(50, 2, 2)
        gc.callbacks.append(seen)
        try:
            loaded = await storage.load_session(session.session_id)
            listed = await storage.list_sessions()
        finally:
            gc.callbacks.remove(seen)
            gc.set_threshold(*thresholds)

        assert loaded is not None and loaded.messages == session.messages
        assert [s.session_id for s in listed] == [session.session_id]
        main = threading.main_thread().name
        # Only what the pause held off: at most one collection per generation at resume.
        assert len([name for name in threads if name != main]) <= 3, threads
        assert gc.isenabled()
