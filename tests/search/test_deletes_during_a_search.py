"""Another client's delete between a search's statements hides no match.

Found by attack: when the probe of the newest rows matched nothing, PostgreSQL's index
statement found the probe's window again, on a snapshot of its own. With rows of that
window deleted meanwhile its end moved down, and a match between the two ends was
searched by neither statement (SQLite, one transaction, found it).
"""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

from persistence import ChatSession, PostgreSQLSessionStorage, SessionStorage, SQLiteSessionStorage
from persistence.sql import search as search_module
from persistence.sql.search import PROBE_ROWS
from tests.reliability.support import child_env

_DELETE = """
import asyncio, sys
from persistence import PostgreSQLSessionStorage, SQLiteSessionStorage

async def main():
    kind, where, session_id = sys.argv[1:]
    storage = (PostgreSQLSessionStorage if kind == "postgresql" else SQLiteSessionStorage)(where)
    async with storage:
        assert await storage.delete_session(session_id)

asyncio.run(main())
"""


def _delete_elsewhere(storage: SessionStorage, session_id: str) -> None:
    """Deletes through another process: the search's own thread or loop waits meanwhile."""
    if isinstance(storage, SQLiteSessionStorage):
        kind, where = "sqlite", str(storage.database_path)
    else:
        assert isinstance(storage, PostgreSQLSessionStorage)
        kind, where = "postgresql", storage.url.render_as_string(hide_password=False)
    subprocess.run(
        [sys.executable, "-c", _DELETE, kind, where, session_id],
        env=child_env(),
        check=True,
        timeout=60,
    )


async def test_a_match_below_a_probe_whose_rows_are_deleted_meanwhile_is_found(
    sql_storage: SessionStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Newest first: 118 + 10 rows fill the probe's window exactly; the match is just below.
    newer, doomed = PROBE_ROWS - 10, 10
    for session_id, count, text in [
        ("older", 100, "older filler"),
        ("target", 1, "the needle is here"),
        ("doomed", doomed, "doomed"),
        ("newer", newer, "newer filler"),
    ]:
        session = ChatSession.create("m", session_id=session_id)
        for n in range(count):
            session.add_message("user", f"{text} {n}")
        await sql_storage.save_session(session)
    await sql_storage.index_for_search()
    original = search_module.index_parameters

    def deleted_first(*args: Any) -> Any:
        monkeypatch.setattr(search_module, "index_parameters", original)
        _delete_elsewhere(sql_storage, "doomed")
        return original(*args)

    monkeypatch.setattr(search_module, "index_parameters", deleted_first)
    found = await sql_storage.search_messages("needle")

    assert search_module.index_parameters is original, "the search did not reach the index"
    assert [m.content for m in found] == ["the needle is here 0"]
    assert await sql_storage.load_session("doomed") is None
