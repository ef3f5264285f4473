"""`sessions list` streams: each page is printed before the next one is read."""

from __future__ import annotations

import asyncio
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from persistence import ChatSession
from persistence.cli import app, listing
from persistence.sql.sqlite_storage import SQLiteSessionStorage


def _ok(*args: str) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.fixture
def store(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'list.db'}"
    for _ in range(7):
        _ok("demo", "--url", url)
    return url


Call = tuple[int, int, str, str | None]


@pytest.fixture
def pages(monkeypatch: pytest.MonkeyPatch) -> list[Call]:
    """Each list_sessions call: (limit, offset, what stdout held when it was made, the
    id of the session the page follows)."""
    monkeypatch.setattr(listing, "FIRST_PAGE", 2)
    monkeypatch.setattr(listing, "PAGE", 3)
    calls: list[Call] = []
    original = SQLiteSessionStorage.list_sessions

    async def recording(self: Any, *args: Any, **kwargs: Any) -> Any:
        sys.stdout.flush()
        written = sys.stdout.buffer.getvalue().decode()  # type: ignore[attr-defined]
        after = kwargs.get("after")
        calls.append((kwargs["limit"], kwargs["offset"], written, after and after.session_id))
        return await original(self, *args, **kwargs)

    monkeypatch.setattr(SQLiteSessionStorage, "list_sessions", recording)
    return calls


def test_rows_are_printed_before_the_next_page_is_read(store: str, pages: list[Call]) -> None:
    listed = json.loads(_ok("sessions", "list", "--json", "--url", store))
    everything = [row["session_id"] for row in listed]
    pages.clear()
    output = _ok("sessions", "list", "--limit", "6", "--url", store)

    # Each page after the first follows the last session shown (found by attack: paged
    # by offset, sessions written meanwhile pushed others back into the next page).
    assert [(limit, offset) for limit, offset, _, _ in pages] == [(3, 0), (4, 0), (2, 0)]
    assert [after for _, _, _, after in pages] == [None, everything[1], everything[4]]
    _, _, before_second, _ = pages[1]
    assert everything[0] in before_second and everything[1] in before_second
    assert everything[2] not in before_second
    assert all(session_id in output for session_id in everything[:6])
    assert everything[6] not in output
    assert "More follow: --offset 6" in output


def test_streamed_json_is_the_same_array(store: str, pages: list[Call]) -> None:
    streamed = json.loads(_ok("sessions", "list", "--json", "--limit", "7", "--url", store))
    assert len(streamed) == 7 and len(pages) == 3  # pages of 2, 3 and the last 2
    whole = json.loads(
        _ok("sessions", "list", "--json", "--limit", "7", "--offset", "0", "--url", store)
    )
    assert streamed == whole
    assert json.loads(_ok("sessions", "list", "--json", "--offset", "7", "--url", store)) == []


def test_json_rows_keep_line_separators_inside_values(tmp_path: Path) -> None:
    """Found by attack: U+2028, U+2029 and U+0085 in a value came out as a line break
    and an indent, so the output was no longer JSON."""
    values = {"ls": "a\u2028b", "ps": "c\u2029d", "nel": "e\x85f"}
    path = tmp_path / "separators.db"

    async def store() -> None:
        async with SQLiteSessionStorage(path) as storage:
            session = ChatSession.create("model\u2028x", session_id="id\u2029y", metadata=values)
            await storage.save_session(session)

    asyncio.run(store())
    [row] = json.loads(_ok("sessions", "list", "--json", "--url", f"sqlite:///{path}"))
    assert (row["session_id"], row["model"], row["metadata"]) == (
        "id\u2029y",
        "model\u2028x",
        values,
    )


def test_years_before_1000_are_padded_in_listings(tmp_path: Path) -> None:
    """Found by review: strftime's year is not zero-padded on glibc (999, not 0999)."""
    early = datetime(999, 12, 31, 23, 59, 59, tzinfo=UTC)
    path = tmp_path / "early.db"

    async def store() -> None:
        async with SQLiteSessionStorage(path) as storage:
            session = ChatSession(model="m", session_id="early", created_at=early, updated_at=early)
            await storage.save_session(session)

    asyncio.run(store())
    url = f"sqlite:///{path}"
    assert "0999-12-31 23:59:59" in _ok("sessions", "list", "--url", url)
    assert "0999-12-31 23:59:59 UTC" in _ok("sessions", "show", "early", "--url", url)
