"""The transfer functions and `export_to_file` refuse bad arguments by name, first.

Found by attack: a path of None or 5 gave a TypeError naming nothing, a NUL in one
the operating system's "embedded null byte", a callback of 5 failed after the first
batch was written, and a storage of None an AttributeError; `export_to_file` of an
unknown session raised on SQLite and returned False on PostgreSQL for the same path.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from persistence import InvalidDataError, SessionManager, SessionStorage
from persistence.transfer import (
    backup_storage,
    export_to_json,
    import_from_json,
    migrate_storage,
    restore_backup,
    validate_backup_file,
    verify_migration,
)
from tests.transfer.data import populate

BAD_PATHS = [None, 5, b"/tmp/export.json", Path("/tmp/a\x00b.json"), ""]


def _calls(storage: SessionStorage, path: object) -> list[tuple[str, Callable[[], Awaitable[Any]]]]:
    return [
        ("output_path", lambda: export_to_json(storage, path)),  # type: ignore[arg-type]
        ("input_path", lambda: import_from_json(storage, path)),  # type: ignore[arg-type]
        ("backup_path", lambda: restore_backup(storage, path)),  # type: ignore[arg-type]
    ]


@pytest.mark.parametrize("path", BAD_PATHS, ids=repr)
async def test_a_path_that_is_none_a_number_bytes_or_holds_a_nul_is_refused_by_name(
    sql_storage: SessionStorage, path: object
) -> None:
    await populate(sql_storage)
    before = await sql_storage.count()
    for name, call in _calls(sql_storage, path):
        with pytest.raises(InvalidDataError, match=name):
            await call()
    with pytest.raises(InvalidDataError, match="backup_path"):
        validate_backup_file(path)  # type: ignore[arg-type]
    if path != "":  # an empty backup directory keeps its MigrationError
        with pytest.raises(InvalidDataError, match="backup_dir"):
            await backup_storage(sql_storage, path)  # type: ignore[arg-type]
    assert await sql_storage.count() == before  # nothing written, nothing lost


@pytest.mark.parametrize("path", BAD_PATHS, ids=repr)
async def test_export_to_file_refuses_a_bad_path_on_every_backend_alike(
    sql_storage: SessionStorage, path: object
) -> None:
    manager = SessionManager(sql_storage)
    session = await manager.create_session("m")
    for session_id in (session.session_id, "no-such-session"):
        with pytest.raises(InvalidDataError, match="output_path"):
            await manager.export_to_file(session_id, path)  # type: ignore[arg-type]


async def test_a_callback_or_storage_of_the_wrong_kind_is_refused_before_anything_is_written(
    sqlite_storage: SessionStorage, tmp_path: Path
) -> None:
    from persistence import SQLiteSessionStorage

    await populate(sqlite_storage)
    destination = SQLiteSessionStorage(tmp_path / "destination.db")
    await destination.initialize()
    try:
        with pytest.raises(InvalidDataError, match="progress_callback"):
            await migrate_storage(sqlite_storage, destination, progress_callback=5)  # type: ignore[arg-type]
        assert (await destination.count()).total_sessions == 0
        with pytest.raises(InvalidDataError, match="progress_callback"):
            await export_to_json(sqlite_storage, tmp_path / "x.json", progress_callback="x")  # type: ignore[arg-type]
        assert not (tmp_path / "x.json").exists()
        with pytest.raises(InvalidDataError, match="source"):
            await migrate_storage(None, destination)  # type: ignore[arg-type]
        with pytest.raises(InvalidDataError, match="destination"):
            await verify_migration(sqlite_storage, None)  # type: ignore[arg-type]
        with pytest.raises(InvalidDataError, match="storage"):
            await export_to_json("sqlite:///x.db", tmp_path / "y.json")  # type: ignore[arg-type]
    finally:
        await destination.close()


async def test_an_async_progress_callback_is_refused_by_name(
    sqlite_storage: SessionStorage, tmp_path: Path
) -> None:
    """Found by attack: called and never awaited, it reported nothing (a RuntimeWarning
    at most)."""

    async def report(done: int, total: int) -> None:
        return None

    class Reporter:
        async def __call__(self, done: int, total: int) -> None:
            return None

    await populate(sqlite_storage)
    for callback in (report, Reporter()):
        with pytest.raises(InvalidDataError, match="progress_callback: an async function"):
            await export_to_json(sqlite_storage, tmp_path / "x.json", progress_callback=callback)
    assert not (tmp_path / "x.json").exists()
