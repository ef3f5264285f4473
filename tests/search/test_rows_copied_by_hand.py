"""Rows an operator copies with SQL, search documents and all, are indexed like the
library's, and deleting them later leaves the index sound.

Why SQLite keeps its FTS5 insert trigger, although no insert of the library carries a
document (they leave it pending). Dropping it saved 0.7 of 5.0 ms of statements per
1,000 bulk-inserted messages, but a row copied by `INSERT ... SELECT` then kept a
document the index never held; when its session was deleted, the delete trigger
removed that document from the index, and FTS5's integrity check reported the index
malformed (`scripts/results/2026-12-04-twelfth-round.md`).
"""

from __future__ import annotations

import pytest

from persistence import ChatSession
from tests.search.test_migration import _execute, _storage
from tests.search.test_pending import _check_index
from tests.sql.test_migrations import alembic

pytestmark = [pytest.mark.sqlite, pytest.mark.postgresql]

COPY = (
    "INSERT INTO chat_messages (message_id, session_id, position, role, content,"
    " created_at, metadata, search_text)"
    " SELECT 'copied', 'target', 1000, role, content, created_at, metadata, search_text"
    " FROM chat_messages WHERE message_id = :source"
)


async def test_a_row_copied_with_its_document_is_found_and_its_delete_keeps_the_index_sound(
    url: str,
) -> None:
    alembic(url, "upgrade", "head")
    source = ChatSession.create("m", session_id="source")
    kraken = source.add_message("user", "kraken sighted")
    target = ChatSession.create("m", session_id="target")
    for n in range(50):
        target.add_message("user", f"plankton {n}")
    async with _storage(url) as storage:
        await storage.save_session(source)
        await storage.save_session(target)
        await storage.index_for_search()

        await _execute(url, (COPY, {"source": kraken.message_id}))
        # A search tests the newest rows before it asks the index: these push the copy
        # out of them, so the index alone has to find it.
        later = ChatSession.create("m", session_id="later")
        for n in range(300):
            later.add_message("user", f"krill {n}")
        await storage.save_session(later)
        await storage.index_for_search()

        found = {m.message_id for m in await storage.search_messages("kraken")}
        assert found == {kraken.message_id, "copied"}
        await _check_index(storage)

        assert await storage.delete_session("target")
        await _check_index(storage)
        assert [m.message_id for m in await storage.search_messages("kraken")] == [
            kraken.message_id
        ]
        assert len(await storage.search_messages("krill", limit=500)) == 300
