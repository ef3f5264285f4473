"""The small interface through which workloads drive one system on one backend.

Two kinds of target implement it: `persistence` through its public API, and `raw`,
the same work written by hand on the bare driver (aiosqlite, asyncpg).
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

from benchkit.common import Message, Skip, Texts


class Target:
    kind = ""
    backend = ""

    def check_workload(self, workload: str) -> None:
        """Raises Skip, before any seeding, when this target cannot run `workload`."""

    async def open(self, location: str) -> None:
        """Connects to a fresh store and creates the schema."""
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    async def create_session(self) -> Any:
        """Creates and stores an empty session; returns the caller's handle on it."""
        raise NotImplementedError

    async def append(self, handle: Any, role: str, content: str) -> None:
        """Appends one message and makes it durable: the auto-save hot path."""
        raise NotImplementedError

    async def add_messages(self, handle: Any, messages: list[Message]) -> None:
        """Stores many messages in one transaction (the bulk path)."""
        raise NotImplementedError

    async def load(self, handle: Any, last: int | None = None) -> int:
        """Loads the session with its whole history (or its newest `last` messages);
        returns how many messages came back."""
        raise NotImplementedError

    async def seed_sessions(
        self, count: int, per_session: int, texts: Texts, updated_at: datetime | None = None
    ) -> None:
        """Stores `count` sessions of `per_session` messages each, in large transactions."""
        raise NotImplementedError

    async def list_page(self, limit: int) -> list[tuple[str, int]]:
        """The newest `limit` sessions as (session id, message count)."""
        raise NotImplementedError

    async def search(self, query: str, limit: int) -> int:
        raise NotImplementedError

    async def search_plan(self, query: str, limit: int) -> str:
        """The query plan of the search statement, to show which index it uses."""
        raise Skip("no query plan on this target")

    async def add_file_records(self, count: int, expired: int, prefix: str = "") -> None:
        raise NotImplementedError

    async def startup(self, expiry_hours: float) -> dict[str, Any]:
        """The start-of-service sweep: expire stale sessions, drop expired files, warm, count."""
        raise NotImplementedError

    async def after_startup(self) -> None:
        """Releases what `startup` left behind (outside the timed part)."""

    def transfer_operations(self) -> tuple[str, ...]:
        """Which of export, import and migrate this target can run (W7)."""
        return ()

    async def export_json(self, path: Path) -> dict[str, Any]:
        raise Skip("no export on this target")

    async def import_json(self, path: Path) -> dict[str, Any]:
        raise Skip("no import on this target")

    async def migrate_to(self, destination: Target) -> dict[str, Any]:
        raise Skip("no migration on this target")
