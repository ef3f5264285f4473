"""`persistence search`: finds messages by the one rule, filters, JSON, never writes."""

from __future__ import annotations

import asyncio
import json
import sys
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from persistence import ChatSession, SQLiteSessionStorage
from persistence.cli import app
from persistence.cli import search as cli_search
from persistence.formats import visible
from persistence.sql.sql_storage import SqlSessionStorage
from tests.test_cli import failed, invoke, ok  # fixture: a fresh machine

# On a fresh machine: an empty current directory, no STORAGE_* variable.
pytestmark = [pytest.mark.sqlite, pytest.mark.usefixtures("workdir")]


def _store(path: Path) -> tuple[ChatSession, ChatSession]:
    first, second = ChatSession.create("m"), ChatSession.create("m")
    first.add_message("user", "How do I deploy the capital service?")
    first.add_message("assistant", "Deploy it with `make deploy` — 日本語のテキスト")
    second.add_message("user", "deploy failed: alice@example.com")

    async def save() -> None:
        async with SQLiteSessionStorage(path) as storage:
            for session in (first, second):
                await storage.save_session(session)

    asyncio.run(save())
    return first, second


def test_search_prints_matches_newest_first_as_json(tmp_path: Path) -> None:
    first, second = _store(tmp_path / "s.db")
    url = f"sqlite:///{tmp_path / 's.db'}"

    found = json.loads(ok("search", "DEPLOY", "--json", "--url", url).stdout)
    in_session = json.loads(
        ok("search", "deploy", "--session", first.session_id, "--json", "--url", url).stdout
    )
    by_role = json.loads(ok("search", "dep", "--role", "user", "--json", "--url", url).stdout)
    one = json.loads(ok("--url", url, "search", "deploy", "--limit", "1", "--json").stdout)

    assert [m["content"] for m in found] == [
        "deploy failed: alice@example.com",
        "Deploy it with `make deploy` — 日本語のテキスト",
        "How do I deploy the capital service?",
    ]
    assert [m["session_id"] for m in in_session] == [first.session_id] * 2
    assert [m["role"] for m in by_role] == ["user", "user"]
    assert [m["session_id"] for m in one] == [second.session_id]
    assert set(found[0]) == {
        "message_id",
        "session_id",
        "role",
        "content",
        "created_at",
        "metadata",
    }


def test_search_prints_a_table_and_says_when_nothing_matches(tmp_path: Path) -> None:
    _store(tmp_path / "s.db")
    url = f"sqlite:///{tmp_path / 's.db'}"

    table = ok("search", "テキスト", "--url", url).stdout
    nothing = ok("search", "NEAR(x) -y", "--url", url).stdout

    assert "日本語のテキスト" in table and "assistant" in table
    assert "No messages found." in nothing
    assert invoke("search", "x", "--role", "robot", "--url", url).exit_code == 2


def test_search_on_a_missing_database_creates_nothing(workdir: Path) -> None:
    line = failed("search", "anything")
    assert "no database" in line
    assert list(workdir.iterdir()) == []


def test_search_prints_each_match_on_one_line_of_its_own(tmp_path: Path) -> None:
    """Found by attack: the matches were one rich table, built whole before its first
    line (40,000 took 16 s and 310 MB), whose long contents wrapped onto many lines."""
    sessions = [ChatSession.create("m") for _ in range(3)]
    for n, session in enumerate(sessions):
        for k in range(400):
            session.add_message("user", f"needle {n} {k} " + "hay " * 60)

    async def save() -> None:
        async with SQLiteSessionStorage(tmp_path / "s.db") as storage:
            for session in sessions:
                await storage.save_session(session)

    asyncio.run(save())
    url = f"sqlite:///{tmp_path / 's.db'}"

    lines = ok("search", "needle", "--limit", "1200", "--url", url).stdout.splitlines()
    many = json.loads(ok("search", "needle", "--limit", "1100", "--json", "--url", url).stdout)

    title, header, *rows = lines
    assert title == "Messages matching 'needle'" and header.split() == [
        "Created", "(UTC)", "Session", "ID", "Role", "Content"
    ]  # fmt: skip
    assert len(rows) == 1200
    assert [row.split()[2] for row in rows] == [
        s.session_id for s in reversed(sessions) for _ in range(400)
    ]
    assert all(row.split()[3:5] == ["user", "needle"] and row.endswith("...") for row in rows)
    assert [m["content"].split()[1:3] for m in many] == [
        [str(n), str(k)] for n in (2, 1, 0) for k in range(399, -1, -1)
    ][:1100]


def test_search_prints_each_batch_before_it_reads_the_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by measuring: every match up to the limit was read before the first line
    (the issue: the CLI streams long listings, the first line before the last row)."""
    path = tmp_path / "many.db"
    session = ChatSession.create("m")
    for number in range(8):
        session.add_message("user", f"deploy number{number}")

    async def save() -> None:
        async with SQLiteSessionStorage(path) as storage:
            await storage.save_session(session)

    asyncio.run(save())
    monkeypatch.setattr(cli_search, "_PAGE", 3)
    printed_before: list[str] = []
    original = SqlSessionStorage._search_page

    async def recording(self: SqlSessionStorage, *args: Any, **kwargs: Any) -> Any:
        sys.stdout.flush()
        printed_before.append(sys.stdout.buffer.getvalue().decode())  # type: ignore[attr-defined]
        return await original(self, *args, **kwargs)

    monkeypatch.setattr(SqlSessionStorage, "_search_page", recording)
    url = f"sqlite:///{path}"

    result = CliRunner().invoke(app, ["search", "deploy", "--limit", "7", "--url", url])

    assert result.exit_code == 0, result.output
    newest_first = [f"number{n}" for n in range(7, -1, -1)]
    assert [word for word in newest_first if word in result.stdout] == newest_first[:7]
    assert "More may match: --limit 14" in result.stdout
    # Batches of 3, 3, then the 1 shown and the 1 that says more match.
    assert len(printed_before) == 3
    assert "number5" in printed_before[1] and "number4" not in printed_before[1]
    assert "number2" in printed_before[2] and "number1" not in printed_before[2]
    streamed = CliRunner().invoke(app, ["search", "deploy", "--json", "--url", url])
    assert [m["content"] for m in json.loads(streamed.stdout)] == [
        f"deploy {word}" for word in newest_first
    ]


def _whole_excerpt(content: str) -> str:
    """The excerpt as it was made before, of the whole content: what it must equal."""
    line = visible(" ".join(content.split()))
    return line if len(line) <= 120 else line[:117] + "..."


def test_an_excerpt_is_made_of_a_prefix_and_equals_that_of_the_whole_content() -> None:
    """Found by attack: the row of a 16 MB message took 212 MB and 1.3 s to make, as
    every word of the whole message was split off to show 120 characters."""
    contents = [
        "",
        "short",
        "x" * 120,
        "x" * 121,
        " " * 5000 + "late words " * 30,
        "\t\n" * 100_000 + "a",
        "\x1b[31m" * 60 + "red",
        ("word " * 40 + "\r\n" * 300) * 3,
        "y" * 479 + " " + "z" * 5,
    ]
    for content in contents:
        assert cli_search._excerpt(content) == _whole_excerpt(content), content[:40]
    big = "lorem ipsum dolor sit amet " * 600_000  # 16 MB
    tracemalloc.start()
    try:
        excerpt = cli_search._excerpt(big)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert excerpt == _whole_excerpt(big) and peak < 100_000, peak
