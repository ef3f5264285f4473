"""`persistence` through its public API (shared/API.md), on any of its backends."""

from __future__ import annotations

import importlib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from benchkit.common import Message, Skip, Texts
from benchkit.target import Target

# Sessions per unit of work when seeding big stores.
SEED_BATCH = 500


def optional_module(name: str, purpose: str) -> Any:
    """Imports a module that may not exist yet on this branch, or skips with the reason."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        raise Skip(f"{purpose}: module {name} is missing ({exc})") from None


class Library(Target):
    kind = "persistence"

    def __init__(self, backend: str, urls: dict[str, str]) -> None:
        import persistence

        self.backend = backend
        self._urls = urls
        self._p = persistence
        self.storage: Any = None
        self.location = ""
        self._manager: Any = None

    def check_workload(self, workload: str) -> None:
        if workload == "w6":
            optional_module("persistence.manager", "SessionManager")
        if workload == "w7":
            self._transfer()

    def _make_storage(self, location: str) -> Any:
        if self.backend == "sqlite":
            return self._p.SQLiteSessionStorage(location)
        if self.backend == "postgresql":
            return self._p.PostgreSQLSessionStorage(location)
        mongo = optional_module("persistence.mongo.backend", "MongoDB backend")
        return mongo.MongoDBSessionStorage(self._urls["mongodb"], database_name=location)

    async def open(self, location: str) -> None:
        self.location = location
        self.storage = self._make_storage(location)
        await self.storage.initialize()

    async def close(self) -> None:
        await self.storage.close()

    async def create_session(self) -> Any:
        session = self._p.ChatSession.create(model="bench-model")
        await self.storage.save_session(session)
        return session

    async def append(self, handle: Any, role: str, content: str) -> None:
        handle.add_message(role, content)
        await self.storage.save_session(handle)

    async def add_messages(self, handle: Any, messages: list[Message]) -> None:
        for role, content in messages:
            handle.add_message(role, content)
        async with self.storage.unit_of_work() as uow:
            await uow.sessions.add(handle)
            await uow.commit()

    async def load(self, handle: Any, last: int | None = None) -> int:
        session = await self.storage.load_session(handle.session_id, last=last)
        return len(session.messages)

    def _new_session(self, messages: list[Message], updated_at: datetime | None) -> Any:
        session = self._p.ChatSession.create(model="bench-model")
        for role, content in messages:
            session.add_message(role, content)
        if updated_at is not None:
            session.updated_at = updated_at
        return session

    async def seed_sessions(
        self, count: int, per_session: int, texts: Texts, updated_at: datetime | None = None
    ) -> None:
        for start in range(0, count, SEED_BATCH):
            batch = [
                self._new_session(texts.many(per_session), updated_at)
                for _ in range(start, min(count, start + SEED_BATCH))
            ]
            if hasattr(self.storage, "insert_sessions"):
                # The bulk path of migrations: seeding is not what is measured.
                assert await self.storage.insert_sessions(batch)
                continue
            async with self.storage.unit_of_work() as uow:
                for session in batch:
                    await uow.sessions.add(session)
                await uow.commit()

    async def list_page(self, limit: int) -> list[tuple[str, int]]:
        page = await self.storage.list_sessions(limit=limit)
        return [(session.session_id, session.message_count) for session in page]

    async def search(self, query: str, limit: int) -> int:
        return len(await self.storage.search_messages(query, limit=limit))

    async def search_plan(self, query: str, limit: int) -> str:
        if self.backend == "mongodb":
            raise Skip("no EXPLAIN through the MongoDB backend's public API")
        from benchkit.sqlplan import explain_search

        return await explain_search(self.storage.engine, self.search(query, limit), query.split())

    async def add_file_records(self, count: int, expired: int, prefix: str = "") -> None:
        now = datetime.now(UTC)
        for index in range(count):
            expires = now - timedelta(hours=1) if index < expired else now + timedelta(hours=48)
            record = self._p.UploadedFileRecord(
                file_id=f"{prefix}file-{index}",
                gemini_file_name=f"files/{index}",
                gemini_file_uri=f"https://example.invalid/files/{index}",
                display_name=f"upload {index}.txt",
                size=1024,
                mime_type="text/plain",
                uploaded_at=now - timedelta(hours=49),
                expires_at=expires,
            )
            await self.storage.save_file_record(record)

    async def startup(self, expiry_hours: float) -> dict[str, Any]:
        manager_module = optional_module("persistence.manager", "SessionManager")
        self._manager = manager_module.SessionManager(self.storage, expiry_hours=expiry_hours)
        return dict(await self._manager.startup())

    async def after_startup(self) -> None:
        await self._manager.shutdown()

    def transfer_operations(self) -> tuple[str, ...]:
        self._transfer()
        return ("export", "import", "migrate")

    def _transfer(self) -> Any:
        return optional_module("persistence.transfer", "export/import/migrate")

    async def export_json(self, path: Path) -> dict[str, Any]:
        return dict(await self._transfer().export_to_json(self.storage, path))

    async def import_json(self, path: Path) -> dict[str, Any]:
        return dict(await self._transfer().import_from_json(self.storage, path))

    async def migrate_to(self, destination: Target) -> dict[str, Any]:
        assert isinstance(destination, Library)
        report = await self._transfer().migrate_storage(self.storage, destination.storage)
        return dict(report)
