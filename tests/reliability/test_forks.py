"""A storage opened, then the process forked: the child is refused, the parent untouched.

Found by attack (persistence/sql/forks.py): on SQLite every call of a child on the
inherited storage waited for good; on PostgreSQL a child that let go of the storage
closed the parent's connection (a Terminate on its socket, the socket out of its epoll
set), and the parent's next save waited for good and was lost. A child forked while a
read held the garbage collector paused never collected again. Each case runs in a
script of its own (forked.py), through os.fork and through libc's fork(), which runs
none of Python's at-fork hooks.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

SCRIPT = Path(__file__).with_name("forked.py")
FORKS = ["os", "libc"]


def _run(*args: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def _check(result: dict[str, Any], backend: str, mode: str) -> None:
    assert result["child_status"] == 0
    child = result["child"]
    if mode == "use":
        for call in ("load", "save", "search"):
            assert child[call].startswith("PersistenceError: "), child
            assert "a fork of it" in child[call] and "open a new storage in this one" in child[call]
        assert child["close"].startswith("ok"), child
        assert child["after close"] == f"PersistenceError: {backend} storage is closed"
    if mode == "iterate":
        resumed = child["resume"]
        assert resumed.startswith("PersistenceError: ") and "a fork of it" in resumed, child
    parent = result["parent"]
    if mode == "iterate":
        # Read to its end in the parent, whatever the child did with it.
        rest, *iterated = parent["iterated"]
        split = iterated.index("of")
        assert rest.startswith("ok") and iterated[:split] == iterated[split + 1 :], parent
    assert parent["save"].startswith("ok") and parent["load"].startswith("ok"), parent
    assert parent["stored"] == ["first words", "second words"]


@pytest.mark.parametrize("fork", FORKS)
@pytest.mark.parametrize("mode", ["use", "drop", "iterate"])
def test_sqlite_storage_in_a_forked_child(tmp_path: Path, mode: str, fork: str) -> None:
    path = tmp_path / "sessions.db"

    _check(_run("sqlite", str(path), mode, fork), "sqlite", mode)

    with sqlite3.connect(path) as connection:
        assert connection.execute("PRAGMA integrity_check").fetchone() == ("ok",)


@pytest.mark.parametrize("fork", FORKS)
@pytest.mark.parametrize("mode", ["use", "drop", "iterate"])
def test_postgresql_storage_in_a_forked_child(postgresql_url: str, mode: str, fork: str) -> None:
    _check(_run("postgresql", postgresql_url, mode, fork), "postgresql", mode)


@pytest.mark.parametrize("fork", FORKS)
def test_a_child_forked_during_a_pause_collects_again(fork: str) -> None:
    result = _run("gc", "-", "pause", fork)

    # A fork made in C runs no hook: the child's first pause sets it right.
    assert result["child"]["enabled at start"] is (fork == "os")
    assert result["child"]["could pause"] is True
    assert result["child"]["enabled after"] is True
    assert result["parent enabled"] is True


@pytest.mark.parametrize("fork", FORKS)
def test_a_storage_whose_open_failed_in_the_parent_opens_in_a_child(
    tmp_path: Path, fork: str
) -> None:
    """Found by review: the failed open left the storage the parent's, so every forked
    worker of a service whose database was down at start-up was refused for good."""
    result = _run("sqlite", str(tmp_path / "sessions.db"), "failed", fork)

    assert result == {"parent": "SchemaVersionError", "child": {"open": "ok"}}
