#!/usr/bin/env python3
"""Measures the transfer tools against a raw copy of the same rows: speed and peak memory.

For each store size it builds a SQLite store of N sessions x M messages, then runs
each operation in a fresh child process and reads that process's duration and peak
RSS (resource.getrusage, ru_maxrss), in both directions:

    raw       read the source's rows with the bare driver and write them into the
              destination's tables with the fastest bulk path it has (asyncpg COPY
              into PostgreSQL; one executemany transaction into SQLite); the
              destination schema is the library's, indexes and triggers included
    migrate   migrate_storage(verify=True) into a fresh store, then again (a rerun
              writes nothing and reports everything already present)
    exchange  export_to_json from the source, then import_from_json into a fresh
              store of the other kind
    baseline  the same imports and connections, moving nothing

SQLite -> PostgreSQL reads the built SQLite store; PostgreSQL -> SQLite reads the
PostgreSQL store the migration filled. Ratios are to the raw copy of the same
direction, measured in the same run.

Usage:
    python scripts/measure_transfer.py [--sessions 5000 2000] [--messages 20 25]
        [--batch-size 500] [--postgres-url postgresql://postgres@127.0.0.1:5432/postgres]
        [--json results.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

from sqlalchemy import Table

from persistence import ChatSession, PostgreSQLSessionStorage, SQLiteSessionStorage
from persistence.sql.tables import FileRow, MessageRow, SessionRow
from persistence.sql.types import UtcDateTime
from persistence.transfer import export_to_json, import_from_json, migrate_storage

DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
TABLES = [cast(Table, row.__table__) for row in (SessionRow, MessageRow, FileRow)]
RAW_CHUNK = 10_000
RAW_ROWS_PER_STATEMENT = 500


async def _populate(path: Path, sessions: int, messages: int) -> None:
    async with SQLiteSessionStorage(path, synchronous="NORMAL") as storage:
        for start in range(0, sessions, 500):
            batch = []
            for index in range(start, min(start + 500, sessions)):
                session = ChatSession.create("gemini-2.5-flash", metadata={"n": index})
                for turn in range(messages):
                    session.add_message(
                        "user" if turn % 2 == 0 else "assistant",
                        f"message {turn} of session {index}: " + "lorem ipsum " * 8,
                        {"turn": turn},
                    )
                batch.append(session)
            if hasattr(storage, "insert_sessions"):
                assert await storage.insert_sessions(batch)
            else:  # an older checkout, measured for comparison
                async with storage.unit_of_work() as uow:
                    for session in batch:
                        await uow.sessions.add(session)
                    await uow.commit()
        if hasattr(storage, "index_for_search"):
            # A store as it is once searched: the raw copy then carries every search
            # document, as the library's copy writes them (not the NULLs of pending ones).
            await storage.index_for_search()


async def _admin(url: str, statement: str) -> None:
    import asyncpg

    connection = await asyncpg.connect(url)
    try:
        await connection.execute(statement)
    finally:
        await connection.close()


def _database_url(admin_url: str, name: str) -> str:
    from sqlalchemy import make_url

    return make_url(admin_url).set(database=name).render_as_string(hide_password=False)


# ----------------------------------------------------------------------------- raw copy


def _columns(table: Table) -> list[str]:
    generated = table.autoincrement_column
    return [column.name for column in table.columns if column is not generated]


def _converters(table: Table, to_postgresql: bool) -> list[Callable[[Any], Any] | None]:
    """Per column: SQLite's text timestamps <-> datetimes; JSON stays text both ways."""
    converters: list[Callable[[Any], Any] | None] = []
    for name in _columns(table):
        column_type = table.c[name].type
        if isinstance(column_type, UtcDateTime):
            converters.append(datetime.fromisoformat if to_postgresql else _sqlite_timestamp)
        else:
            converters.append(None)
    return converters


def _sqlite_timestamp(value: datetime) -> str:
    return value.astimezone(UTC).isoformat(" ", "microseconds")


def _converted(
    rows: list[Any], converters: list[Callable[[Any], Any] | None]
) -> list[tuple[Any, ...]]:
    if not any(converters):
        return [tuple(row) for row in rows]
    return [
        tuple(
            value if convert is None else convert(value)
            for value, convert in zip(row, converters, strict=True)
        )
        for row in rows
    ]


def _sqlite_chunks(path: str, table: Table) -> Iterator[list[Any]]:
    db = sqlite3.connect(path)
    try:
        order = "id" if table.autoincrement_column is not None else _columns(table)[0]
        cursor = db.execute(
            f"SELECT {', '.join(_columns(table))} FROM {table.name} ORDER BY {order}"
        )
        while rows := cursor.fetchmany(RAW_CHUNK):
            yield rows
    finally:
        db.close()


async def _text_json(connection: Any) -> None:
    """JSONB as the JSON text SQLite stores (binary form: a version byte, then the text)."""
    await connection.set_type_codec(
        "jsonb",
        encoder=lambda text: b"\x01" + text.encode(),
        decoder=lambda data: data[1:].decode(),
        schema="pg_catalog",
        format="binary",
    )


async def raw_sqlite_to_postgresql(sqlite_path: str, postgres_url: str) -> int:
    import asyncpg

    connection = await asyncpg.connect(postgres_url)
    await _text_json(connection)
    moved = 0
    try:
        async with connection.transaction():
            for table in TABLES:
                converters = _converters(table, to_postgresql=True)
                for rows in _sqlite_chunks(sqlite_path, table):
                    await connection.copy_records_to_table(
                        table.name, records=_converted(rows, converters), columns=_columns(table)
                    )
                    moved += len(rows) if table.name == "chat_messages" else 0
    finally:
        await connection.close()
    return moved


async def raw_postgresql_to_sqlite(postgres_url: str, sqlite_path: str) -> int:
    import asyncpg

    connection = await asyncpg.connect(postgres_url)
    await _text_json(connection)
    db = sqlite3.connect(sqlite_path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    moved = 0
    try:
        db.execute("BEGIN IMMEDIATE")
        async with connection.transaction():
            for table in TABLES:
                names = _columns(table)
                converters = _converters(table, to_postgresql=False)
                order = "id" if table.autoincrement_column is not None else names[0]
                group = f"({', '.join('?' * len(names))})"
                head = f"INSERT INTO {table.name} ({', '.join(names)}) VALUES "
                cursor = await connection.cursor(
                    f"SELECT {', '.join(names)} FROM {table.name} ORDER BY {order}"
                )
                while rows := await cursor.fetch(RAW_CHUNK):
                    converted = _converted(rows, converters)
                    # Multi-row statements: FTS5 flushes its index at every statement's
                    # end, so executemany (a statement per row) is several times slower.
                    for start in range(0, len(converted), RAW_ROWS_PER_STATEMENT):
                        part = converted[start : start + RAW_ROWS_PER_STATEMENT]
                        sql = head + ", ".join([group] * len(part))
                        db.execute(sql, [value for row in part for value in row])
                    moved += len(rows) if table.name == "chat_messages" else 0
        db.execute("COMMIT")
    finally:
        db.close()
        await connection.close()
    return moved


# ----------------------------------------------------------------------------- children


def _open(location: str) -> Any:
    if location.startswith("postgresql://"):
        return PostgreSQLSessionStorage(location, 1, 4)
    return SQLiteSessionStorage(location)


async def _child(operation: str, args: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    source = _open(args["source"])
    destination = _open(args["destination"]) if args.get("destination") else None
    await source.initialize()
    if destination is not None:
        await destination.initialize()
    started = time.perf_counter()
    try:
        if operation == "raw":
            # The schema is the library's (initialize above); only rows move.
            if args["source"].startswith("postgresql://"):
                result["messages"] = await raw_postgresql_to_sqlite(
                    args["source"], args["destination"]
                )
            else:
                result["messages"] = await raw_sqlite_to_postgresql(
                    args["source"], args["destination"]
                )
        elif operation == "migrate":
            result = await migrate_storage(source, destination, True, None, args["batch_size"])
            result.pop("verification", None)
        elif operation == "export":
            result = await export_to_json(source, args["file"], batch_size=args["batch_size"])
        elif operation == "import":
            result = await import_from_json(
                destination, args["file"], batch_size=args["batch_size"]
            )
        else:
            await source.count()
    finally:
        await source.close()
        if destination is not None:
            await destination.close()
    result["wall_seconds"] = round(time.perf_counter() - started, 3)
    # Linux reports ru_maxrss in KiB.
    result["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return result


def _run_child(operation: str, args: dict[str, Any]) -> dict[str, Any]:
    completed = subprocess.run(
        [sys.executable, __file__, "--child", operation, json.dumps(args)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(completed.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


class _Databases:
    """Throwaway PostgreSQL databases, dropped at the end."""

    def __init__(self, admin_url: str) -> None:
        self.admin_url = admin_url
        self.names: list[str] = []

    def new(self) -> str:
        name = f"measure_transfer_{uuid.uuid4().hex[:10]}"
        asyncio.run(_admin(self.admin_url, f'CREATE DATABASE "{name}"'))
        self.names.append(name)
        return _database_url(self.admin_url, name)

    def drop(self) -> None:
        for name in self.names:
            asyncio.run(_admin(self.admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def _direction(
    source: str, fresh: Callable[[], str], directory: Path, batch_size: int
) -> dict[str, Any]:
    """Every operation from `source` into fresh stores made by `fresh`."""
    common = {"source": source, "batch_size": batch_size}
    file = str(directory / f"export-{uuid.uuid4().hex[:6]}.json")
    figures: dict[str, Any] = {"baseline": _run_child("baseline", common)}
    figures["raw"] = _run_child("raw", {**common, "destination": fresh()})
    migrated = fresh()
    figures["migrate"] = _run_child("migrate", {**common, "destination": migrated})
    figures["migrate_again"] = _run_child("migrate", {**common, "destination": migrated})
    figures["export"] = _run_child("export", {**common, "file": file})
    figures["export"]["file_mib"] = round(Path(file).stat().st_size / 2**20, 1)
    figures["import"] = _run_child("import", {**common, "destination": fresh(), "file": file})
    Path(file).unlink()
    figures["migrated_store"] = migrated
    return figures


def _measure(sessions: int, messages: int, batch_size: int, admin_url: str) -> dict[str, Any]:
    databases = _Databases(admin_url)
    with tempfile.TemporaryDirectory(prefix="measure-transfer-") as scratch:
        directory = Path(scratch)
        sqlite = directory / "source.db"
        asyncio.run(_populate(sqlite, sessions, messages))
        files = iter(range(1_000_000))
        try:
            to_postgresql = _direction(str(sqlite), databases.new, directory, batch_size)
            to_sqlite = _direction(
                to_postgresql.pop("migrated_store"),
                lambda: str(directory / f"fresh-{next(files)}.db"),
                directory,
                batch_size,
            )
            to_sqlite.pop("migrated_store")
        finally:
            databases.drop()
    return {"sqlite -> postgresql": to_postgresql, "postgresql -> sqlite": to_sqlite}


def _report(sessions: int, messages: int, figures: dict[str, Any]) -> dict[str, Any]:
    total = sessions * messages
    summary: dict[str, Any] = {}
    print(f"\n{sessions} sessions x {messages} messages ({total} messages)")
    for direction, figure in figures.items():
        raw = total / figure["raw"]["wall_seconds"]
        migrate = figure["migrate"]
        again = figure["migrate_again"]
        exchange_s = figure["export"]["wall_seconds"] + figure["import"]["wall_seconds"]
        line = {
            "raw_msgs_per_s": round(raw),
            "migrate_msgs_per_s": round(total / migrate["wall_seconds"]),
            "migrate_write_msgs_per_s": round(total / migrate["write_seconds"]),
            "migrate_vs_raw": round(migrate["wall_seconds"] / figure["raw"]["wall_seconds"], 2),
            "exchange_msgs_per_s": round(total / exchange_s),
            "exchange_vs_raw": round(exchange_s / figure["raw"]["wall_seconds"], 2),
            "verified": migrate["verified"],
            "rerun_sessions_migrated": again["sessions_migrated"],
            "rerun_sessions_already_present": again.get("sessions_already_present"),
            "peak_rss_mib": {
                name: figure[name]["peak_rss_mib"]
                for name in ("baseline", "raw", "migrate", "export", "import")
            },
        }
        summary[direction] = line
        print(
            f"  {direction}: raw copy {line['raw_msgs_per_s']} msgs/s"
            f" ({figure['raw']['wall_seconds']} s);"
            f" migrate+verify {line['migrate_msgs_per_s']} msgs/s"
            f" ({migrate['wall_seconds']} s, {migrate['write_seconds']} s writing),"
            f" {line['migrate_vs_raw']}x raw, verified={migrate['verified']};"
            f" export+import {line['exchange_msgs_per_s']} msgs/s"
            f" ({figure['export']['wall_seconds']} + {figure['import']['wall_seconds']} s),"
            f" {line['exchange_vs_raw']}x raw"
        )
        print(
            f"    rerun: {again['sessions_migrated']} sessions migrated,"
            f" {again.get('sessions_already_present')} already present"
            f" ({again['wall_seconds']} s);"
            f" peak RSS MiB {line['peak_rss_mib']}"
        )
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, nargs="+", default=[5000, 2000])
    parser.add_argument(
        "--messages",
        type=int,
        nargs="+",
        default=[20, 25],
        help="one per --sessions, or one for all",
    )
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--postgres-url", default=DEFAULT_POSTGRES_URL)
    parser.add_argument("--json", type=Path, help="also write every figure to this file")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.child:
        operation, raw = options.child
        print(json.dumps(asyncio.run(_child(operation, json.loads(raw))), default=str))
        return
    messages = (
        options.messages * len(options.sessions) if len(options.messages) == 1 else options.messages
    )
    runs = []
    for sessions, per_session in zip(options.sessions, messages, strict=True):
        figures = _measure(sessions, per_session, options.batch_size, options.postgres_url)
        runs.append(
            {
                "sessions": sessions,
                "messages_per_session": per_session,
                "load_average": os.getloadavg(),
                "summary": _report(sessions, per_session, figures),
                "figures": figures,
            }
        )
    if options.json:
        options.json.write_text(json.dumps(runs, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
