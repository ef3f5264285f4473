"""The same work by hand on asyncpg: the baseline for PostgreSQL ratios.

The schema mirrors the library's (JSONB, TIMESTAMPTZ, the same indexes and the GIN
tsvector index). One asyncpg pool; an append is one transaction:
INSERT message; UPDATE session.
"""

from __future__ import annotations

import importlib
import json
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from benchkit.common import Message, Texts
from benchkit.raw_common import RawHandle, export_stream
from benchkit.stores import plain_postgresql_url
from benchkit.target import Target
from persistence.search import search_document, words

SCHEMA_TEMPLATE = """
CREATE TABLE chat_sessions (
  session_id VARCHAR(255) NOT NULL PRIMARY KEY, model VARCHAR(255) NOT NULL,
  created_at TIMESTAMPTZ NOT NULL, updated_at TIMESTAMPTZ NOT NULL,
  message_count BIGINT NOT NULL CHECK (message_count >= 0), metadata JSONB NOT NULL,
  status VARCHAR(16) NOT NULL CHECK (status IN ('active', 'archived', 'expired')));
CREATE INDEX ix_sessions_updated ON chat_sessions (updated_at, session_id);
CREATE INDEX ix_sessions_status_updated ON chat_sessions (status, updated_at, session_id);
CREATE TABLE chat_messages (
  id BIGSERIAL PRIMARY KEY, message_id VARCHAR(255) NOT NULL UNIQUE,
  session_id VARCHAR(255) NOT NULL
    REFERENCES chat_sessions (session_id) ON DELETE CASCADE,
  position BIGINT NOT NULL,
  role VARCHAR(16) NOT NULL CHECK (role IN ('user', 'assistant', 'system', 'tool')),
  content TEXT NOT NULL, created_at TIMESTAMPTZ NOT NULL, metadata JSONB NOT NULL,
  search_text TEXT NOT NULL DEFAULT '');
CREATE UNIQUE INDEX ix_messages_session_position ON chat_messages (session_id, position);
{search_terms_function};
ALTER TABLE chat_messages ADD COLUMN search_terms tsvector
  GENERATED ALWAYS AS (persistence_search_terms(search_text)) STORED;
CREATE INDEX ix_messages_search_terms ON chat_messages USING gin (search_terms);
CREATE TABLE uploaded_files (
  file_id VARCHAR(255) NOT NULL PRIMARY KEY, gemini_file_name TEXT NOT NULL,
  gemini_file_uri TEXT NOT NULL, display_name TEXT NOT NULL, size BIGINT NOT NULL,
  mime_type TEXT NOT NULL, uploaded_at TIMESTAMPTZ NOT NULL, expires_at TIMESTAMPTZ NOT NULL,
  metadata JSONB NOT NULL);
CREATE INDEX ix_files_expires ON uploaded_files (expires_at);
"""
# The library's own function (its newest revision), so both sides index alike.
SCHEMA = SCHEMA_TEMPLATE.replace(
    "{search_terms_function}",
    importlib.import_module(
        "persistence.sql.migrations.versions.0008_search_terms_cut_by_cast"
    ).CUT_BY_CAST_FUNCTION.strip(),
)

INSERT_SESSION = (
    "INSERT INTO chat_sessions (session_id, model, created_at, updated_at, message_count,"
    " metadata, status) VALUES ($1, $2, $3, $4, $5, '{}', 'active')"
)
INSERT_MESSAGE = (
    "INSERT INTO chat_messages (message_id, session_id, position, role, content, created_at,"
    " metadata, search_text) VALUES ($1, $2, $3, $4, $5, $6, '{}', $7)"
)
UPDATE_SESSION = (
    "UPDATE chat_sessions SET message_count = $1, updated_at = $2 WHERE session_id = $3"
)
SESSION_COLUMNS = "session_id, model, created_at, updated_at, message_count, metadata, status"
SELECT_SESSION = f"SELECT {SESSION_COLUMNS} FROM chat_sessions WHERE session_id = $1"
MESSAGE_COLUMNS = "message_id, session_id, role, content, created_at, metadata"
SELECT_MESSAGES = (
    f"SELECT {MESSAGE_COLUMNS} FROM chat_messages WHERE session_id = $1 ORDER BY position"
)
SELECT_NEWEST_MESSAGES = (
    f"SELECT {MESSAGE_COLUMNS} FROM chat_messages WHERE session_id = $1"
    " ORDER BY position DESC LIMIT $2"
)
SELECT_PAGE = (
    f"SELECT {SESSION_COLUMNS} FROM chat_sessions"
    " ORDER BY updated_at DESC, session_id DESC LIMIT $1"
)
# SessionManager's default max_cached_sessions: its startup warms that many.
WARM_SESSIONS = 1000
# The library's index, queried in one statement: every word a prefix term, newest first.
SEARCH = (
    f"SELECT {MESSAGE_COLUMNS} FROM chat_messages"
    " WHERE search_terms @@ CAST($1 AS tsquery) ORDER BY id DESC LIMIT $2"
)


def tsquery(query: str) -> str:
    return " & ".join(f"'{word}':*" for word in words(query))


def message_dict(row: Any) -> dict[str, Any]:
    return {
        "message_id": row[0],
        "session_id": row[1],
        "role": row[2],
        "content": row[3],
        "created_at": row[4],
        "metadata": json.loads(row[5]),
    }


class RawPostgreSQL(Target):
    kind = "raw"
    backend = "postgresql"

    async def open(self, location: str) -> None:
        import asyncpg

        self.location = location
        self.pool = await asyncpg.create_pool(
            plain_postgresql_url(location), min_size=1, max_size=10
        )
        async with self.pool.acquire() as connection:
            exists = await connection.fetchval("SELECT to_regclass('chat_sessions') IS NOT NULL")
            if not exists:
                await connection.execute(SCHEMA)

    async def close(self) -> None:
        await self.pool.close()

    async def create_session(self) -> RawHandle:
        handle = RawHandle(str(uuid.uuid4()))
        now = datetime.now(UTC)
        async with self.pool.acquire() as connection:
            await connection.execute(INSERT_SESSION, handle.session_id, "bench-model", now, now, 0)
        return handle

    async def append(self, handle: RawHandle, role: str, content: str) -> None:
        now = datetime.now(UTC)
        row = (
            uuid.uuid4().hex,
            handle.session_id,
            handle.count,
            role,
            content,
            now,
            search_document(content),
        )
        async with self.pool.acquire() as connection, connection.transaction():
            await connection.execute(INSERT_MESSAGE, *row)
            await connection.execute(UPDATE_SESSION, handle.count + 1, now, handle.session_id)
        handle.count += 1

    async def add_messages(self, handle: RawHandle, messages: list[Message]) -> None:
        now = datetime.now(UTC)
        rows = [
            (
                uuid.uuid4().hex,
                handle.session_id,
                handle.count + offset,
                role,
                content,
                now,
                search_document(content),
            )
            for offset, (role, content) in enumerate(messages)
        ]
        count = handle.count + len(rows)
        async with self.pool.acquire() as connection, connection.transaction():
            await connection.executemany(INSERT_MESSAGE, rows)
            await connection.execute(UPDATE_SESSION, count, now, handle.session_id)
        handle.count = count

    async def load(self, handle: RawHandle, last: int | None = None) -> int:
        async with self.pool.acquire() as connection:
            session = await connection.fetchrow(SELECT_SESSION, handle.session_id)
            if last is None:
                rows = await connection.fetch(SELECT_MESSAGES, handle.session_id)
            else:
                newest = await connection.fetch(SELECT_NEWEST_MESSAGES, handle.session_id, last)
                rows = list(reversed(newest))
        messages = [message_dict(row) for row in rows]
        assert session is not None and json.loads(session[5]) == {}
        return len(messages)

    async def seed_sessions(
        self, count: int, per_session: int, texts: Texts, updated_at: datetime | None = None
    ) -> None:
        for start in range(0, count, 1000):
            sessions, messages = [], []
            for _ in range(start, min(count, start + 1000)):
                session_id, now = str(uuid.uuid4()), datetime.now(UTC)
                sessions.append((session_id, "bench-model", now, updated_at or now, per_session))
                messages += [
                    (
                        uuid.uuid4().hex,
                        session_id,
                        position,
                        role,
                        content,
                        now,
                        search_document(content),
                    )
                    for position, (role, content) in enumerate(texts.many(per_session))
                ]
            async with self.pool.acquire() as connection, connection.transaction():
                await connection.executemany(INSERT_SESSION, sessions)
                await connection.executemany(INSERT_MESSAGE, messages)

    async def list_page(self, limit: int) -> list[tuple[str, int]]:
        async with self.pool.acquire() as connection:
            rows = await connection.fetch(SELECT_PAGE, limit)
        page = [(row[0], row[1], row[2], row[3], row[4], json.loads(row[5])) for row in rows]
        return [(row[0], row[4]) for row in page]

    async def search(self, query: str, limit: int) -> int:
        async with self.pool.acquire() as connection:
            rows = await connection.fetch(SEARCH, tsquery(query), limit)
        return len([message_dict(row) for row in rows])

    async def search_plan(self, query: str, limit: int) -> str:
        async with self.pool.acquire() as connection:
            rows = await connection.fetch("EXPLAIN " + SEARCH, tsquery(query), limit)
        return "\n".join(row[0] for row in rows)

    async def add_file_records(self, count: int, expired: int, prefix: str = "") -> None:
        now = datetime.now(UTC)
        rows = [
            (
                f"{prefix}file-{index}",
                f"files/{index}",
                f"https://example.invalid/files/{index}",
                f"upload {index}.txt",
                1024,
                "text/plain",
                now - timedelta(hours=49),
                now - timedelta(hours=1) if index < expired else now + timedelta(hours=48),
            )
            for index in range(count)
        ]
        sql = "INSERT INTO uploaded_files VALUES ($1, $2, $3, $4, $5, $6, $7, $8, '{}')"
        async with self.pool.acquire() as connection:
            await connection.executemany(sql, rows)

    async def startup(self, expiry_hours: float) -> dict[str, Any]:
        now = datetime.now(UTC)
        async with self.pool.acquire() as connection:
            async with connection.transaction():
                expired = await connection.execute(
                    "UPDATE chat_sessions SET status = 'expired'"
                    " WHERE status = 'active' AND updated_at < $1",
                    now - timedelta(hours=expiry_hours),
                )
                files = await connection.execute(
                    "DELETE FROM uploaded_files WHERE expires_at <= $1", now
                )
            await self._warm_cache(connection, WARM_SESSIONS)
            rows = await connection.fetch(
                "SELECT status, count(*) FROM chat_sessions GROUP BY status"
            )
        counts = {row[0]: row[1] for row in rows}
        return {
            "expired_sessions": int(expired.split()[-1]),
            "expired_files_deleted": int(files.split()[-1]),
            "active_sessions": counts.get("active", 0),
            "total_sessions": sum(counts.values()),
        }

    async def _warm_cache(self, connection: Any, limit: int) -> int:
        """What SessionManager.startup warms: the newest active sessions, with history."""
        page = await connection.fetch(
            SELECT_PAGE.replace("ORDER BY", "WHERE status = 'active' ORDER BY"), limit
        )
        ids = [row[0] for row in page]
        rows = await connection.fetch(
            f"SELECT {MESSAGE_COLUMNS} FROM chat_messages WHERE session_id = ANY($1)"
            " ORDER BY session_id, position",
            ids,
        )
        return len([message_dict(row) for row in rows])

    def transfer_operations(self) -> tuple[str, ...]:
        return ("export",)

    async def export_json(self, path: Path) -> dict[str, Any]:
        return await export_stream(self._session_batches(), path)

    async def _session_batches(self) -> Any:
        after = ""
        while True:
            async with self.pool.acquire() as connection:
                sessions = await connection.fetch(
                    f"SELECT {SESSION_COLUMNS} FROM chat_sessions WHERE session_id > $1"
                    " ORDER BY session_id LIMIT 500",
                    after,
                )
                if not sessions:
                    return
                ids = [row[0] for row in sessions]
                rows = await connection.fetch(
                    f"SELECT {MESSAGE_COLUMNS} FROM chat_messages WHERE session_id = ANY($1)"
                    " ORDER BY session_id, position",
                    ids,
                )
            yield sessions, [message_dict(row) for row in rows]
            after = ids[-1]
