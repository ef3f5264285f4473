"""verify_migration between a PostgreSQL cluster and a physical copy of it, running apart.

A physical copy (pg_basebackup and promote, a disk snapshot, a cloned machine) keeps the
cluster's system identifier and the database's oid, so a storage's token: found by
attack, verify_migration refused the two as one store, where moving a service to such
a copy is what verification is for. It only reads, so it compares them; migrate, which
writes by the token, still refuses them.

Runs two throwaway clusters of its own (initdb as the `postgres` user, so as root).
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from persistence import ChatSession, InvalidDataError, PostgreSQLSessionStorage
from persistence.transfer import migrate_storage, verify_migration

BINARIES = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
pytestmark = pytest.mark.skipif(
    not BINARIES or os.geteuid() != 0 or shutil.which("su") is None,
    reason="needs root and PostgreSQL's initdb, to run two clusters of its own",
)


def _as_postgres(command: str) -> None:
    subprocess.run(["su", "postgres", "-c", command], check=True, capture_output=True)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Cluster:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = _free_port()
        self.bin = Path(BINARIES[-1]).parent

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/store"

    def start(self) -> None:
        options = f"-p {self.port} -k {self.directory.parent} -c listen_addresses=127.0.0.1"
        _as_postgres(
            f"{self.bin}/pg_ctl -D {self.directory} -l {self.directory}.log -w"
            f" -o '{options} -c shared_buffers=16MB -c max_connections=20' start"
        )

    def stop(self) -> None:
        subprocess.run(
            ["su", "postgres", "-c", f"{self.bin}/pg_ctl -D {self.directory} -w -m fast stop"],
            capture_output=True,
            check=False,
        )


@pytest.fixture
def copies() -> Iterator[tuple[Cluster, Cluster]]:
    # Not under pytest's temporary directory: its parents are private to root.
    root = Path(tempfile.mkdtemp(prefix="persistence-clusters-"))
    root.chmod(0o777)
    original, copy = Cluster(root / "original"), Cluster(root / "copy")
    try:
        _as_postgres(f"{original.bin}/initdb -A trust -U postgres -D {original.directory}")
        original.start()
        _as_postgres(f"{original.bin}/createdb -h 127.0.0.1 -p {original.port} store")
        # A store before the copy: the copy keeps its id (revision 0015), as it keeps the
        # cluster's identifier.
        subprocess.run(
            [sys.executable, "-m", "persistence", "--url", original.url, "upgrade"],
            check=True,
            capture_output=True,
        )
        original.stop()
        shutil.copytree(original.directory, copy.directory, symlinks=True)
        subprocess.run(["chown", "-R", "postgres", str(copy.directory)], check=True)
        original.start()
        copy.start()
        yield original, copy
    finally:
        original.stop()
        copy.stop()
        shutil.rmtree(root, ignore_errors=True)


async def test_a_physical_copy_running_apart_is_compared_not_refused(
    copies: tuple[Cluster, Cluster],
) -> None:
    original, copy = copies
    async with PostgreSQLSessionStorage(copy.url, 1, 2) as writer:
        await writer.save_session(ChatSession.create("m", session_id="only-in-the-copy"))
    async with (
        PostgreSQLSessionStorage(original.url, 1, 2) as first,
        PostgreSQLSessionStorage(copy.url, 1, 2) as second,
    ):
        assert first.token == second.token  # what a physical copy keeps

        report = await verify_migration(first, second)

        assert (report["ok"], report["extra_sessions"]) == (False, 1)
        assert (await verify_migration(first, second, additive=True))["ok"] is True
        # Writes go by the token: migrate still refuses them as one store.
        with pytest.raises(InvalidDataError, match="same store"):
            await migrate_storage(first, second)
