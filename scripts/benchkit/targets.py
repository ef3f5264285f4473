"""Builds a target by kind and backend, and reports why one cannot run here."""

from __future__ import annotations

import importlib.util

from benchkit.target import Target

KINDS = ("raw", "persistence")


def unavailable_reason(kind: str, backend: str) -> str | None:
    """None when the target can run in this interpreter, else a one-line reason."""
    if kind == "raw" and backend == "mongodb":
        return "no raw MongoDB baseline (pymongo by hand is not written yet)"
    needed = {
        ("raw", "sqlite"): "aiosqlite",
        ("raw", "postgresql"): "asyncpg",
        ("persistence", "sqlite"): "persistence",
        ("persistence", "postgresql"): "persistence",
        ("persistence", "mongodb"): "persistence",
    }[(kind, backend)]
    if importlib.util.find_spec(needed) is None:
        return f"module {needed} is not installed"
    if (kind, backend) == ("persistence", "mongodb"):
        try:
            found = importlib.util.find_spec("persistence.mongo.backend")
        except ModuleNotFoundError:
            found = None
        if found is None:
            return "module persistence.mongo.backend is missing on this branch"
    return None


def make_target(kind: str, backend: str, urls: dict[str, str]) -> Target:
    if kind == "persistence":
        from benchkit.library import Library

        return Library(backend, urls)
    if backend == "sqlite":
        from benchkit.raw_sqlite import RawSQLite

        return RawSQLite()
    from benchkit.raw_postgresql import RawPostgreSQL

    return RawPostgreSQL()
