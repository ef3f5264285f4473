"""Helpers shared by the reliability tests: child processes, a TCP proxy, store checks."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import text

import persistence
from persistence import PostgreSQLSessionStorage, SessionStorage, SQLiteSessionStorage

CHILD = Path(__file__).with_name("child.py")
# The tree whose `persistence` the test imports: the child must load the same one.
SOURCE_ROOT = str(Path(persistence.__file__).resolve().parent.parent)


def child_command(mode: str, *args: object) -> list[str]:
    return [sys.executable, str(CHILD), mode, *(str(arg) for arg in args)]


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [SOURCE_ROOT, *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    )
    return env


def start_child(mode: str, *args: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        child_command(mode, *args),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=child_env(),
    )


def wait_ready(process: subprocess.Popen[str]) -> None:
    """Blocks until the child printed `ready` (it has opened its storage)."""
    assert process.stdout is not None
    line = process.stdout.readline()
    if line.strip() != "ready":
        _, err = process.communicate(timeout=30)
        raise AssertionError(f"child did not start: {line!r} {err}")


def read_acks(path: Path) -> list[dict[str, Any]]:
    """Returns the acknowledgements a child fsynced.

    A line torn by a kill was never acknowledged (the child had not finished writing
    it); the next child ends it with a newline, so it never merges with a whole one.
    """
    if not path.exists():
        return []
    acks = []
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        if not line.endswith("\n"):
            continue
        try:
            acks.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return acks


@dataclass
class StoreState:
    """What a store holds: per session, message ids in stored order, and problems found."""

    messages: dict[str, list[str]] = field(default_factory=dict)
    contents: dict[str, list[str]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return sum(len(ids) for ids in self.messages.values())

    def missing(self, acks: list[dict[str, Any]]) -> list[tuple[str, str]]:
        """Acknowledged (session, message) pairs the store does not hold."""
        held = {sid: set(ids) for sid, ids in self.messages.items()}
        return [
            (ack["s"], message_id)
            for ack in acks
            for message_id in ack["m"]
            if message_id not in held.get(ack["s"], set())
        ]


def _check_rows(
    state: StoreState,
    counts: dict[str, int],
    rows: list[tuple[str, int, int, str, str]],
) -> StoreState:
    """Rows are (session_id, id, position, message_id, content) ordered by session, position."""
    last_id: dict[str, int] = {}
    for session_id, row_id, position, message_id, content in rows:
        ids = state.messages.setdefault(session_id, [])
        state.contents.setdefault(session_id, []).append(content)
        if position != len(ids):
            state.problems.append(f"{session_id}: position {position} where {len(ids)} expected")
        # Writers of one session are serialised, so ids are assigned in commit order.
        if session_id in last_id and row_id <= last_id[session_id]:
            state.problems.append(f"{session_id}: position order differs from commit order")
        last_id[session_id] = row_id
        ids.append(message_id)
    for session_id, count in counts.items():
        stored = len(state.messages.get(session_id, []))
        if count != stored:
            state.problems.append(f"{session_id}: message_count {count} but {stored} rows")
        state.messages.setdefault(session_id, [])
    orphans = set(state.messages) - set(counts)
    if orphans:
        state.problems.append(f"messages without a session: {sorted(orphans)[:5]}")
    return state


_COUNTS = "SELECT session_id, message_count FROM chat_sessions"
_ROWS = (
    "SELECT session_id, id, position, message_id, content FROM chat_messages"
    " ORDER BY session_id, position"
)


def sqlite_state(path: Path) -> StoreState:
    """Checks a SQLite file through a fresh connection: integrity, counts, order."""
    connection = sqlite3.connect(path, timeout=30)
    try:
        state = StoreState()
        integrity = [row[0] for row in connection.execute("PRAGMA integrity_check")]
        if integrity != ["ok"]:
            state.problems.append(f"integrity_check: {integrity[:5]}")
        fts = connection.execute(
            "INSERT INTO chat_messages_fts(chat_messages_fts, rank) VALUES ('integrity-check', 1)"
        )
        fts.close()
        counts = dict(connection.execute(_COUNTS).fetchall())
        return _check_rows(state, counts, connection.execute(_ROWS).fetchall())
    finally:
        connection.close()


async def postgresql_state(url: str) -> StoreState:
    """Checks a PostgreSQL database through a fresh connection: counts, order."""
    import asyncpg

    from tests.servers import plain_postgresql_url

    connection = await asyncpg.connect(plain_postgresql_url(url), timeout=10)
    try:
        counts = {row[0]: row[1] for row in await connection.fetch(_COUNTS)}
        rows = [tuple(row) for row in await connection.fetch(_ROWS)]
        return _check_rows(StoreState(), counts, rows)  # type: ignore[arg-type]
    finally:
        await connection.close()


class TcpProxy:
    """A TCP relay on 127.0.0.1 that a test can cut (drop every link, refuse new ones).

    `lose_next_commit_ack()` makes it deliver the next COMMIT to the server, then drop
    the link before the server's answer reaches the client: a commit that landed but
    whose acknowledgement was lost. `lose_next_answer()` does the same to whatever the
    client sends next (a single-statement write, which needs no COMMIT).
    `sever_quietly()` ends every link's server side and tells the clients nothing.
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self._server: asyncio.Server | None = None
        self._links: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._lose_commit_ack = False
        self._lose_answer = False
        self.connections = 0
        # Client side -> server side of each link, and the clients of links severed.
        self._upstream: dict[asyncio.StreamWriter, asyncio.StreamWriter] = {}
        self._severed: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    def lose_next_commit_ack(self) -> None:
        self._lose_commit_ack = True

    def lose_next_answer(self) -> None:
        self._lose_answer = True

    def sever_quietly(self) -> None:
        """Ends the server side of every open link, and says nothing to the clients:
        each learns it only when it next sends (the link is reset, nothing forwarded),
        as a client of a server host that went away and came back does."""
        for client, upstream in self._upstream.items():
            self._severed.add(client)
            upstream.transport.abort()

    async def stop_listening(self) -> None:
        """Refuses new connections, leaving the open links as they are."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def cut(self) -> None:
        """Stops listening and resets every open link, as a network failure would."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for writer in list(self._links):
            writer.transport.abort()
        self._links.clear()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def restore(self) -> None:
        await self.start()

    async def close(self) -> None:
        await self.cut()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._links.update((writer, up_writer))
        self._upstream[writer] = up_writer
        for source, sink, client in ((reader, up_writer, writer), (up_reader, writer, None)):
            task = asyncio.ensure_future(self._pipe(source, sink, client))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(
        self,
        source: asyncio.StreamReader,
        sink: asyncio.StreamWriter,
        client: asyncio.StreamWriter | None,
    ) -> None:
        try:
            while data := await source.read(65536):
                if client is not None and client in self._severed:
                    client.transport.abort()
                    return
                sink.write(data)
                await sink.drain()
                if client is not None and (
                    self._lose_answer or (self._lose_commit_ack and b"COMMIT" in data)
                ):
                    self._lose_commit_ack = self._lose_answer = False
                    # The client loses the link now; the server reads the COMMIT, then EOF.
                    client.transport.abort()
                    sink.close()
                    return
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            if sink not in self._severed:
                # A severed link's client hears nothing until it sends.
                self._links.discard(sink)
                sink.transport.abort()


async def through_proxy(
    make_postgresql: Callable[..., Awaitable[Any]], postgresql_url: str, **options: Any
) -> tuple[Any, TcpProxy]:
    """A PostgreSQL storage (`make_postgresql(url, **options)`) reaching the server of
    `postgresql_url` through a TcpProxy of its own, started."""
    from sqlalchemy import make_url

    target = make_url(postgresql_url)
    proxy = TcpProxy(target.host or "127.0.0.1", target.port or 5432)
    await proxy.start()
    url = target.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    return await make_postgresql(url, **options), proxy


@contextlib.contextmanager
def killed_on_exit(process: subprocess.Popen[str]) -> Iterator[subprocess.Popen[str]]:
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=30)


class Probe:
    """Looks at one session through its own connection, as another client would."""

    def __init__(self, sqlite_path: Path | None = None, postgresql_url: str | None = None):
        self._sqlite = sqlite3.connect(sqlite_path, timeout=0) if sqlite_path else None
        self._url = postgresql_url
        self._pg: Any = None

    @classmethod
    async def open(cls, storage: Any) -> Probe:
        if storage.backend_name == "sqlite":
            return cls(sqlite_path=storage.database_path)
        import asyncpg

        from tests.servers import plain_postgresql_url

        probe = cls(postgresql_url=storage.url.render_as_string(hide_password=False))
        probe._pg = await asyncpg.connect(plain_postgresql_url(probe._url or ""), timeout=10)
        return probe

    async def close(self) -> None:
        if self._sqlite is not None:
            self._sqlite.close()
        if self._pg is not None:
            await self._pg.close()

    async def _fetch(self, query: str, *args: Any) -> list[tuple[Any, ...]]:
        if self._sqlite is not None:
            query = query.replace("$1", "?")
            return [tuple(row) for row in self._sqlite.execute(query, args)]
        return [tuple(row) for row in await self._pg.fetch(query, *args)]

    @contextlib.asynccontextmanager
    async def _snapshot(self) -> AsyncIterator[None]:
        """One read transaction around the reads inside: a save still landing (a
        cancelled SQLite save runs on in the connection's thread) is seen whole or not
        at all, never between two of them."""
        if self._sqlite is not None:
            self._sqlite.execute("BEGIN")
            try:
                yield
            finally:
                self._sqlite.execute("COMMIT")
            return
        async with self._pg.transaction(isolation="repeatable_read", readonly=True):
            yield

    async def session(self, session_id: str) -> tuple[int | None, list[str]]:
        """Returns (message_count or None if absent, message ids in position order),
        read in one snapshot."""
        async with self._snapshot():
            count = await self._fetch(
                "SELECT message_count FROM chat_sessions WHERE session_id = $1", session_id
            )
            rows = await self._fetch(
                "SELECT message_id, position FROM chat_messages WHERE session_id = $1"
                " ORDER BY position",
                session_id,
            )
        assert [row[1] for row in rows] == list(range(len(rows))), rows
        return (count[0][0] if count else None), [row[0] for row in rows]

    async def file_exists(self, file_id: str) -> bool:
        rows = await self._fetch("SELECT 1 FROM uploaded_files WHERE file_id = $1", file_id)
        return bool(rows)

    async def nothing_holds_a_transaction(self) -> bool:
        """True when no other connection of the storage holds a transaction open."""
        if self._sqlite is not None:
            try:
                self._sqlite.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError:
                return False
            self._sqlite.execute("ROLLBACK")
            return True
        rows = await self._pg.fetch(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND pid <> pg_backend_pid() AND state LIKE 'idle in transaction%'"
        )
        return bool(rows[0][0] == 0)


class Backends:
    """SQLite and PostgreSQL storages on one event loop that a sync hypothesis test drives."""

    def __init__(self, sqlite_path: Path, postgresql_url: str) -> None:
        self.runner = asyncio.Runner()
        self.storages: list[SessionStorage] = [
            SQLiteSessionStorage(sqlite_path, synchronous="NORMAL"),
            PostgreSQLSessionStorage(postgresql_url, min_pool_size=1, max_pool_size=2),
        ]
        self.run(self._open())

    async def _open(self) -> None:
        for storage in self.storages:
            await storage.initialize()
        postgresql = self.storages[1]
        assert isinstance(postgresql, PostgreSQLSessionStorage)
        async with postgresql.engine.begin() as connection:
            await connection.execute(
                text("TRUNCATE chat_messages, chat_sessions, uploaded_files CASCADE")
            )

    def run(self, coroutine: Any) -> Any:
        return self.runner.run(coroutine)

    def close(self) -> None:
        async def close_all() -> None:
            for storage in self.storages:
                await storage.close()

        self.run(close_all())
        self.runner.close()


async def state_of(storage: Any) -> StoreState:
    """The whole store as another client sees it (SQLite file or PostgreSQL database)."""
    if storage.backend_name == "sqlite":
        return sqlite_state(storage.database_path)
    return await postgresql_state(storage.url.render_as_string(hide_password=False))
