"""A migration or an export reads its source by the models' rules: a row written outside
persistence that they refuse stops it by name before its batch is written anywhere."""

from __future__ import annotations

import asyncio
import os
import re
import sqlite3
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from persistence import InvalidDataError, PostgreSQLSessionStorage, SessionStorage
from persistence.sql.engines import async_driver_url
from persistence.transfer import export_to_json, migrate_storage
from tests.transfer.data import populate

_LAST_MESSAGE = "WHERE id = (SELECT max(id) FROM chat_messages)"

# Edits of a SQLite source and what the refusal names. Found by attack: migrate wrote
# -0.0 into PostgreSQL as 0.0 and 1e300 as an integer of 301 digits (then reported
# verified=False), copied the rest as they were, stopped at NaN with the server's "invalid
# input syntax for type json"; an export wrote files its own import refuses.
Edit = tuple[str, str]
SQLITE_EDITS: list[Edit] = [
    ("UPDATE chat_sessions SET metadata = '{\"k\": -0.0}'", "metadata.k: -0.0 would come back"),
    ("UPDATE chat_sessions SET metadata = '{\"k\": 1e300}'", "as an integer"),
    (
        f"UPDATE chat_messages SET metadata = '{{\"k\": 99999999999999999999999}}' {_LAST_MESSAGE}",
        "metadata.k: integer 99999999999999999999999 does not fit in 64 bits",
    ),
    (
        f"UPDATE chat_messages SET metadata = '{{\"z\": NaN}}' {_LAST_MESSAGE}",
        "metadata.z: nan is not a JSON number",
    ),
    ("UPDATE chat_sessions SET model = printf('%.300c', 'm')", "model: must be 1 to 255"),
    (
        f"UPDATE chat_messages SET created_at = '2024-05-01 12:00:00.123456+00:00' {_LAST_MESSAGE}",
        "created_at: the timestamp 2024-05-01T12:00:00.123456+00:00 has a part below the",
    ),
    (
        f"UPDATE chat_messages SET created_at = '2024-05-01 12:00:00.123' {_LAST_MESSAGE}",
        "created_at: the timestamp 2024-05-01T12:00:00.123000 has no UTC offset",
    ),
    (
        f"UPDATE chat_messages SET content = 'a' || char(0) || 'b' {_LAST_MESSAGE}",
        "content: NUL characters cannot be stored",
    ),
    ("UPDATE uploaded_files SET metadata = '{\"$k\": 1}'", "starts with '$'"),
    # Found by attack AA: a message deleted by hand was exported into a file import
    # refuses, and migrate blamed a partial load; BLOBs in text columns raised a bare
    # TypeError, or were copied as they were.
    (f"DELETE FROM chat_messages {_LAST_MESSAGE}", "message_count: the session row says"),
    ("UPDATE chat_sessions SET model = X'41'", "model: bytes is not text"),
    (f"UPDATE chat_messages SET message_id = X'41' {_LAST_MESSAGE}", "message_id: bytes is not"),
    ("UPDATE uploaded_files SET gemini_file_name = X'41'", "gemini_file_name: bytes is not"),
]


@pytest.mark.parametrize("case", SQLITE_EDITS, ids=[named for _, named in SQLITE_EDITS])
async def test_a_source_row_the_models_refuse_stops_a_migration_and_an_export_by_name(
    other_sqlite: SessionStorage, sql_storage: SessionStorage, tmp_path: Path, case: Edit
) -> None:
    edit, named = case
    await populate(other_sqlite)
    with sqlite3.connect(other_sqlite.database_path) as db:  # type: ignore[attr-defined]
        db.executescript(edit)
    db.close()

    with pytest.raises(InvalidDataError, match=re.escape(named)) as refused:
        await migrate_storage(other_sqlite, sql_storage)
    assert "it was written outside persistence" in str(refused.value)
    counts = await sql_storage.count()
    # Sessions go first: a file record's refusal comes after they were copied.
    copied = 0 if "uploaded_files" in edit else counts.total_sessions
    assert (copied, counts.files) == (0, 0)

    exported = tmp_path / "export.json"
    with pytest.raises(InvalidDataError, match=re.escape(named)):
        await export_to_json(other_sqlite, exported)
    assert [
        name for name in await asyncio.to_thread(os.listdir, tmp_path) if "export" in name
    ] == []


@pytest.mark.postgresql
async def test_a_postgresql_source_row_the_models_refuse_stops_a_migration_by_name(
    postgresql_storage: PostgreSQLSessionStorage,
    postgresql_url: str,
    other_sqlite: SessionStorage,
) -> None:
    await populate(postgresql_storage)
    engine = create_async_engine(async_driver_url(postgresql_url))
    try:
        for edit, named in (
            (
                f"UPDATE chat_messages SET metadata = '{{\"n\": 1e30}}' {_LAST_MESSAGE}",
                "metadata.n: integer 1000000000000000000000000000000 does not fit in 64 bits",
            ),
            ("UPDATE chat_sessions SET metadata = '{\"$set\": 1}'", "starts with '$'"),
        ):
            async with engine.begin() as connection:
                await connection.execute(text(edit))
            with pytest.raises(InvalidDataError, match=re.escape(named)):
                await migrate_storage(postgresql_storage, other_sqlite)
            assert (await other_sqlite.count()).total_sessions == 0
    finally:
        await engine.dispose()
