"""The unit of work: everything commits together or not at all."""

from __future__ import annotations

import contextlib

import pytest

from persistence import InvalidDataError, PersistenceError, SessionDeletedError, SessionStorage
from tests.contract.conftest import Reopen
from tests.factories import conversation, file_record


async def test_commit_makes_sessions_and_files_durable_together(
    storage: SessionStorage, reopen: Reopen
) -> None:
    session, record = conversation(2), file_record()
    async with storage.unit_of_work() as uow:
        await uow.sessions.add(session)
        await uow.files.add(record)
        await uow.commit()

    async with reopen(storage) as fresh:
        assert await fresh.load_session(session.session_id) == session
        assert await fresh.load_file_record(record.file_id) == record


async def test_leaving_without_commit_rolls_back(storage: SessionStorage, reopen: Reopen) -> None:
    session, record = conversation(2), file_record()
    async with storage.unit_of_work() as uow:
        await uow.sessions.add(session)
        await uow.files.add(record)

    async with reopen(storage) as fresh:
        assert await fresh.load_session(session.session_id) is None
        assert await fresh.load_file_record(record.file_id) is None


async def test_an_error_inside_rolls_everything_back(
    storage: SessionStorage, reopen: Reopen
) -> None:
    stored = conversation(1)
    await storage.save_session(stored)
    fresh_session = conversation(1)

    with pytest.raises(RuntimeError):
        async with storage.unit_of_work() as uow:
            loaded = await uow.sessions.get(stored.session_id)
            assert loaded is not None
            loaded.add_message("user", "never committed")
            await uow.sessions.add(loaded)
            await uow.sessions.add(fresh_session)
            raise RuntimeError("boom")

    async with reopen(storage) as fresh:
        assert await fresh.load_session(fresh_session.session_id) is None
        reloaded = await fresh.load_session(stored.session_id)
        assert reloaded is not None and reloaded.message_count == 1


async def test_messages_of_a_rolled_back_save_are_sent_again_later(
    storage: SessionStorage,
) -> None:
    session = conversation(1)
    await storage.save_session(session)
    session.add_message("user", "first attempt rolled back")
    async with storage.unit_of_work() as uow:
        await uow.sessions.add(session)
        await uow.rollback()

    await storage.save_session(session)

    loaded = await storage.load_session(session.session_id)
    assert loaded is not None
    assert [m.content for m in loaded.messages] == ["message 0", "first attempt rolled back"]


async def test_get_add_commit_appends_through_the_unit_of_work(storage: SessionStorage) -> None:
    session = conversation(1)
    await storage.save_session(session)

    async with storage.unit_of_work() as uow:
        loaded = await uow.sessions.get(session.session_id)
        assert loaded is not None
        loaded.add_message("user", "Hello!")
        await uow.sessions.add(loaded)
        await uow.sessions.add(loaded)
        await uow.commit()

    reloaded = await storage.load_session(session.session_id)
    assert reloaded is not None
    assert [m.content for m in reloaded.messages] == ["message 0", "Hello!"]


async def test_delete_through_the_unit_of_work(storage: SessionStorage) -> None:
    session, record = conversation(1), file_record()
    await storage.save_session(session)
    await storage.save_file_record(record)

    async with storage.unit_of_work() as uow:
        assert await uow.sessions.delete(session.session_id) is True
        assert await uow.files.delete(record.file_id) is True
        assert await uow.files.get(record.file_id) is None
        await uow.commit()

    assert await storage.load_session(session.session_id) is None
    assert await storage.load_file_record(record.file_id) is None


async def test_a_committed_unit_of_work_refuses_more_work(storage: SessionStorage) -> None:
    async with storage.unit_of_work() as uow:
        await uow.commit()
        with pytest.raises(PersistenceError):
            await uow.sessions.add(conversation(1))


async def test_a_unit_of_work_after_its_block_refuses_more_work(storage: SessionStorage) -> None:
    # Found by attack: a call after the block began a transaction that nothing ended,
    # on a connection never given back; on SQLite every later write then failed at the
    # busy timeout, and `add` and `commit` after the block wrote to the store.
    kept = conversation()
    await storage.save_session(kept)
    async with storage.unit_of_work() as uow:
        pass
    late = conversation()
    for call in (
        lambda: uow.sessions.get(kept.session_id),
        lambda: uow.sessions.add(late),
        lambda: uow.files.add(file_record()),
        uow.commit,
    ):
        with pytest.raises(PersistenceError, match="ended with its `async with` block"):
            await call()
    with pytest.raises(PersistenceError, match="ended with its `async with` block"):
        await uow.rollback()
    other = conversation()
    assert await storage.save_session(other) is True
    assert await storage.load_session(late.session_id) is None


async def test_a_rollback_after_the_commit_is_refused_and_undoes_nothing(
    storage: SessionStorage,
) -> None:
    # Found by attack: it marked what the unit read after its writes as never committed,
    # and the saves of those objects were refused as conflicts.
    session = conversation()
    await storage.save_session(session)
    async with storage.unit_of_work() as uow:
        session.add_message("user", "in the unit")
        await uow.sessions.add(session)
        read = await uow.sessions.get(session.session_id)
        await uow.commit()
        with pytest.raises(PersistenceError, match="already committed"):
            await uow.rollback()
    with pytest.raises(PersistenceError, match="already committed"):
        await uow.rollback()
    assert read is not None
    read.add_message("user", "after the unit")
    assert await storage.save_session(read) is True


async def test_a_unit_with_a_refused_session_commits_nothing_though_the_error_was_caught(
    storage: SessionStorage, reopen: Reopen
) -> None:
    """Found by attack: after `add` refused a session (a message id of another session)
    and the caller went on to commit, SQLite committed half of the refused save (the
    session's new count and metadata, not its messages) and PostgreSQL committed nothing
    while commit() returned, the other session taken as saved: its message was lost."""
    owner, good, bad = conversation(1), conversation(1), conversation(1)
    for session in (owner, good, bad):
        await storage.save_session(session)
    good.add_message("user", "sent with the unit")
    bad.add_message("user", "refused with the unit")
    bad.metadata["title"] = "refused"
    bad.messages.append(owner.messages[0].model_copy(update={"session_id": bad.session_id}))

    # SQL refuses `bad` in add() and then the commit; MongoDB holds the writes and
    # refuses the commit.
    with pytest.raises(PersistenceError):
        async with storage.unit_of_work() as uow:
            await uow.sessions.add(good)
            with contextlib.suppress(InvalidDataError):
                await uow.sessions.add(bad)
            await uow.commit()

    async with reopen(storage) as fresh:
        stored_good = await fresh.load_session(good.session_id)
        stored_bad = await fresh.load_session(bad.session_id)
    assert stored_good is not None and stored_bad is not None
    assert [m.content for m in stored_good.messages] == ["message 0"]
    assert [m.content for m in stored_bad.messages] == ["message 0"]
    assert (stored_bad.message_count, stored_bad.metadata) == (1, {})
    assert storage.has_unsaved_changes(good)
    await storage.save_session(good)
    reloaded = await storage.load_session(good.session_id)
    assert reloaded is not None
    assert [m.content for m in reloaded.messages] == ["message 0", "sent with the unit"]


async def test_a_unit_whose_save_of_a_session_it_deleted_failed_commits_nothing_after(
    storage: SessionStorage, reopen: Reopen
) -> None:
    """Found by review (MongoDB): a unit that saved one session, deleted a second and
    then held a save of the second raised SessionDeletedError at commit() after the
    first save and the delete were sent in its transaction; a caller that caught it
    and called commit() again committed both. SQL refuses the save in add()."""
    good, gone = conversation(1), conversation(1)
    for session in (good, gone):
        await storage.save_session(session)
    good.add_message("user", "sent with the unit")
    stale = await storage.load_session(gone.session_id)
    assert stale is not None
    stale.add_message("user", "to the session the unit deleted")

    with pytest.raises(PersistenceError):
        async with storage.unit_of_work() as uow:
            await uow.sessions.add(good)
            assert await uow.sessions.delete(gone.session_id) is True
            with contextlib.suppress(SessionDeletedError):
                await uow.sessions.add(stale)
                await uow.commit()
            await uow.commit()

    async with reopen(storage) as fresh:
        stored_good = await fresh.load_session(good.session_id)
        stored_gone = await fresh.load_session(gone.session_id)
    assert stored_good is not None and stored_gone is not None
    assert [m.content for m in stored_good.messages] == ["message 0"]
    assert [m.content for m in stored_gone.messages] == ["message 0"]
    assert storage.has_unsaved_changes(good)


async def test_a_rolled_back_unit_of_work_leaves_earlier_edits_pending(
    storage: SessionStorage,
) -> None:
    session = conversation(3)
    await storage.save_session(session)
    first = session.messages[0].message_id
    session.edit_message(first, content="edited before the unit of work")
    async with storage.unit_of_work() as uow:
        await uow.sessions.add(session)
        # left without commit: rolled back
    assert storage.has_unsaved_changes(session)
    await storage.save_session(session)
    loaded = await storage.load_session(session.session_id)
    assert loaded is not None
    assert loaded.messages[0].content == "edited before the unit of work"


async def test_a_session_saved_only_through_units_of_work_keeps_no_history_of_its_edits(
    storage: SessionStorage,
) -> None:
    """Found by attack: a committed unit of work kept the object's log of edits,
    rewinds and pops (each with the message it replaced) for a rollback that could no
    longer come, so a long-lived session grew by every edit."""
    session = conversation(1)
    await storage.save_session(session)
    for turn in range(5):
        session.edit_message(session.messages[-1].message_id, content=f"edited {turn}")
        session.add_message("user", f"turn {turn}")
        async with storage.unit_of_work() as uow:
            await uow.sessions.add(session)
            await uow.commit()
    assert session._log == []  # the log a save trims: nothing left to reapply
    loaded = await storage.load_session(session.session_id)
    assert loaded is not None and [m.content for m in loaded.messages] == [
        m.content for m in session.messages
    ]
