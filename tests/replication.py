"""A real PostgreSQL primary and hot standby of the tests' own, in a temporary directory.

The shared server on 5432 allows no replication connections, so the tests build a
pair: `initdb`, `pg_basebackup -R -c fast`, both started on free ports through the
`postgres` OS user when run as root (`pg_config --bindir` names the binaries, which
Debian keeps off PATH). Everything is stopped and removed afterwards, also when a
test fails or a server is left frozen.
"""

from __future__ import annotations

import asyncio
import atexit
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from persistence.sql.replicas import PRIMARY_POSITION_SQL

DATABASE = "persistence_test"
# Time any one server command may take before the pair is declared broken.
_COMMAND_TIMEOUT = 60


class ReplicationUnavailable(RuntimeError):
    """The pair cannot be built on this machine (the reason says why)."""


def _bindir() -> Path:
    named = os.environ.get("PERSISTENCE_TEST_PG_BINDIR")
    if named:
        return Path(named)
    try:
        found = subprocess.run(
            ["pg_config", "--bindir"], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        raise ReplicationUnavailable(
            f"pg_config not found ({exc}); set PERSISTENCE_TEST_PG_BINDIR"
        ) from exc
    return Path(found)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (a postmaster's backends and workers)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with suppress(OSError):
            stat = (entry / "stat").read_text()
            # The command name, in parentheses, may hold spaces: split after it.
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


@dataclass
class Server:
    """One PostgreSQL server of the pair."""

    name: str
    data: Path
    port: int
    log: Path
    frozen: list[int] = field(default_factory=list)

    def url(self, database: str = DATABASE) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def postmaster_pid(self) -> int | None:
        with suppress(OSError, ValueError, IndexError):
            return int((self.data / "postmaster.pid").read_text().splitlines()[0])
        return None


class ReplicationPair:
    """A primary and a streaming hot standby; built by `replication_pair()`."""

    def __init__(self, root: Path, bindir: Path) -> None:
        self.root = root
        self.bindir = bindir
        self.as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        self.primary = Server("primary", root / "primary", _free_port(), root / "primary.log")
        self.standby = Server("standby", root / "standby", _free_port(), root / "standby.log")

    def _run(self, program: str, *args: str) -> None:
        command = [*self.as_postgres, str(self.bindir / program), *args]
        try:
            subprocess.run(
                command, capture_output=True, text=True, check=True, timeout=_COMMAND_TIMEOUT
            )
        except subprocess.CalledProcessError as exc:
            raise ReplicationUnavailable(
                f"{program} failed ({exc.returncode}): {(exc.stderr or exc.stdout).strip()[-500:]}"
            ) from exc
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ReplicationUnavailable(f"{program} could not run: {exc}") from exc

    def _configure(self, server: Server) -> None:
        settings = {
            "port": str(server.port),
            "listen_addresses": "'127.0.0.1'",
            "unix_socket_directories": f"'{self.root}'",
            "fsync": "off",
            "full_page_writes": "off",
            # Nothing but the tests touches the pair: its counters count only them.
            "autovacuum": "off",
            "shared_buffers": "16MB",
            "max_connections": "60",
            "hot_standby": "on",
        }
        with (server.data / "postgresql.auto.conf").open("a", encoding="utf-8") as conf:
            for name, value in settings.items():
                conf.write(f"{name} = {value}\n")

    def build(self) -> None:
        """initdb, start the primary, clone it with pg_basebackup, start the standby."""
        self._run(
            "initdb",
            "-D",
            str(self.primary.data),
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-sync",
            "--no-instructions",
        )
        self._configure(self.primary)
        self.start(self.primary)
        self._run(
            "pg_basebackup",
            "-h",
            "127.0.0.1",
            "-p",
            str(self.primary.port),
            "-U",
            "postgres",
            "-D",
            str(self.standby.data),
            "-R",
            "-c",
            "fast",
            "-X",
            "stream",
        )
        self._configure(self.standby)
        self.start(self.standby)

    def start(self, server: Server) -> None:
        self._run("pg_ctl", "-D", str(server.data), "-l", str(server.log), "-w", "start")

    def stop(self, server: Server, mode: str = "fast") -> None:
        self.thaw(server)
        if server.postmaster_pid() is not None:
            self._run("pg_ctl", "-D", str(server.data), "-m", mode, "-w", "stop")

    def freeze(self, server: Server) -> None:
        """SIGSTOP to the postmaster and every child: connections and queries hang."""
        pid = server.postmaster_pid()
        assert pid is not None, f"{server.name} is not running"
        for process in [pid, *_children(pid)]:
            with suppress(ProcessLookupError):
                os.kill(process, signal.SIGSTOP)
                server.frozen.append(process)

    def thaw(self, server: Server) -> None:
        frozen, server.frozen = server.frozen, []
        for process in frozen:
            with suppress(ProcessLookupError):
                os.kill(process, signal.SIGCONT)

    def destroy(self) -> None:
        """Stops both servers (killing them if they will not stop) and removes the files."""
        for server in (self.standby, self.primary):
            self.thaw(server)
            pid = server.postmaster_pid()
            if pid is None:
                continue
            with suppress(ReplicationUnavailable):
                self._run("pg_ctl", "-D", str(server.data), "-m", "immediate", "-w", "stop")
            if server.postmaster_pid() is not None:
                for process in [pid, *_children(pid)]:
                    with suppress(ProcessLookupError):
                        os.kill(process, signal.SIGKILL)
        shutil.rmtree(self.root, ignore_errors=True)


@contextmanager
def replication_pair() -> Iterator[ReplicationPair]:
    """A running primary and standby with a database `persistence_test`.

    Raises:
        ReplicationUnavailable: the pair cannot be built here (the reason says why).
    """
    bindir = _bindir()
    if not (bindir / "initdb").exists():
        raise ReplicationUnavailable(f"no initdb in {bindir}")
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        raise ReplicationUnavailable("running as root without runuser to become postgres")
    root = Path(tempfile.mkdtemp(prefix="persistence-replication-"))
    pair = ReplicationPair(root, bindir)
    atexit.register(pair.destroy)
    # A run stopped by SIGTERM (a CI timeout) unwinds through `finally` too.
    stopping = signal.getsignal(signal.SIGTERM)
    if stopping == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        if pair.as_postgres:
            shutil.chown(root, user="postgres")
        pair.build()
        asyncio.run(_execute(pair.primary.url("postgres"), f'CREATE DATABASE "{DATABASE}"'))
        asyncio.run(wait_caught_up(pair))
        yield pair
    finally:
        pair.destroy()
        atexit.unregister(pair.destroy)
        if stopping == signal.SIG_DFL:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


async def _connect(url: str) -> Any:
    import asyncpg

    return await asyncpg.connect(url, timeout=10)


async def _execute(url: str, statement: str) -> None:
    connection = await _connect(url)
    try:
        await connection.execute(statement)
    finally:
        await connection.close()


async def fetchval(url: str, query: str) -> Any:
    connection = await _connect(url)
    try:
        return await connection.fetchval(query)
    finally:
        await connection.close()


async def wait_caught_up(pair: ReplicationPair, within: float = 20.0) -> None:
    """Waits until the standby has replayed everything the primary has written (to
    where a standby's replay stops when the WAL ends on a page boundary)."""
    target = await fetchval(pair.primary.url("postgres"), PRIMARY_POSITION_SQL)
    deadline = time.monotonic() + within
    while True:
        caught_up = await fetchval(
            pair.standby.url("postgres"),
            f"SELECT (pg_last_wal_replay_lsn() - '0/0'::pg_lsn)::bigint >= {target}",
        )
        if caught_up:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"the standby did not replay up to {target} in {within} s")
        await asyncio.sleep(0.02)


async def pause_replay(pair: ReplicationPair) -> None:
    await _execute(pair.standby.url("postgres"), "SELECT pg_wal_replay_pause()")


async def resume_replay(pair: ReplicationPair) -> None:
    await _execute(pair.standby.url("postgres"), "SELECT pg_wal_replay_resume()")


@asynccontextmanager
async def replay_paused(pair: ReplicationPair) -> AsyncIterator[None]:
    await pause_replay(pair)
    try:
        yield
    finally:
        await resume_replay(pair)


async def commits(server: Server) -> int:
    """Transactions committed in the test database, as the server's statistics count them.

    Read through the `postgres` database, so that reading does not count itself.
    """
    connection = await _connect(server.url("postgres"))
    try:
        value = await connection.fetchval(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = $1", DATABASE
        )
    finally:
        await connection.close()
    return int(value or 0)


async def commits_settled(server: Server, at_least: int = 0, within: float = 15.0) -> int:
    """The commit count once the server's statistics show everything done so far.

    Backends publish their counters when idle, at most about once a second: poll
    until the count reaches `at_least` and then stays put for a moment.
    """
    deadline = time.monotonic() + within
    last = await commits(server)
    stable_since = time.monotonic()
    while time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        now = await commits(server)
        if now != last:
            last, stable_since = now, time.monotonic()
        elif now >= at_least and time.monotonic() - stable_since >= 1.5:
            return now
    return last
