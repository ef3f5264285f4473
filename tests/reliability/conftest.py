"""Reliability suite: `--soak` for the long variants, figures printed at the end.

The default run is the short CI variant; `--soak` (or PERSISTENCE_SOAK=1) scales
durations, kill counts and hypothesis examples up.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from sqlalchemy import text

from persistence import PostgreSQLSessionStorage
from tests.reliability.support import Backends

_FIGURES: dict[str, dict[str, object]] = {}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--soak",
        action="store_true",
        default=False,
        help="run the long soak variants of the reliability suite",
    )


def soak_enabled(config: pytest.Config) -> bool:
    return bool(config.getoption("--soak", default=False)) or os.environ.get(
        "PERSISTENCE_SOAK", ""
    ) not in ("", "0")


@dataclass(frozen=True)
class Scale:
    """How hard the suite pushes: the CI variant or the soak variant."""

    soak: bool

    def pick(self, ci: int | float, soak: int | float) -> int | float:
        return soak if self.soak else ci

    def n(self, ci: int, soak: int) -> int:
        return soak if self.soak else ci

    def seconds(self, ci: float, soak: float) -> float:
        return soak if self.soak else ci


@pytest.fixture(scope="session")
def scale(request: pytest.FixtureRequest) -> Scale:
    return Scale(soak_enabled(request.config))


class Figures:
    """Numbers a test measured, printed in the terminal summary for RELIABILITY.md."""

    def __init__(self, test_id: str) -> None:
        self._entry = _FIGURES.setdefault(test_id, {})

    def __setitem__(self, key: str, value: object) -> None:
        self._entry[key] = value

    def add(self, key: str, value: int) -> None:
        current = self._entry.get(key, 0)
        assert isinstance(current, int)
        self._entry[key] = current + value


@pytest.fixture
def figures(request: pytest.FixtureRequest) -> Iterator[Figures]:
    yield Figures(request.node.nodeid)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _FIGURES:
        return
    terminalreporter.section("reliability figures")
    for test_id, entry in sorted(_FIGURES.items()):
        if entry:
            values = ", ".join(f"{key}={value}" for key, value in entry.items())
            terminalreporter.write_line(f"{test_id.split('::', 1)[-1]}: {values}")


@pytest.fixture
async def make_postgresql(
    postgresql_url: str,
) -> AsyncIterator[Callable[..., Awaitable[PostgreSQLSessionStorage]]]:
    """Builds initialized PostgreSQL storages on the emptied test database; closes them after."""
    made: list[PostgreSQLSessionStorage] = []
    emptied = False

    async def make(url: str | None = None, **options: Any) -> PostgreSQLSessionStorage:
        nonlocal emptied
        storage = PostgreSQLSessionStorage(url or postgresql_url, **options)
        made.append(storage)
        await storage.initialize()
        if not emptied:
            async with storage.engine.begin() as connection:
                await connection.execute(text(_TRUNCATE))
            emptied = True
        return storage

    yield make
    for storage in made:
        await storage.close()


_TRUNCATE = "TRUNCATE chat_messages, chat_sessions, uploaded_files RESTART IDENTITY CASCADE"


@pytest.fixture(scope="module")
def backends(tmp_path_factory: pytest.TempPathFactory, postgresql_url: str) -> Iterator[Backends]:
    """SQLite and PostgreSQL on one private event loop, for sync hypothesis tests."""
    opened = Backends(tmp_path_factory.mktemp("backends") / "sessions.db", postgresql_url)
    yield opened
    opened.close()
