"""Saves whose outcome the holder never learns, made exactly for tests: the storage's
own runner does the work, then raises CancelledError, as a cancel arriving just after
the commit does ("landed"), or raises before anything is sent ("lost")."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from persistence import ChatSession, SessionStorage


def outcomes(storage: Any, *results: str) -> None:
    """The next saves of `storage` land then raise ("landed") or raise unsent ("lost")."""
    run = type(storage)._run.__get__(storage)
    pending = list(results)

    async def _run(work: Any, action: str, **options: Any) -> Any:
        if options.get("write") and action == "save session" and pending:
            if pending.pop(0) == "lost":
                work.close()
                raise asyncio.CancelledError
            await run(work, action, **options)
            raise asyncio.CancelledError
        return await run(work, action, **options)

    storage._run = _run


async def save_unknown(storage: SessionStorage, session: ChatSession) -> None:
    with pytest.raises(asyncio.CancelledError):
        await storage.save_session(session)


async def stored_as_held(storage: SessionStorage, session: ChatSession) -> None:
    assert await storage.save_session(session) is True
    assert not storage.has_unsaved_changes(session)
    stored = await storage.load_session(session.session_id)
    assert stored is not None
    assert [(m.message_id, m.content) for m in stored.messages] == [
        (m.message_id, m.content) for m in session.messages
    ]
    assert stored.message_count == len(session.messages)
    assert (stored.metadata, stored.status) == (session.metadata, session.status)


async def stored_session(storage: SessionStorage) -> ChatSession:
    session = ChatSession.create("unknown")
    session.add_message("user", "stored")
    await storage.save_session(session)
    return session


def new_session(messages: int) -> ChatSession:
    session = ChatSession.create("unknown")
    for turn in range(messages):
        session.add_message("user", f"turn {turn}")
    return session
