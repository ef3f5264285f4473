"""The same work by hand on aiosqlite: the baseline for SQLite ratios.

The schema mirrors the library's (tables, indexes, FTS5 index kept by triggers), so a
ratio shows what the library's code costs, not a difference in schema. Durability is the
library's default: WAL, synchronous=FULL, one transaction per append
(BEGIN IMMEDIATE; INSERT message; UPDATE session; COMMIT). One connection per process,
its transactions serialised by an asyncio lock, as one aiosqlite connection needs.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from benchkit.common import Message, Texts
from benchkit.raw_common import RawHandle, export_stream
from benchkit.target import Target
from persistence.search import search_document, words

SCHEMA = """
CREATE TABLE chat_sessions (
  session_id VARCHAR(255) NOT NULL PRIMARY KEY, model VARCHAR(255) NOT NULL,
  created_at DATETIME NOT NULL, updated_at DATETIME NOT NULL,
  message_count BIGINT NOT NULL CHECK (message_count >= 0), metadata JSON NOT NULL,
  status VARCHAR(16) NOT NULL CHECK (status IN ('active', 'archived', 'expired')));
CREATE INDEX ix_sessions_updated ON chat_sessions (updated_at, session_id);
CREATE INDEX ix_sessions_status_updated ON chat_sessions (status, updated_at, session_id);
CREATE TABLE chat_messages (
  id INTEGER NOT NULL PRIMARY KEY, message_id VARCHAR(255) NOT NULL UNIQUE,
  session_id VARCHAR(255) NOT NULL
    REFERENCES chat_sessions (session_id) ON DELETE CASCADE,
  position BIGINT NOT NULL,
  role VARCHAR(16) NOT NULL CHECK (role IN ('user', 'assistant', 'system', 'tool')),
  content TEXT NOT NULL, created_at DATETIME NOT NULL, metadata JSON NOT NULL,
  search_text TEXT NOT NULL DEFAULT '');
CREATE UNIQUE INDEX ix_messages_session_position ON chat_messages (session_id, position);
CREATE TABLE uploaded_files (
  file_id VARCHAR(255) NOT NULL PRIMARY KEY, gemini_file_name TEXT NOT NULL,
  gemini_file_uri TEXT NOT NULL, display_name TEXT NOT NULL, size BIGINT NOT NULL,
  mime_type TEXT NOT NULL, uploaded_at DATETIME NOT NULL, expires_at DATETIME NOT NULL,
  metadata JSON NOT NULL);
CREATE INDEX ix_files_expires ON uploaded_files (expires_at);
CREATE VIRTUAL TABLE chat_messages_fts USING fts5(
  search_text, content='chat_messages', content_rowid='id',
  tokenize='ascii', detail='none', columnsize=0);
CREATE TRIGGER chat_messages_fts_insert AFTER INSERT ON chat_messages BEGIN
  INSERT INTO chat_messages_fts(rowid, search_text) VALUES (new.id, new.search_text);
END;
CREATE TRIGGER chat_messages_fts_delete AFTER DELETE ON chat_messages BEGIN
  INSERT INTO chat_messages_fts(chat_messages_fts, rowid, search_text)
  VALUES ('delete', old.id, old.search_text);
END;
"""

INSERT_SESSION = (
    "INSERT INTO chat_sessions (session_id, model, created_at, updated_at, message_count,"
    " metadata, status) VALUES (?, ?, ?, ?, ?, '{}', 'active')"
)
INSERT_MESSAGE = (
    "INSERT INTO chat_messages (message_id, session_id, position, role, content, created_at,"
    " metadata, search_text) VALUES (?, ?, ?, ?, ?, ?, '{}', ?)"
)
UPDATE_SESSION = "UPDATE chat_sessions SET message_count = ?, updated_at = ? WHERE session_id = ?"
SELECT_SESSION = (
    "SELECT session_id, model, created_at, updated_at, message_count, metadata, status"
    " FROM chat_sessions WHERE session_id = ?"
)
SELECT_MESSAGES = (
    "SELECT message_id, session_id, role, content, created_at, metadata FROM chat_messages"
    " WHERE session_id = ? ORDER BY position"
)
SELECT_NEWEST_MESSAGES = (
    "SELECT message_id, session_id, role, content, created_at, metadata FROM chat_messages"
    " WHERE session_id = ? ORDER BY position DESC LIMIT ?"
)
SELECT_PAGE = (
    "SELECT session_id, model, created_at, updated_at, message_count, metadata, status"
    " FROM chat_sessions ORDER BY updated_at DESC, session_id DESC LIMIT ?"
)
# SessionManager's default max_cached_sessions: its startup warms that many.
WARM_SESSIONS = 1000
# The library's index, queried in one statement: every word a prefix term, newest first.
SEARCH = (
    "SELECT m.message_id, m.session_id, m.role, m.content, m.created_at, m.metadata"
    " FROM chat_messages_fts JOIN chat_messages AS m ON m.id = chat_messages_fts.rowid"
    " WHERE chat_messages_fts MATCH ? ORDER BY chat_messages_fts.rowid DESC LIMIT ?"
)


def stamp(moment: datetime | None = None) -> str:
    """The text form SQLAlchemy's DateTime uses on SQLite (UTC, no offset)."""
    value = (moment or datetime.now(UTC)).astimezone(UTC)
    return value.replace(tzinfo=None).isoformat(sep=" ", timespec="microseconds")


def message_dict(row: Any) -> dict[str, Any]:
    return {
        "message_id": row[0],
        "session_id": row[1],
        "role": row[2],
        "content": row[3],
        "created_at": row[4],
        "metadata": json.loads(row[5]),
    }


class RawSQLite(Target):
    kind = "raw"
    backend = "sqlite"

    async def open(self, location: str) -> None:
        import aiosqlite

        self.location = location
        self.db = await aiosqlite.connect(location, isolation_level=None, timeout=30)
        for pragma in ("journal_mode=WAL", "synchronous=FULL", "foreign_keys=ON"):
            await self.db.execute(f"PRAGMA {pragma}")
        await self.db.execute("PRAGMA busy_timeout=30000")
        await self._create_schema()
        self.lock = asyncio.Lock()

    async def _create_schema(self) -> None:
        exists = await self.db.execute_fetchall(
            "SELECT 1 FROM sqlite_master WHERE name = 'chat_sessions'"
        )
        if not list(exists):
            await self.db.executescript(SCHEMA)

    async def close(self) -> None:
        await self.db.close()

    async def _transaction(self, statements: list[tuple[str, Any, bool]]) -> None:
        """Runs (sql, parameters, many) in one BEGIN IMMEDIATE ... COMMIT."""
        async with self.lock:
            await self.db.execute("BEGIN IMMEDIATE")
            try:
                for sql, parameters, many in statements:
                    if many:
                        await self.db.executemany(sql, parameters)
                    else:
                        await self.db.execute(sql, parameters)
                await self.db.execute("COMMIT")
            except BaseException:
                await self.db.execute("ROLLBACK")
                raise

    async def create_session(self) -> RawHandle:
        handle = RawHandle(str(uuid.uuid4()))
        now = stamp()
        await self._transaction(
            [(INSERT_SESSION, (handle.session_id, "bench-model", now, now, 0), False)]
        )
        return handle

    async def append(self, handle: RawHandle, role: str, content: str) -> None:
        await self.add_messages(handle, [(role, content)])

    async def add_messages(self, handle: RawHandle, messages: list[Message]) -> None:
        now = stamp()
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
        insert = (
            (INSERT_MESSAGE, rows[0], False) if len(rows) == 1 else (INSERT_MESSAGE, rows, True)
        )
        await self._transaction([insert, (UPDATE_SESSION, (count, now, handle.session_id), False)])
        handle.count = count

    async def load(self, handle: RawHandle, last: int | None = None) -> int:
        session = list(await self.db.execute_fetchall(SELECT_SESSION, (handle.session_id,)))
        if last is None:
            rows = await self.db.execute_fetchall(SELECT_MESSAGES, (handle.session_id,))
        else:
            newest = await self.db.execute_fetchall(
                SELECT_NEWEST_MESSAGES, (handle.session_id, last)
            )
            rows = list(reversed(list(newest)))
        messages = [message_dict(row) for row in rows]
        assert session and json.loads(session[0][5]) == {}
        return len(messages)

    async def seed_sessions(
        self, count: int, per_session: int, texts: Texts, updated_at: datetime | None = None
    ) -> None:
        for start in range(0, count, 1000):
            sessions, messages = [], []
            for _ in range(start, min(count, start + 1000)):
                session_id, now = str(uuid.uuid4()), stamp()
                sessions.append((session_id, "bench-model", now, stamp(updated_at), per_session))
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
            await self._transaction(
                [(INSERT_SESSION, sessions, True), (INSERT_MESSAGE, messages, True)]
            )

    async def list_page(self, limit: int) -> list[tuple[str, int]]:
        rows = await self.db.execute_fetchall(SELECT_PAGE, (limit,))
        page = [(row[0], row[1], row[2], row[3], row[4], json.loads(row[5])) for row in rows]
        return [(row[0], row[4]) for row in page]

    async def search(self, query: str, limit: int) -> int:
        quoted = " ".join(f'"{word}"*' for word in words(query))
        rows = await self.db.execute_fetchall(SEARCH, (quoted, limit))
        return len([message_dict(row) for row in rows])

    async def search_plan(self, query: str, limit: int) -> str:
        quoted = " ".join(f'"{word}"*' for word in words(query))
        rows = await self.db.execute_fetchall("EXPLAIN QUERY PLAN " + SEARCH, (quoted, limit))
        return "\n".join(" ".join(str(value) for value in row) for row in rows)

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
                stamp(now - timedelta(hours=49)),
                stamp(now - timedelta(hours=1) if index < expired else now + timedelta(hours=48)),
            )
            for index in range(count)
        ]
        sql = "INSERT INTO uploaded_files VALUES (?, ?, ?, ?, ?, ?, ?, ?, '{}')"
        await self._transaction([(sql, rows, True)])

    async def startup(self, expiry_hours: float) -> dict[str, Any]:
        now = datetime.now(UTC)
        cutoff = stamp(now - timedelta(hours=expiry_hours))
        async with self.lock:
            await self.db.execute("BEGIN IMMEDIATE")
            expired = await self.db.execute(
                "UPDATE chat_sessions SET status = 'expired'"
                " WHERE status = 'active' AND updated_at < ?",
                (cutoff,),
            )
            files = await self.db.execute(
                "DELETE FROM uploaded_files WHERE expires_at <= ?", (stamp(now),)
            )
            await self.db.execute("COMMIT")
        await self._warm_cache(WARM_SESSIONS)
        counts = dict(
            await self.db.execute_fetchall(
                "SELECT status, count(*) FROM chat_sessions GROUP BY status"
            )
        )
        return {
            "expired_sessions": expired.rowcount,
            "expired_files_deleted": files.rowcount,
            "active_sessions": counts.get("active", 0),
            "total_sessions": sum(counts.values()),
        }

    async def _warm_cache(self, limit: int) -> int:
        """What SessionManager.startup warms: the newest active sessions, with history."""
        page = await self.db.execute_fetchall(
            SELECT_PAGE.replace("ORDER BY", "WHERE status = 'active' ORDER BY"), (limit,)
        )
        ids = [row[0] for row in page]
        loaded = 0
        for first in range(0, len(ids), 500):
            chunk = ids[first : first + 500]
            marks = ", ".join("?" for _ in chunk)
            rows = await self.db.execute_fetchall(
                SELECT_MESSAGES.replace("session_id = ?", f"session_id IN ({marks})"), chunk
            )
            loaded += len([message_dict(row) for row in rows])
        return loaded

    def transfer_operations(self) -> tuple[str, ...]:
        return ("export",)

    async def export_json(self, path: Path) -> dict[str, Any]:
        return await export_stream(self._session_batches(), path)

    async def _session_batches(self) -> Any:
        after = ""
        while True:
            sessions = list(
                await self.db.execute_fetchall(
                    SELECT_SESSION.replace("session_id = ?", "session_id > ?")
                    + " ORDER BY session_id LIMIT 500",
                    (after,),
                )
            )
            if not sessions:
                return
            ids = [row[0] for row in sessions]
            marks = ", ".join("?" for _ in ids)
            rows = await self.db.execute_fetchall(
                SELECT_MESSAGES.replace("session_id = ?", f"session_id IN ({marks})").replace(
                    "ORDER BY position", "ORDER BY session_id, position"
                ),
                ids,
            )
            yield sessions, [message_dict(row) for row in rows]
            after = ids[-1]
