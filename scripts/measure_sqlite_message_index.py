#!/usr/bin/env python3
"""What each part of the SQLite messages table costs a bulk insert, by the bare driver.

The peer harness's W4 saves 20 x 1,000 messages into one session. This builds the
library's schema (`persistence upgrade` into a scratch file), then variants of it,
and inserts the same rows into each with the bare `sqlite3` driver as the library
sends them (two 500-row INSERTs and the session's UPDATE per transaction; WAL,
synchronous=FULL, foreign keys on), alternating the variants round by round:

    as_is        the schema as it is
    no_unique    without the UNIQUE index of message_id (a uuid4 hex: each insert
                 lands in a random page of it, and each commit writes those pages)
    blob_unique  message_id as its 16 bytes, UNIQUE
    no_pending   without the pending-documents index and the FTS5 triggers

Prints the medians (ms per 1,000 messages: statements, commit) as a table, and as
JSON with --json. It measures the schema, not the library: no Python model is built.

    python scripts/measure_sqlite_message_index.py [--rounds 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

VARIANTS = ("as_is", "no_unique", "blob_unique", "no_pending")
COLUMNS = "message_id, session_id, position, role, content, created_at, metadata, search_text"
CONTENT = "lorem ipsum dolor sit amet " * 11  # 297 characters, as the harness's 300 bytes
UNIQUE_CLAUSE = ", \n\tCONSTRAINT uq_chat_messages_message_id UNIQUE (message_id)"


def library_schema(directory: Path) -> list[str]:
    """The CREATE statements of a store at head, made by the library's own upgrade."""
    store = directory / "schema.db"
    subprocess.run(
        [sys.executable, "-m", "persistence", "--url", f"sqlite:///{store}", "upgrade"],
        check=True,
        capture_output=True,
    )
    with sqlite3.connect(store) as connection:
        return [
            row[0]
            for row in connection.execute(
                "SELECT sql FROM sqlite_master WHERE sql IS NOT NULL"
                " AND name NOT LIKE 'chat_messages_fts_%' ORDER BY rowid"
            )
        ]


def variant_schema(schema: list[str], variant: str) -> list[str]:
    statements = []
    for sql in schema:
        if sql.startswith('CREATE TABLE "chat_messages"') and variant in (
            "no_unique",
            "blob_unique",
        ):
            assert UNIQUE_CLAUSE in sql, "the messages table changed: update this script"
            sql = sql.replace(UNIQUE_CLAUSE, "")
            if variant == "blob_unique":
                sql = sql.replace(
                    "message_id VARCHAR(255) NOT NULL", "message_id BLOB NOT NULL UNIQUE"
                )
        if variant == "no_pending" and (
            "ix_chat_messages_pending" in sql or "TRIGGER chat_messages_fts" in sql
        ):
            continue
        statements.append(sql)
    return statements


def insert_rounds(
    path: Path, schema: list[str], variant: str, rounds: int
) -> list[tuple[float, float]]:
    """(statements, commit) seconds of each transaction of 1,000 messages."""
    connection = sqlite3.connect(path, isolation_level=None)
    for pragma in ("journal_mode=WAL", "foreign_keys=ON", "synchronous=FULL"):
        connection.execute(f"PRAGMA {pragma}")
    for sql in schema:
        connection.execute(sql)
    session_id = uuid.uuid4().hex
    now = "2026-12-07 05:00:00.000000+00:00"
    connection.execute(
        "INSERT INTO chat_sessions VALUES (?, 'm', ?, ?, 0, '{}', 'active', 1, 'x', 0)",
        (session_id, now, now),
    )
    insert = f"INSERT INTO chat_messages ({COLUMNS}) VALUES " + ", ".join(
        ["(" + ", ".join("?" * 8) + ")"] * 500
    )
    timings, position = [], 0
    for _ in range(rounds):
        rows = []
        for _row in range(1000):
            message_id = uuid.uuid4().bytes if variant == "blob_unique" else uuid.uuid4().hex
            rows.append((message_id, session_id, position, "user", CONTENT, now, "{}", None))
            position += 1
        started = time.perf_counter()
        connection.execute("BEGIN IMMEDIATE")
        connection.execute(
            "UPDATE chat_sessions SET message_count = ?, next_position = ? WHERE session_id = ?",
            (position, position, session_id),
        )
        for start in (0, 500):
            connection.execute(
                insert, [value for row in rows[start : start + 500] for value in row]
            )
        written = time.perf_counter()
        connection.execute("COMMIT")
        timings.append((written - started, time.perf_counter() - written))
    connection.close()
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="stores built per variant")
    parser.add_argument("--messages", type=int, default=20, help="thousands per store")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        directory = Path(scratch)
        schema = library_schema(directory)
        found: dict[str, list[tuple[float, float]]] = {variant: [] for variant in VARIANTS}
        for round_number in range(args.rounds):
            for variant in VARIANTS:
                path = directory / f"{variant}-{round_number}.db"
                found[variant] += insert_rounds(
                    path, variant_schema(schema, variant), variant, args.messages
                )
    result = {
        variant: {
            "statements_ms": round(statistics.median(t[0] for t in times) * 1e3, 2),
            "commit_ms": round(statistics.median(t[1] for t in times) * 1e3, 2),
            "total_ms": round(statistics.median(t[0] + t[1] for t in times) * 1e3, 2),
        }
        for variant, times in found.items()
    }
    print(f"{'variant':12} {'statements':>10} {'commit':>8} {'total':>8}  (ms per 1,000)")
    for variant, figures in result.items():
        print(
            f"{variant:12} {figures['statements_ms']:10.2f} {figures['commit_ms']:8.2f}"
            f" {figures['total_ms']:8.2f}"
        )
    if args.json is not None:
        args.json.write_text(json.dumps({"rounds": args.rounds, "variants": result}, indent=2))


if __name__ == "__main__":
    main()
