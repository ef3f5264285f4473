"""Sessions stored, moved to another id in one unit of work, and read back by iteration:
what the one-state iteration tests do to a store between two batches."""

from __future__ import annotations

from collections.abc import AsyncIterator

from persistence import ChatSession, SessionStorage


async def stored(storage: SessionStorage, *session_ids: str) -> None:
    """Saves a session of one message under each of `session_ids`."""
    for session_id in session_ids:
        session = ChatSession.create("m", session_id=session_id)
        session.add_message("user", f"in {session_id}")
        await storage.save_session(session)


async def moved(storage: SessionStorage, old: str, new: str) -> None:
    """Moves session `old` to id `new` in one unit of work."""
    async with storage.unit_of_work() as uow:
        moving = await uow.sessions.get(old)
        assert moving is not None
        await uow.sessions.delete(old)
        moved = ChatSession.create("m", session_id=new)
        for message in moving.messages:
            moved.add_message(message.role, message.content)
        await uow.sessions.add(moved)
        await uow.commit()


async def ids(batches: AsyncIterator[list[ChatSession]]) -> list[str]:
    """The session ids of every batch, in order."""
    return [session.session_id async for batch in batches for session in batch]
