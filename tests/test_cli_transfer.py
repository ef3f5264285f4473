"""The data-moving commands end to end on SQLite and PostgreSQL, through CliRunner."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import shlex
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest
from sqlalchemy import text
from typer.testing import CliRunner, Result

from persistence import PostgreSQLSessionStorage
from persistence.cli import app

# An empty current directory and no STORAGE_* variable or config file: a fresh machine.
pytestmark = pytest.mark.usefixtures("workdir")

SECRET = "Sup3r-s3cret-pw"


async def _reset(url: str, revision: str | None = None) -> None:
    truncate = text("TRUNCATE chat_messages, chat_sessions, uploaded_files CASCADE")
    async with PostgreSQLSessionStorage(url, 1, 1) as storage, storage.engine.begin() as db:
        await db.execute(truncate)
        if revision is not None:
            await db.execute(
                text("UPDATE persistence_alembic_version SET version_num = :v"), {"v": revision}
            )


@pytest.fixture
def pg_url(postgresql_url: str) -> Iterator[str]:
    """The test database, emptied, at head again afterwards."""
    asyncio.run(_reset(postgresql_url))
    yield postgresql_url
    asyncio.run(_restore_head(postgresql_url))


async def _restore_head(url: str) -> None:
    import asyncpg

    from persistence.sql.schema import script_directory

    connection = await asyncpg.connect(url)
    try:
        await connection.execute(
            "UPDATE persistence_alembic_version SET version_num = $1",
            script_directory().get_current_head(),
        )
    finally:
        await connection.close()


def ok(*args: str) -> Result:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result


def failed(*args: str) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


def stats(url: str) -> dict[str, object]:
    return json.loads(ok("stats", "--json", "--url", url).stdout)  # type: ignore[no-any-return]


def counts(url: str) -> tuple[object, object, object]:
    s = stats(url)
    return s["total_sessions"], s["total_messages"], s["total_files"]


def _filled(tmp_path: Path, sessions: int = 3) -> str:
    url = f"sqlite:///{tmp_path / 'source.db'}"
    for _ in range(sessions):
        ok("demo", "--url", url)
    return url


@pytest.mark.sqlite
def test_restoring_a_store_into_itself_says_so(tmp_path: Path) -> None:
    url = _filled(tmp_path, sessions=1)
    path = tmp_path / "source.db"

    line = failed("restore", str(path), "--url", url)

    assert line == (
        f"error: {path}: this is the database file of the store being restored into; a store"
        " holds everything its own file does, so there is nothing to restore"
    )
    assert counts(url) == (1, 4, 1)


@pytest.mark.sqlite
def test_migrate_sqlite_to_a_fresh_sqlite_file_twice(tmp_path: Path) -> None:
    source = _filled(tmp_path)
    destination = f"sqlite:///{tmp_path / 'new' / 'copy.db'}"
    line = ok("migrate", "--from", source, "--to", destination).stdout
    assert "Migrated 3 session(s), 12 message(s) and 3 file record(s)" in line
    # Every insert leaves its search documents pending on SQLite: the command writes them.
    assert line.rstrip().endswith("; verified; 12 messages indexed for search")
    assert counts(destination) == (3, 12, 3)
    again = json.loads(ok("migrate", "--from", source, "--to", destination, "--json").stdout)
    assert again["verified"] is True
    assert (again["sessions_migrated"], again["sessions_already_present"]) == (0, 3)
    assert counts(destination) == (3, 12, 3)
    rerun = ok("migrate", "--from", source, "--to", destination).stdout
    assert "Migrated 0 session(s), 0 message(s) and 0 file record(s)" in rerun
    assert "(3 session(s) and 3 file record(s) already present)" in rerun


@pytest.mark.sqlite
def test_migrate_refuses_two_sources(tmp_path: Path) -> None:
    # Found by attack: `--url a --from b` copied from b without a word about a.
    source = _filled(tmp_path, sessions=1)
    other = f"sqlite:///{tmp_path / 'other.db'}"
    ok("demo", "--url", other)
    destination = tmp_path / "copy.db"

    result = CliRunner().invoke(
        app, ["migrate", "--url", other, "--from", source, "--to", f"sqlite:///{destination}"]
    )

    assert result.exit_code == 2, result.output
    assert "--url and --from both name the source: give one" in result.output
    # Also the --url before the command (found by attack: it was not seen).
    before_it = ["--url", other, "migrate", "--from", source, "--to", f"sqlite:///{destination}"]
    result = CliRunner().invoke(app, before_it)
    assert result.exit_code == 2, result.output
    assert "--url and --from both name the source: give one" in result.output
    assert not destination.exists()
    same = ok("migrate", "--url", source, "--from", source, "--to", f"sqlite:///{destination}")
    assert "Migrated 1 session(s)" in same.stdout


@pytest.mark.sqlite
def test_migrate_errors_name_the_option_of_the_store_that_failed(tmp_path: Path) -> None:
    # Found by attack: an unreachable or malformed store's line did not say which side.
    source = _filled(tmp_path, sessions=1)
    missing = f"sqlite:///{tmp_path / 'missing.db'}"
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory")
    fine = f"sqlite:///{tmp_path / 'copy.db'}"

    assert failed("migrate", "--from", missing, "--to", fine).startswith(
        "error: --from: no database at"
    )
    assert failed("migrate", "--url", "foo://bar", "--to", fine).startswith(
        "error: --url: URL: scheme foo://"
    )
    assert failed("migrate", "--from", source, "--to", "postgresql://u@h:port/db").startswith(
        "error: --to: storage setting connection_string"
    )
    assert failed("migrate", "--from", source, "--to", "postgresql://u:x@[::1/db").startswith(
        "error: --to: connection_string"
    )
    assert failed("--url", missing, "migrate", "--to", fine).startswith(
        "error: --url: no database at"
    )
    under_a_file = failed("migrate", "--from", source, "--to", f"sqlite:///{a_file}/x.db")
    assert under_a_file.startswith("error: --to: "), under_a_file
    assert "a-file" in under_a_file
    assert not (tmp_path / "copy.db").exists()
    # What is not one store's fault names neither.
    assert failed("migrate", "--from", source, "--to", source) == (
        "error: --from and --to name the same store"
    )
    assert "Migrated 1 session(s)" in ok("migrate", "--from", source, "--to", fine).stdout


def _last_error_line(*args: str) -> str:
    """The error line of a command that failed after its progress lines."""
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 1, result.output
    return result.stderr.strip().splitlines()[-1]


async def _long_sessions(path: Path, sessions: int, text_size: int) -> None:
    from persistence import ChatSession, SQLiteSessionStorage

    async with SQLiteSessionStorage(path) as storage:
        for number in range(sessions):
            session = ChatSession.create("m", session_id=f"s{number:03d}")
            for turn in range(6):
                session.add_message("user", f"turn {turn} " + "x" * text_size)
            await storage.save_session(session)


@pytest.mark.sqlite
def test_migrate_errors_during_the_copy_name_the_store_they_came_from(tmp_path: Path) -> None:
    """Found by attack: a destination that filled up said "insert sessions failed: the
    disk is full", not which of the two stores."""
    asyncio.run(_long_sessions(tmp_path / "source.db", 60, 4000))
    source, destination = f"sqlite:///{tmp_path / 'source.db'}", tmp_path / "copy.db"
    command = [sys.executable, "-m", "persistence", "migrate", "--from", source]
    limit = 256 * 1024  # room for a new store's schema, not for the copy

    def limited() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    done = subprocess.run(
        [*command, "--to", f"sqlite:///{destination}"],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent)),
        preexec_fn=limited,
        timeout=120,
        check=False,
    )

    assert done.returncode == 1, done.stderr
    assert done.stderr.startswith("error: --to: insert sessions failed: "), done.stderr
    assert "SQLite's temporary files: SQLITE_TMPDIR, TMPDIR or /var/tmp" in done.stderr
    assert "; 0 of 60 sessions were copied" in done.stderr
    assert "verified" in ok("migrate", "--from", source, "--to", f"sqlite:///{destination}").stdout

    # A row of the source that the models refuse names the source.
    with contextlib.closing(sqlite3.connect(tmp_path / "source.db")) as db, db:
        db.execute("UPDATE chat_sessions SET model = '' WHERE session_id = 's007'")
    refused = _last_error_line(
        "migrate", "--from", source, "--to", f"sqlite:///{tmp_path / 'x.db'}"
    )
    assert refused.startswith("error: --from: "), refused
    assert "s007" in refused


@pytest.mark.sqlite
def test_migrate_whose_own_ledger_fails_names_neither_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by attack: the ledger (the copy's private scratch database, written in
    SQLITE_TMPDIR) failing on a full disk was blamed on `--to`."""
    from persistence.transfer import ledger

    source = _filled(tmp_path, sessions=2)
    # A statement the ledger's own SQLite refuses, as a full SQLITE_TMPDIR makes it.
    monkeypatch.setattr(ledger, "_RECORD_SESSION", "INSERT INTO missing VALUES (?, ?, ?, ?)")

    line = _last_error_line("migrate", "--from", source, "--to", f"sqlite:///{tmp_path / 'c.db'}")

    assert line.startswith("error: the migration's ledger failed: no such table: missing"), line


@pytest.mark.sqlite
def test_migrate_whose_indexing_fails_says_that_the_copy_is_complete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by attack: `migrate` onto a disk that filled up while it indexed the copy
    for search said "index messages failed", not that the copy itself was complete nor
    that nothing was verified."""
    from persistence import ChatSession, PersistenceError, SQLiteSessionStorage

    source = _filled(tmp_path, sessions=2)
    destination = f"sqlite:///{tmp_path / 'copy.db'}"

    async def full(self: SQLiteSessionStorage) -> int:
        raise PersistenceError("index messages failed: the disk is full")

    with monkeypatch.context() as patched:
        patched.setattr(SQLiteSessionStorage, "index_for_search", full)
        line = _last_error_line("migrate", "--from", source, "--to", destination)

    assert line == (
        "error: --to: index messages failed: the disk is full; the copy itself is complete"
        " and unverified: running the same migrate again indexes and verifies it"
    )
    assert counts(destination) == (2, 8, 2)
    with monkeypatch.context() as patched:
        patched.setattr(SQLiteSessionStorage, "index_for_search", full)
        unverified = _last_error_line(
            "migrate", "--from", source, "--to", destination, "--no-verify"
        )
    assert unverified.endswith("running the same migrate again indexes it"), unverified
    assert (
        "; verified; 8 messages indexed for search"
        in ok("migrate", "--from", source, "--to", destination).stdout
    )

    # An error while verifying names its store too: the copy loads the destination's
    # sessions once (one batch), the verification next.
    loads = []
    load_sessions = SQLiteSessionStorage.load_sessions

    async def lost(self: SQLiteSessionStorage, session_ids: list[str]) -> list[ChatSession]:
        loads.append(session_ids)
        if len(loads) > 1:
            raise PersistenceError("load sessions failed: the disk went away")
        return await load_sessions(self, session_ids)

    with monkeypatch.context() as patched:
        patched.setattr(SQLiteSessionStorage, "load_sessions", lost)
        line = _last_error_line("migrate", "--from", source, "--to", destination)
    assert line == "error: --to: load sessions failed: the disk went away", line


@pytest.mark.sqlite
@pytest.mark.parametrize(
    ("command", "said"),
    [
        (
            "migrate",
            "the copy itself is complete and unverified: running the same migrate again"
            " indexes and verifies it",
        ),
        ("import", "the import itself is complete; the first search indexes the messages left"),
        ("restore", "the restore itself is complete; the first search indexes the messages left"),
    ],
)
def test_sigterm_while_a_transfer_indexes_for_search_says_what_is_complete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: str, said: str
) -> None:
    """Found by attack: `migrate` stopped by SIGTERM while it indexed its copy for search
    (its unfinished-copy note already gone) said only `error: terminated`, nothing of
    the copy being complete and unverified."""
    from persistence import SQLiteSessionStorage

    source = _filled(tmp_path, sessions=2)
    destination = f"sqlite:///{tmp_path / 'copy.db'}"
    given = {
        "migrate": ["migrate", "--from", source, "--to", destination],
        "import": ["import", str(tmp_path / "all.json"), "--url", destination],
        "restore": ["restore", str(tmp_path / "backups"), "--url", destination],
    }[command]
    ok("export-all", str(tmp_path / "all.json"), "--url", source)
    ok("backup", str(tmp_path / "backups"), "--url", source)
    if command == "restore":
        [backup] = (tmp_path / "backups").iterdir()
        given[1] = str(backup)

    async def terminated(self: SQLiteSessionStorage) -> int:
        os.kill(os.getpid(), signal.SIGTERM)  # as a service manager stops the command
        await asyncio.sleep(30)
        raise AssertionError("SIGTERM did not stop the indexing")

    with monkeypatch.context() as patched:
        patched.setattr(SQLiteSessionStorage, "index_for_search", terminated)
        result = CliRunner().invoke(app, given)

    assert result.exit_code == 143, result.output
    assert result.stderr.strip().splitlines()[-2:] == [
        f"Interrupted during indexing for search: {said}",
        "error: terminated",
    ]
    assert counts(destination) == (2, 8, 2)


@pytest.mark.sqlite
def test_backup_refuses_standard_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Found by attack: `backup -` made a directory named `-` and wrote the backup there.
    source = _filled(tmp_path, sessions=1)
    monkeypatch.chdir(tmp_path)

    result = CliRunner().invoke(app, ["backup", "--url", source, "-"])

    assert result.exit_code == 2, result.output
    assert "- is standard output" in " ".join(result.output.split())
    assert not (tmp_path / "-").exists()
    done = ok("backup", "--url", source, "./-")
    assert len(list((tmp_path / "-").glob("persistence-sqlite-*.sqlite3"))) == 1, done.stdout


@pytest.mark.sqlite
def test_progress_is_printed_as_lines_when_stderr_is_not_a_terminal(tmp_path: Path) -> None:
    source = f"sqlite:///{tmp_path / 'source.db'}"
    for _ in range(10):
        ok("demo", "--url", source)
    destination = f"sqlite:///{tmp_path / 'copy.db'}"

    result = ok("migrate", "--from", source, "--to", destination, "--batch-size", "3")

    copying = [line for line in result.stderr.splitlines() if line.startswith("Copying")]
    verifying = [line for line in result.stderr.splitlines() if line.startswith("Verifying")]
    # Per session, though batches hold 3: one line per tenth, each with what is left.
    assert [line.split(":")[1].split()[0] for line in copying] == [f"{n}/10" for n in range(1, 11)]
    assert "s elapsed, about" in copying[0] and "left" in copying[0]
    assert verifying and verifying[-1].startswith("Verifying: 10/10 sessions (100%)")


@pytest.mark.sqlite
def test_migrate_verifies_what_it_copied_into_a_store_that_held_sessions(
    tmp_path: Path,
) -> None:
    """Found by attack: the command verified with verify_migration, not what the library
    function checks; a session the destination held (revision 1) with its own model
    failed the command's verification."""
    source = _filled(tmp_path, sessions=2)
    destination = f"sqlite:///{tmp_path / 'held.db'}"
    ok("migrate", "--from", source, "--to", destination, "--no-verify")
    database = sqlite3.connect(tmp_path / "held.db")
    with database:
        database.execute("UPDATE chat_sessions SET model = 'the destination''s own'")
    database.close()
    result = json.loads(ok("migrate", "--from", source, "--to", destination, "--json").stdout)
    assert result["verified"] is True, result["verification"]["mismatches"]
    report = result["verification"]
    assert (report["sessions_held"], report["sessions_with_own_fields"]) == (2, 2)


@pytest.mark.sqlite
def test_migrate_takes_the_configured_store_as_source(tmp_path: Path) -> None:
    source = _filled(tmp_path, sessions=1)
    destination = f"sqlite:///{tmp_path / 'copy.db'}"
    ok("--url", source, "migrate", "--to", destination, "--no-verify", "--batch-size", "1")
    assert counts(destination) == (1, 4, 1)
    assert "same store" in failed("--url", source, "migrate", "--to", source)
    linked = tmp_path / "linked.db"  # a hard link: another name, the same file
    os.link(source.removeprefix("sqlite:///"), linked)
    # Refused by either name, before the names are compared: SQLite keeps a -wal per name.
    assert "has 2 hard links" in failed("--url", source, "migrate", "--to", f"sqlite:///{linked}")
    linked.unlink()
    assert "no database at" in failed("migrate", "--to", destination)
    configured = tmp_path / "work" / "gemini_sessions.db"
    configured.write_bytes(Path(source.removeprefix("sqlite:///")).read_bytes())
    fresh = tmp_path / "fresh.db"
    # An empty --from (an unset variable) is refused, not read as the configured store.
    assert "URL: no scheme" in failed("migrate", "--from", "", "--to", f"sqlite:///{fresh}")
    assert not fresh.exists()


@pytest.mark.postgresql
def test_migrate_sqlite_to_postgresql_and_back(tmp_path: Path, pg_url: str) -> None:
    source = _filled(tmp_path)
    ok("migrate", "--from", source, "--to", pg_url)
    assert counts(pg_url) == (3, 12, 3)
    back = f"sqlite:///{tmp_path / 'back.db'}"
    result = json.loads(ok("migrate", "--from", pg_url, "--to", back, "--json").stdout)
    assert (result["sessions_migrated"], result["verified"]) == (3, True)
    assert counts(back) == (3, 12, 3)


@pytest.mark.postgresql
def test_migrate_refuses_a_destination_at_an_unknown_revision(
    tmp_path: Path, postgresql_url: str
) -> None:
    source = _filled(tmp_path, sessions=1)
    asyncio.run(_reset(postgresql_url, revision="f00dfeed"))
    try:
        line = failed("migrate", "--from", source, "--to", postgresql_url)
        assert "f00dfeed" in line and "newer version" in line
    finally:
        asyncio.run(_restore_head(postgresql_url))
    assert counts(postgresql_url) == (0, 0, 0)


@pytest.mark.sqlite
def test_migrate_refuses_a_sqlite_destination_at_an_unknown_revision(tmp_path: Path) -> None:
    source = _filled(tmp_path, sessions=1)
    destination = tmp_path / "newer.db"
    ok("upgrade", "--url", f"sqlite:///{destination}")
    with sqlite3.connect(destination) as connection:
        connection.execute("UPDATE persistence_alembic_version SET version_num = 'f00dfeed'")
    assert "f00dfeed" in failed("migrate", "--from", source, "--to", f"sqlite:///{destination}")
    with sqlite3.connect(destination) as connection:
        assert connection.execute("SELECT count(*) FROM chat_sessions").fetchone() == (0,)


@pytest.mark.postgresql
def test_unreachable_destination_is_one_line_without_the_password(tmp_path: Path) -> None:
    source = _filled(tmp_path, sessions=1)
    line = failed("migrate", "--from", source, "--to", f"postgresql://u:{SECRET}@127.0.0.1:1/x")
    assert "unreachable" in line and SECRET not in line


@pytest.mark.postgresql
def test_export_all_then_import_into_postgresql(tmp_path: Path, pg_url: str) -> None:
    source = _filled(tmp_path)
    export = tmp_path / "all.json"
    line = ok("export-all", str(export), "--url", source).stdout
    assert f"Exported 3 session(s), 12 message(s) and 3 file record(s) of {source}" in line
    assert json.loads(export.read_text(encoding="utf-8"))
    imported = json.loads(ok("import", str(export), "--url", pg_url, "--json").stdout)
    assert (imported["sessions_imported"], imported["messages_imported"]) == (3, 12)
    ok("import", str(export), "--url", pg_url)
    assert counts(pg_url) == (3, 12, 3)


@pytest.mark.sqlite
def test_import_refuses_a_truncated_or_foreign_file_before_writing(tmp_path: Path) -> None:
    source = _filled(tmp_path, sessions=2)
    export = tmp_path / "all.json"
    ok("export-all", str(export), "--url", source)
    truncated = tmp_path / "truncated.json"
    truncated.write_bytes(export.read_bytes()[: export.stat().st_size // 2])
    target = f"sqlite:///{tmp_path / 'target.db'}"
    foreign = tmp_path / "foreign.json"
    foreign.write_text('{"hello": "world"}')
    empty = tmp_path / "empty.json"
    empty.write_bytes(b"")
    # Each error names the file (found by audit: "the file is empty" named none).
    for bad, problem in [
        (truncated, "not valid JSON"),
        (foreign, "unexpected top-level key 'hello'"),
        (empty, "the file is empty"),
        (tmp_path / "missing.json", "missing.json"),
    ]:
        line = failed("import", str(bad), "--url", target)
        assert line.startswith(f"error: {bad}"), line
        assert problem in line, line
    assert not (tmp_path / "target.db").exists()  # checked before the store is opened


@pytest.mark.postgresql
def test_backup_and_restore_on_sqlite_and_postgresql(tmp_path: Path, pg_url: str) -> None:
    source = _filled(tmp_path)
    backups = tmp_path / "backups"
    sqlite_backup = json.loads(ok("backup", str(backups), "--url", source, "--json").stdout)
    assert sqlite_backup["kind"] == "sqlite" and sqlite_backup["sessions"] == 3
    line = ok("restore", sqlite_backup["path"], "--url", pg_url).stdout
    assert "Restored 3 session(s), 12 message(s) and 3 file record(s)" in line
    assert counts(pg_url) == (3, 12, 3)

    line = ok("backup", str(backups), "--url", pg_url).stdout
    assert line.startswith(
        f"Backed up 3 session(s), 12 message(s) and 3 file record(s) of {pg_url}"
    )
    (json_backup,) = [p for p in backups.iterdir() if p.suffix == ".json"]
    restored = f"sqlite:///{tmp_path / 'restored.db'}"
    ok("restore", str(json_backup), "--url", restored)
    assert counts(restored) == (3, 12, 3)
    not_a_backup = tmp_path / "notes.txt"
    not_a_backup.write_text("hello")
    assert "not a backup" in failed("restore", str(not_a_backup), "--url", restored)


@pytest.mark.sqlite
def test_a_restore_whose_verification_fails_says_so_and_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by attack: restore dropped the verification's report, said "Restored" and
    exited 0, where migrate of the same file failed naming the mismatch. (A backup
    whose rows disagree is now refused before writing, below; a mismatch comes from a
    writer meanwhile, which this stands in for.)"""
    import persistence.cli.transfer as commands

    source = _filled(tmp_path)
    backup = json.loads(ok("backup", str(tmp_path / "backups"), "--url", source, "--json").stdout)
    restore = commands.restore_backup

    async def meanwhile_changed(*args: object, **options: object) -> dict[str, object]:
        result = await restore(*args, **options)  # type: ignore[arg-type]
        mismatch = {"kind": "session", "problem": "different", "field": "model"}
        report = {"ok": False, "mismatch_count": 1, "mismatches": [mismatch]}
        return {**result, "verified": False, "verification": report}

    monkeypatch.setattr(commands, "restore_backup", meanwhile_changed)
    result = CliRunner().invoke(
        app, ["restore", backup["path"], "--url", f"sqlite:///{tmp_path / 'one.db'}"]
    )
    assert result.exit_code == 1
    assert "Restored 3 session(s)" in result.stdout
    last = result.stderr.strip().splitlines()[-1]
    assert last == (
        "error: verification found 1 mismatch(es); first: kind=session, problem=different,"
        " field=model"
    )


@pytest.mark.sqlite
def test_a_sqlite_backup_whose_rows_disagree_is_refused_before_writing(tmp_path: Path) -> None:
    source = _filled(tmp_path)
    backup = json.loads(ok("backup", str(tmp_path / "backups"), "--url", source, "--json").stdout)
    with contextlib.closing(sqlite3.connect(backup["path"])) as db, db:
        db.execute(
            "UPDATE chat_sessions SET message_count = message_count + 5,"
            " next_position = next_position + 5"
        )
    destination = f"sqlite:///{tmp_path / 'one.db'}"

    line = failed("restore", backup["path"], "--url", destination)

    assert line.startswith(f"error: {backup['path']}: sessions[0] (")
    assert "message_count is 9 but the session carries 4 messages; nothing was restored" in line
    assert counts(destination) == (0, 0, 0)


def test_data_moving_commands_have_help() -> None:
    for command in ("migrate", "backup", "restore", "export-all", "import"):
        result = ok(command, "--help")
        assert "--config" in result.output and "--url" in result.output


async def _many_sessions(path: Path, count: int, text: str = "") -> None:
    from persistence import ChatSession, SQLiteSessionStorage

    async with SQLiteSessionStorage(path) as storage:
        for start in range(0, count, 500):
            batch = [ChatSession.create("m") for _ in range(start, min(count, start + 500))]
            for session in batch:
                for turn in range(5):
                    session.add_message("user", f"{text}turn {turn}")
            assert await storage.insert_sessions(batch)


@pytest.mark.sqlite
def test_ctrl_c_during_migrate_says_how_far_it_got_and_a_rerun_resumes(tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys

    asyncio.run(_many_sessions(tmp_path / "big.db", 4000))
    source, destination = f"sqlite:///{tmp_path / 'big.db'}", f"sqlite:///{tmp_path / 'to.db'}"
    # Started without job control (a background job of a script, as some CI runners
    # start theirs), a process inherits SIGINT ignored, and Python leaves it so: the CLI
    # runs with the handler a terminal's Ctrl-C finds, whatever this process inherited.
    command = [
        sys.executable,
        "-c",
        "import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler);"
        " runpy.run_module('persistence', run_name='__main__', alter_sys=True)",
        "migrate",
        "--from",
        source,
        "--to",
        destination,
    ]
    process = subprocess.Popen(
        [*command, "--batch-size", "2"], stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert process.stderr is not None
    first = process.stderr.readline()
    assert first.startswith("Copying sessions: "), first
    process.send_signal(signal.SIGINT)
    rest = process.stderr.read()
    assert process.wait(timeout=60) == 130  # 128 + SIGINT, as a shell reports it

    interrupted = [line for line in rest.splitlines() if line.startswith("Interrupted")]
    assert len(interrupted) == 1, rest
    done = int(interrupted[0].split(": ")[1].split(" of ")[0])
    assert 0 < done < 4000
    assert interrupted[0].endswith("running the same command again resumes safely")
    assert rest.rstrip().endswith("error: interrupted")
    result = json.loads(ok("migrate", "--from", source, "--to", destination, "--json").stdout)
    assert result["verified"] is True
    assert result["sessions_already_present"] >= done
    assert result["sessions_migrated"] + result["sessions_already_present"] == 4000


@pytest.mark.sqlite
def test_ctrl_c_while_import_checks_its_file_says_interrupted(tmp_path: Path) -> None:
    """Found by attack: Ctrl-C while `import` checked its file, inside ijson's parser
    (C code calling back into Python), ended in `error: unexpected SystemError: <method
    '__contains__' of 'dict' objects> returned a result with an exception set`, status
    1. Each run is interrupted once it has opened the file, each a little later into the
    check's parse; nothing is written before the check ends."""
    import signal
    import subprocess
    import sys

    asyncio.run(_many_sessions(tmp_path / "big.db", 3000, text="lorem ipsum dolor " * 12))
    export = tmp_path / "big.json"
    ok("export-all", str(export), "--url", f"sqlite:///{tmp_path / 'big.db'}")
    into = tmp_path / "into.db"
    ok("upgrade", "--url", f"sqlite:///{into}")
    command = [
        sys.executable,
        "-c",
        "import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler);"
        " runpy.run_module('persistence', run_name='__main__', alter_sys=True)",
        "import",
        str(export),
        "--url",
        f"sqlite:///{into}",
    ]
    for attempt in range(24):  # about one in eight lands where it raised SystemError
        process = subprocess.Popen(
            command, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        _wait_until_open(process.pid, export)
        time.sleep(0.01 * attempt)  # somewhere else in the parse each time
        process.send_signal(signal.SIGINT)
        _, errors = process.communicate(timeout=60)
        assert process.returncode == 130, (attempt, errors[-2000:])
        assert errors.rstrip().endswith("error: interrupted"), errors[-2000:]
        assert "unexpected" not in errors and "Traceback" not in errors
    assert counts(f"sqlite:///{into}") == (0, 0, 0)


def _wait_until_open(pid: int, path: Path) -> None:
    """Waits until process `pid` has `path` open."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{pid}/fd/{fd}") == str(path):
                        return
        time.sleep(0.001)
    raise AssertionError(f"{path} was never opened")


@pytest.mark.sqlite
def test_export_all_and_import_through_standard_output_and_input(tmp_path: Path) -> None:
    source = _filled(tmp_path, sessions=2)
    result = ok("export-all", "-", "--url", source)
    document = json.loads(result.stdout)
    assert document["counts"] == {"sessions": 2, "messages": 8, "files": 2}
    assert "Exported 2 session(s), 8 message(s) and 2 file record(s)" in result.stderr
    assert "to standard output" in result.stderr
    assert not Path("-").exists()
    as_json = ok("export-all", "-", "--json", "--url", source)
    assert json.loads(as_json.stdout)["counts"]["sessions"] == 2
    summary = as_json.stderr[as_json.stderr.index("{") :]
    assert json.loads(summary)["sessions"] == 2

    destination = f"sqlite:///{tmp_path / 'copy.db'}"
    imported = CliRunner().invoke(app, ["import", "-", "--url", destination], input=result.stdout)
    assert imported.exit_code == 0, imported.output
    assert "Imported 2 session(s), 8 message(s) and 2 file record(s) from standard input" in (
        imported.stdout
    )
    assert counts(destination) == (2, 8, 2)
    assert not Path("-").exists()


@pytest.mark.sqlite
def test_output_files_refuse_symlinks_and_write_through_devices(tmp_path: Path) -> None:
    source = _filled(tmp_path, sessions=1)
    session_id = json.loads(ok("sessions", "list", "--json", "--url", source).stdout)[0][
        "session_id"
    ]
    outside = tmp_path / "outside.json"
    outside.write_text("untouched")
    link = tmp_path / "link.json"
    link.symlink_to(outside)
    for command in (["export-all", str(link)], ["export", session_id, "-o", str(link)]):
        error = failed(*command, "--url", source)
        assert f"{link}: it is a symbolic link" in error, error
        assert ".tmp" not in error and "persistence-partial" not in error
    assert link.is_symlink() and outside.read_text() == "untouched"

    # A full device: the system's reason, naming the device; never "Exported".
    for command in (["export-all", "/dev/full"], ["export", session_id, "-o", "/dev/full"]):
        full = CliRunner().invoke(app, [*command, "--url", source])
        assert full.exit_code == 1, full.output
        last = full.stderr.strip().splitlines()[-1]
        assert last == "error: cannot write /dev/full: No space left on device", full.stderr
        assert "Exported" not in full.output and "Wrote" not in full.output
    assert os.path.exists("/dev/full") and not Path("/dev/full").is_file()

    # A FIFO is written through and stays a FIFO.
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    import threading

    received: list[str] = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_text()))
    reader.start()
    ok("export", session_id, "-f", "markdown", "-o", str(fifo), "--url", source)
    reader.join(timeout=30)
    assert received[0].startswith(f"# Chat Session: {session_id}")
    assert fifo.exists() and not fifo.is_file()

    shown = ok("export", session_id, "-o", "-", "--url", source).stdout
    assert json.loads(shown)["session_id"] == session_id
    assert not Path("-").exists()
    # A directory: one line naming it.
    assert f"cannot write {tmp_path}: it is a directory" in failed(
        "export-all", str(tmp_path), "--url", source
    )
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


@pytest.mark.sqlite
@pytest.mark.skipif(not Path("/dev/stdout").is_symlink(), reason="/dev/stdout is no link here")
def test_dev_stdout_is_written_as_standard_output(tmp_path: Path) -> None:
    """Found by attack: `export-all /dev/stdout`, the README's example, was refused as
    a symbolic link. It is standard output, as `-` is: the document alone on stdout,
    the summary on stderr."""
    source = _filled(tmp_path, sessions=1)
    session_id = json.loads(ok("sessions", "list", "--json", "--url", source).stdout)[0][
        "session_id"
    ]
    command = [sys.executable, "-m", "persistence", "--url", source]
    summaries = []
    for arguments in (["export-all", "/dev/stdout"], ["export", session_id, "-o", "/dev/stdout"]):
        done = subprocess.run(
            [*command, *arguments], capture_output=True, text=True, timeout=60, check=False
        )
        assert done.returncode == 0, done.stderr
        json.loads(done.stdout)  # the document, and nothing else
        summaries.append(done.stderr)
    assert "to standard output" in summaries[0], summaries

    # Told by the file, not the name (found by attack: through a link of the user's,
    # or `//dev/stdout`, the summary line joined the document).
    link = tmp_path / "out.json"
    link.symlink_to("/dev/stdout")
    for name in (str(link), "//dev/stdout"):
        done = subprocess.run(
            [*command, "export-all", name], capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
        json.loads(done.stdout)
        assert "to standard output" in done.stderr

    # Standard output that is the store itself is refused, by any name (found by
    # attack: `export-all /dev/stdout >> store.db` appended the export to the store).
    store = Path(source.removeprefix("sqlite:///"))
    size = store.stat().st_size
    for arguments in (["export-all", "/dev/stdout"], ["export-all", "-"], ["export", session_id]):
        done = _appending_to(store, [*command, *arguments])
        assert done.returncode == 1, done.stderr
        said = f"refusing to write standard output: it is the SQLite database {store.resolve()}"
        assert said in done.stderr, done.stderr
    assert store.stat().st_size == size


def _appending_to(path: Path, command: list[str]) -> subprocess.CompletedProcess[str]:
    """Runs `command` with its standard output appended to `path` (a shell's `>>`)."""
    with path.open("ab") as appended:
        return subprocess.run(
            command, stdout=appended, stderr=subprocess.PIPE, text=True, timeout=60
        )


@pytest.mark.sqlite
def test_every_command_refuses_standard_output_into_the_store(tmp_path: Path) -> None:
    """Found by attack: only the export commands checked it; `sessions list --json >>
    store.db` appended the listing to the store, `demo >> store.db-wal` wrote its
    session and then its summary into the store's journal."""
    source = _filled(tmp_path, sessions=1)
    store = Path(source.removeprefix("sqlite:///"))
    before = counts(source)
    command = [sys.executable, "-m", "persistence", "--url", source]
    for name in (store.name, f"{store.name}-wal"):
        for arguments in (["sessions", "list", "--json"], ["stats", "--json"], ["demo"]):
            into = store.with_name(name)
            into.touch()
            size = store.stat().st_size, into.stat().st_size
            done = _appending_to(into, [*command, *arguments])
            assert done.returncode == 1, (arguments, done.stderr)
            assert "refusing to write standard output: it is the" in done.stderr, done.stderr
            assert (store.stat().st_size, into.stat().st_size) == size, arguments
    # Standard error too (found by attack: `-v stats 2>> store.db` appended its log
    # lines): its error line goes to standard output; with both there, nothing is said.
    size = store.stat().st_size
    for both in (False, True):
        with store.open("ab") as appended:
            done = subprocess.run(
                [*command, "-v", "stats"],
                stdout=appended if both else subprocess.PIPE,
                stderr=appended,
                text=True,
                timeout=60,
            )
        assert done.returncode == 1
        if not both:
            assert done.stdout.startswith("error: refusing to write standard error: it is the")
        assert store.stat().st_size == size
    # And migrate's destination (found by attack: its summary was appended to it).
    destination = tmp_path / "copy.db"
    ok("upgrade", "--url", f"sqlite:///{destination}")
    size = destination.stat().st_size
    done = _appending_to(destination, [*command, "migrate", "--to", f"sqlite:///{destination}"])
    assert done.returncode == 1, done.stderr
    said = f"refusing to write standard output: it is the SQLite database {destination.resolve()}"
    assert said in done.stderr, done.stderr
    assert destination.stat().st_size == size
    assert counts(f"sqlite:///{destination}") == (0, 0, 0)
    assert counts(source) == before
    # Into another file, as before.
    with (tmp_path / "listing.json").open("ab") as elsewhere:
        subprocess.run([*command, "sessions", "list", "--json"], stdout=elsewhere, check=True)
    assert len(json.loads((tmp_path / "listing.json").read_text())) == 1


@pytest.mark.sqlite
def test_nothing_is_said_into_the_store_before_standard_error_is_checked(tmp_path: Path) -> None:
    """Found by attack: a closed stdout's error line, an input file's error and the
    source's log lines of `-v migrate` were written to a standard error appended to
    the store (or migrate's destination) before it was checked."""
    source = _filled(tmp_path, sessions=1)
    store = Path(source.removeprefix("sqlite:///"))
    destination = tmp_path / "copy.db"
    ok("upgrade", "--url", f"sqlite:///{destination}")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    missing = f"sqlite:///{tmp_path / 'missing.db'}"
    to = f"sqlite:///{destination}"
    command = [sys.executable, "-m", "persistence"]
    runs = [
        (store, ["--url", source, "stats"], True),
        (store, ["--url", source, "import", str(bad)], False),
        (store, ["--url", source, "restore", str(bad)], False),
        (destination, ["-v", "migrate", "--from", source, "--to", to], False),
        (destination, ["migrate", "--from", missing, "--to", to], False),
    ]
    for into, arguments, stdout_closed in runs:
        size = into.stat().st_size
        with into.open("ab") as appended:
            done = subprocess.run(
                [*command, *arguments],
                stdout=subprocess.DEVNULL if stdout_closed else subprocess.PIPE,
                stderr=appended,
                text=True,
                timeout=60,
                # A closed descriptor 1: the child opens nothing there.
                preexec_fn=(lambda: os.close(1)) if stdout_closed else None,
            )
        assert done.returncode == 1, arguments
        assert into.stat().st_size == size, arguments
        if not stdout_closed:
            assert done.stdout.startswith("error: refusing to write standard error"), done.stdout
    assert counts(to) == (0, 0, 0)


@pytest.mark.sqlite
def test_usage_errors_help_and_version_are_never_written_into_a_sqlite_file(
    tmp_path: Path,
) -> None:
    """Found by attack: a usage error (`sessions lst 2>> store.db`), `--help` or
    `--version` went to a standard error or output appended to the store: click says
    them before any store is named. Told by how the file begins, so any SQLite
    database or write-ahead log is refused, the store's or another's."""
    source = _filled(tmp_path, sessions=1)
    store = Path(source.removeprefix("sqlite:///"))
    before = counts(source)
    other = tmp_path / "other.db"
    with contextlib.closing(sqlite3.connect(other)) as database:
        database.execute("CREATE TABLE t (x)")
        database.commit()
    # A write-ahead log with its frames, kept by a connection left open.
    held = sqlite3.connect(tmp_path / "held.db")
    held.execute("PRAGMA journal_mode=WAL")
    held.execute("CREATE TABLE t (x)")
    held.commit()
    wal = tmp_path / "held.db-wal"
    # The rollback journal of a transaction under way: zeros where its header will be.
    busy = sqlite3.connect(tmp_path / "busy.db", isolation_level=None)
    busy.execute("CREATE TABLE t (x)")
    busy.execute("BEGIN")
    busy.execute("INSERT INTO t VALUES (1)")
    journal = tmp_path / "busy.db-journal"
    command = [sys.executable, "-m", "persistence", "--url", source]
    runs = [
        (["sessions", "lst"], "error"),
        (["sessions", "list", "--limit", "many"], "error"),
        (["--help"], "output"),
        (["sessions", "--help"], "output"),
        (["sessions"], "output"),  # a group's help, printed for want of a command
        (["--version"], "output"),
    ]
    try:
        assert wal.stat().st_size > 0
        assert journal.read_bytes()[:8] == bytes(8)
        targets = [(store, "database"), (other, "database"), (wal, "write-ahead log")]
        targets.append((journal, "rollback journal"))
        targets.append((tmp_path / "held.db-shm", "shared-memory index"))
        (tmp_path / "other.db-wal").touch()  # empty: told by its name beside the database
        targets.append((tmp_path / "other.db-wal", "write-ahead log"))
        for into, kind in targets:
            for arguments, stream in runs:
                # `>>` (write only: the file is read again to tell it) and `<>` (read
                # and write, from byte 0: the header itself would be overwritten).
                for mode in ("ab", "r+b"):
                    content = into.read_bytes()
                    with into.open(mode) as opened:
                        done = subprocess.run(
                            [*command, *arguments],
                            stdout=opened if stream == "output" else subprocess.PIPE,
                            stderr=opened if stream == "error" else subprocess.PIPE,
                            text=True,
                            timeout=60,
                        )
                    assert done.returncode == 1, (into, arguments, mode)
                    assert into.read_bytes() == content, (into, arguments, mode)
                    said = done.stdout if stream == "error" else done.stderr
                    named = f"it is the SQLite {kind} {into.resolve()}"
                    assert f"refusing to write standard {stream}: {named}" in said, said
    finally:
        held.close()
        busy.close()
    # An error of the configuration, said before a store is known, and a command's
    # output into a database of no store it names.
    runs = [
        ([sys.executable, "-m", "persistence", "--url", "nosuch://x", "stats"], "error"),
        ([*command, "sessions", "list", "--json"], "output"),
    ]
    for arguments, stream in runs:
        content = other.read_bytes()
        with other.open("ab") as appended:
            done = subprocess.run(
                arguments,
                stdout=appended if stream == "output" else subprocess.PIPE,
                stderr=appended if stream == "error" else subprocess.PIPE,
                text=True,
                timeout=60,
            )
        assert done.returncode == 1, arguments
        assert other.read_bytes() == content, arguments
        said = done.stdout if stream == "error" else done.stderr
        named = f"it is the SQLite database {other.resolve()}"
        assert f"refusing to write standard {stream}: {named}" in said, said
    # Found by attack on the first form of the check: typer's shell-completion hook
    # printed before any command's parsing; and with standard output unwritable, the
    # refusal's own line failed and Python's traceback went to standard error, the
    # database (`2<>`: over its header).
    for environment, stdout in (({"_PERSISTENCE_COMPLETE": "bash_source"}, None), ({}, "full")):
        content = store.read_bytes()
        with (
            store.open("r+b") as over,
            open(os.devnull if stdout is None else "/dev/full", "wb") as out,
        ):
            done = subprocess.run(
                [*command, "sessions", "lst"],
                stdout=out,
                stderr=over,
                env={**os.environ, **environment},
                timeout=60,
            )
        assert done.returncode == 1, environment
        assert store.read_bytes() == content, environment
    assert counts(source) == before
    # Into any other file, as before.
    notes = tmp_path / "notes.txt"
    notes.write_text("SQLite notes\n")
    with notes.open("ab") as appended:
        subprocess.run([*command, "--help"], stdout=appended, check=True, timeout=60)
    with notes.open("ab") as appended:
        done = subprocess.run([*command, "sessions", "lst"], stderr=appended, timeout=60)
    assert done.returncode == 2
    assert "Usage:" in notes.read_text() and "No such command" in notes.read_text()


@pytest.mark.sqlite
def test_a_database_whose_path_is_not_utf8_is_refused_cleanly(tmp_path: Path) -> None:
    """Found by attack: the refusal's line, written straight to descriptor 1, could not
    encode the surrogate that stands for a byte of a path that is not UTF-8; Python's
    traceback went to standard error, the database (`2<>`: over its header), and the
    error line into a store file still empty."""
    plain = tmp_path / "plain.db"
    with contextlib.closing(sqlite3.connect(plain)) as database:
        database.execute("CREATE TABLE t (x)")
        database.commit()
    named = os.fsdecode(os.fsencode(tmp_path) + b"/store\xff.db")
    shutil.copyfile(plain, named)
    empty = os.fsdecode(os.fsencode(tmp_path) + b"/empty\xff.db")
    Path(empty).touch()
    # And one whose path holds a line break (attack G): the refusal is still one line.
    broken = str(tmp_path / "two\nlines.db")
    shutil.copyfile(plain, broken)
    runs = [
        (named, ["--help"]),
        (named, ["sessionz"]),
        (empty, ["--url", f"sqlite:///{empty}", "stats"]),
        (broken, ["sessionz"]),
    ]
    for into, arguments in runs:
        content = Path(into).read_bytes()
        with open(into, "r+b") as over:
            done = subprocess.run(
                [sys.executable, "-m", "persistence", *arguments],
                stdout=subprocess.PIPE,
                stderr=over,
                text=True,
                timeout=60,
            )
        assert done.returncode == 1, arguments
        assert Path(into).read_bytes() == content, arguments
        assert done.stdout.startswith("error: refusing to write standard error: it is the")
        assert done.stdout.count("\n") == 1, done.stdout
        assert "\\udcff.db" in done.stdout or into == broken, done.stdout


@pytest.mark.sqlite
def test_a_fifo_named_as_the_database_beside_an_output_does_not_block(tmp_path: Path) -> None:
    """Found by looking at 772a9ec: an output named `x.db-wal` had its database `x.db`
    opened to read its header, and a FIFO of that name waited for a writer for good."""
    os.mkfifo(tmp_path / "x.db")
    output = tmp_path / "x.db-wal"
    output.write_text("notes\n")
    with output.open("ab") as appended:
        done = subprocess.run(
            [sys.executable, "-m", "persistence", "--version"],
            stdout=appended,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
        )
    assert done.returncode == 0, done.stderr
    assert output.read_text().startswith("notes\npersistence")


@pytest.mark.sqlite
def test_one_source_spelled_two_ways_is_one_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Found by attack: `--url sqlite:///s.db migrate --from sqlite:///./s.db` was refused.
    _filled(tmp_path, sessions=1)
    monkeypatch.chdir(tmp_path)
    done = ok(
        "--url", "sqlite:///source.db", "migrate", "--from", "sqlite:///./source.db",
        "--to", "sqlite:///copy.db",
    )  # fmt: skip
    assert "Migrated 1 session(s)" in done.stdout


@pytest.mark.sqlite
def test_standard_output_that_is_the_store_is_refused_in_a_pid_namespace(tmp_path: Path) -> None:
    """Found by attack: the check named standard output by /proc/<pid>/fd/1, which in a
    PID namespace (containers, `unshare -p`) is another process's: the export was
    appended to the store. It now compares the open file itself."""
    if shutil.which("unshare") is None:
        pytest.skip("no unshare here")
    source = _filled(tmp_path, sessions=1)
    store = Path(source.removeprefix("sqlite:///"))
    size = store.stat().st_size
    command = shlex.join([sys.executable, "-m", "persistence", "--url", source, "export-all", "-"])
    done = subprocess.run(
        ["unshare", "-p", "-f", "sh", "-c", f"{command} >> {shlex.quote(str(store))}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if "unshare:" in done.stderr:
        pytest.skip(f"no PID namespace here: {done.stderr.strip()}")
    assert done.returncode == 1, done.stderr
    # Named too: the kernel resolves /proc/self in /proc's own namespace, and the
    # path is kept only where it is the open file.
    said = f"refusing to write standard output: it is the SQLite database {store.resolve()}"
    assert said in done.stderr, done.stderr
    assert store.stat().st_size == size


def _import_in_a_process(
    tmp_path: Path, argument: str, stdin: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """`persistence import` in its own process: a hang fails the test, not the run."""
    command = [sys.executable, "-m", "persistence", "--url", f"sqlite:///{tmp_path / 'in.db'}"]
    with open(stdin or os.devnull, "rb") as given:
        return subprocess.run(
            [*command, "import", argument],
            stdin=given,
            capture_output=True,
            text=True,
            timeout=60,
            cwd=Path(__file__).parent.parent,
        )


@pytest.mark.sqlite
def test_import_refuses_a_symlink_to_dev_zero_a_fifo_and_endless_stdin_at_once(
    tmp_path: Path,
) -> None:
    """Found by attack: `import` of a symlink to /dev/zero, or of `-` fed /dev/zero,
    scanned its endless input for escapes forever; of a FIFO it waited for a writer,
    then failed with a bare "[Errno 29] Illegal seek" (it reads its input twice)."""
    zero = tmp_path / "zero.json"
    zero.symlink_to("/dev/zero")
    fifo = tmp_path / "pipe.json"
    os.mkfifo(fifo)
    for argument, stdin, expected in [
        (str(zero), None, f"error: {zero}: not a regular file (a character device)"),
        (str(fifo), None, f"error: {fifo}: not a regular file (a FIFO)"),
        ("-", Path("/dev/zero"), "error: standard input: not valid JSON (corrupt file): it begins"),
    ]:
        done = _import_in_a_process(tmp_path, argument, stdin)
        assert done.returncode == 1, done.stderr
        assert done.stderr.startswith(expected), done.stderr
        assert "Traceback" not in done.stderr
    assert not (tmp_path / "in.db").exists()


@pytest.mark.sqlite
def test_import_refuses_endless_blank_stdin_before_spooling_it(tmp_path: Path) -> None:
    """Found by attack: `yes '' | persistence import -` copied 3.6 GB of newlines to the
    temporary directory in 8 s; blank space is what a JSON document may begin with."""
    store = tmp_path / "in.db"
    persistence = f"{shlex.quote(sys.executable)} -m persistence"
    command = f"yes '' | {persistence} --url sqlite:///{store} import -"
    done = subprocess.run(
        ["sh", "-c", command],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).parent.parent,
    )
    assert done.returncode == 1, done.stderr
    assert done.stderr.startswith(
        "error: standard input: not an export file: its first 1,048,576 bytes are blank"
    ), done.stderr
    assert not store.exists()


def _stored_sessions(database: Path) -> int:
    try:
        with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as db:
            return int(db.execute("SELECT count(*) FROM chat_sessions").fetchone()[0])
    except sqlite3.Error:
        return 0  # not created yet, or its schema not yet


def killed_once_stored(arguments: list[str], database: Path, sessions: int) -> int:
    """Runs `persistence ARGUMENTS` in a process of its own and kills it (SIGKILL) once
    the SQLite `database` holds `sessions` sessions; returns how many it holds then."""
    running = subprocess.Popen(
        [sys.executable, "-m", "persistence", *arguments],
        cwd=Path(__file__).parent.parent,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while _stored_sessions(database) < sessions and time.monotonic() < deadline:
            time.sleep(0.005)
    finally:
        running.send_signal(signal.SIGKILL)
        running.wait()
    return _stored_sessions(database)


def _exported(tmp_path: Path, demos: int) -> Path:
    """An export file of `demos` demo sessions, from a SQLite store of its own."""
    source = f"sqlite:///{tmp_path / 'source.db'}"
    for _ in range(demos):
        ok("demo", "--url", source)
    export = tmp_path / "all.json"
    ok("export-all", str(export), "--url", source)
    return export


@pytest.mark.sqlite
def test_an_import_killed_mid_way_then_run_again_holds_exactly_the_file(tmp_path: Path) -> None:
    """SIGKILL between two batches' commits, then the same import again: every session
    and message once, nothing duplicated, the summary counting what each run wrote."""
    export = _exported(tmp_path, 150)
    source = f"sqlite:///{tmp_path / 'source.db'}"
    target = tmp_path / "target.db"
    written = killed_once_stored(
        ["--url", f"sqlite:///{target}", "import", str(export), "--batch-size", "1"], target, 10
    )
    assert 10 <= written < 150, written

    result = json.loads(ok("import", str(export), "--json", "--url", f"sqlite:///{target}").stdout)

    assert result["sessions_already_present"] + result["sessions_imported"] == 150
    assert result["sessions_already_present"] == written
    assert counts(f"sqlite:///{target}") == counts(source)
    report = json.loads(
        ok("migrate", "--from", source, "--to", f"sqlite:///{target}", "--json").stdout
    )
    assert report["sessions_migrated"] == 0 and report["verified"] is True


@pytest.mark.sqlite
def test_no_output_replaces_the_sqlite_store_or_its_journals(tmp_path: Path) -> None:
    source = _filled(tmp_path, sessions=1)
    store = Path(source.removeprefix("sqlite:///"))
    session_id = json.loads(ok("sessions", "list", "--json", "--url", source).stdout)[0][
        "session_id"
    ]
    (tmp_path / "link.db").symlink_to(store)
    before = store.read_bytes()
    for name in ("source.db", "source.db-wal", "source.db-shm", "source.db-journal"):
        output = str(tmp_path / name)
        for url in (source, f"sqlite:///{tmp_path / 'link.db'}"):  # through a symlink too
            for command in (["export-all", output], ["export", session_id, "-o", output]):
                assert "refusing to write" in failed(*command, "--url", url), (name, command)
    assert "--to names the wal file of the store" in failed(
        "--url", source, "migrate", "--to", f"{source}-wal"
    )
    assert "is not a directory" in failed("backup", str(store), "--url", source)
    assert store.read_bytes() == before
    assert not Path(f"{store}-journal").exists()
    # The default store, named as the operator would name the database to export.
    ok("demo")
    assert "it is the store gemini_sessions.db" in failed("export-all", "gemini_sessions.db")
    assert stats(f"sqlite:///{Path.cwd() / 'gemini_sessions.db'}")["total_sessions"] == 1


@pytest.mark.sqlite
def test_no_output_replaces_another_sqlite_database_or_its_journals(tmp_path: Path) -> None:
    """Found by attack: only the configured store's own files were refused, so
    `export-all other.db` replaced another store's database with the export, and
    `export-all other.db-wal` wrote over its log: its last commits lost."""
    source = _filled(tmp_path, sessions=1)
    session_id = json.loads(ok("sessions", "list", "--json", "--url", source).stdout)[0][
        "session_id"
    ]
    other = tmp_path / "other.db"
    writer = sqlite3.connect(other)
    writer.execute("PRAGMA journal_mode=WAL")
    writer.execute("PRAGMA wal_autocheckpoint=0")  # its commits stay in the -wal
    writer.execute("CREATE TABLE kept (value TEXT)")
    writer.execute("INSERT INTO kept VALUES ('in the log')")
    writer.commit()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "link.db").symlink_to(other)
    files = {name: (tmp_path / name) for name in ("other.db", "other.db-wal", "other.db-shm")}
    before = {name: path.read_bytes() for name, path in files.items()}
    named = [*files.values(), tmp_path / "other.db-journal", tmp_path / "elsewhere" / "link.db"]
    for output in map(str, named):
        for command in (["export-all", output], ["export", session_id, "-o", output]):
            error = failed(*command, "--url", source)
            assert "refusing to write" in error and "SQLite" in error, (output, command)
    assert {name: path.read_bytes() for name, path in files.items()} == before
    assert not (tmp_path / "other.db-journal").exists()
    writer.close()
    assert sqlite3.connect(other).execute("SELECT value FROM kept").fetchall() == [("in the log",)]
    # A file of a journal's name beside no database, or beside a file that is not one,
    # is an ordinary output.
    (tmp_path / "notes.txt").write_text("not a database")
    for output in (tmp_path / "x.db-wal", tmp_path / "notes.txt-wal", tmp_path / "notes.txt"):
        ok("export-all", str(output), "--url", source)
        assert json.loads(output.read_text())["sessions"][0]["session_id"] == session_id


@pytest.mark.sqlite
def test_an_export_into_a_directory_that_cannot_be_listed_succeeds(tmp_path: Path) -> None:
    """Found by attack: into a directory the user may write but not read (mode 0300),
    `export-all` put the whole export in place, then said "cannot write ...:
    Permission denied" and exited 1 (the directory could not be opened to sync it)."""
    source = _filled(tmp_path, sessions=1)
    out = tmp_path / "out"
    out.mkdir()
    command = [sys.executable, "-m", "persistence", "--url", source, "export-all"]
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv to drop the capabilities")
        command = ["setpriv", "--bounding-set=-all", "--inh-caps=-all", *command]
    out.chmod(0o300)
    try:
        result = subprocess.run(
            [*command, str(out / "all.json")], capture_output=True, text=True, timeout=120
        )
    finally:
        out.chmod(0o700)
    assert result.returncode == 0, result.stderr
    assert "Exported 1 session(s)" in result.stdout
    assert json.loads((out / "all.json").read_text())["sessions"][0]["messages"]


@pytest.mark.sqlite
def test_backup_refuses_a_symlink_or_a_file_as_its_directory(tmp_path: Path) -> None:
    source = _filled(tmp_path, sessions=1)
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "backups"
    link.symlink_to(real)
    error = failed("backup", str(link), "--url", source)
    assert f"into {link}: it is a symbolic link (to {real})" in error
    assert list(real.iterdir()) == []
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    assert f"{a_file} exists and is not a directory" in failed(
        "backup", str(a_file), "--url", source
    )
    assert a_file.read_text() == "x"


@pytest.mark.sqlite
def test_restoring_a_backup_of_a_newer_version_names_it_and_leaves_no_store(
    tmp_path: Path,
) -> None:
    source = _filled(tmp_path, sessions=1)
    result = ok("backup", str(tmp_path / "backups"), "--url", source, "--json")
    backup = Path(json.loads(result.stdout)["path"])
    with sqlite3.connect(backup) as db:
        db.execute("UPDATE persistence_alembic_version SET version_num = '0010_future'")
    db.close()
    before = sorted(os.listdir(backup.parent))
    store = tmp_path / "restored" / "new.db"
    store.parent.mkdir()

    line = failed("restore", str(backup), "--url", f"sqlite:///{store}")

    assert line.startswith(f"error: {backup}: the schema is at revision 0010_future")
    assert "newer version" in line
    assert "persistence-restore-" not in line
    assert os.listdir(store.parent) == []
    assert sorted(os.listdir(backup.parent)) == before


@pytest.mark.sqlite
@pytest.mark.parametrize("command", ["backup", "export-all", "import", "restore"])
def test_an_empty_path_is_refused_in_one_line_writing_nothing(
    workdir: Path, tmp_path: Path, command: str
) -> None:
    source = _filled(tmp_path, sessions=1)
    stored = counts(source)

    failed(command, "", "--url", source)

    assert os.listdir(workdir) == []
    assert counts(source) == stored


def _pending_documents(url: str) -> int:
    connection = sqlite3.connect(url.removeprefix("sqlite:///"))
    try:
        query = "SELECT count(*) FROM chat_messages WHERE search_text IS NULL"
        return int(connection.execute(query).fetchone()[0])
    finally:
        connection.close()


@pytest.mark.sqlite
def test_loading_commands_leave_no_search_document_pending(tmp_path: Path) -> None:
    # 40 messages go in as one bulk insert, which on SQLite leaves their documents to
    # a later search; the commands write them before they finish.
    source = _filled(tmp_path, sessions=10)
    migrated = f"sqlite:///{tmp_path / 'migrated.db'}"
    line = ok("migrate", "--from", source, "--to", migrated).stdout
    assert line.rstrip().endswith("; verified; 40 messages indexed for search"), line
    ok("export-all", str(tmp_path / "all.json"), "--url", source)
    imported = f"sqlite:///{tmp_path / 'imported.db'}"
    result = json.loads(
        ok("import", str(tmp_path / "all.json"), "--url", imported, "--json").stdout
    )
    assert result["indexed_for_search"] == 40
    ok("backup", str(tmp_path / "backups"), "--url", source)
    (backup_file,) = (tmp_path / "backups").iterdir()
    restored = f"sqlite:///{tmp_path / 'restored.db'}"
    line = ok("restore", str(backup_file), "--url", restored).stdout
    assert "40 messages indexed for search" in line, line

    for url in (migrated, imported, restored):
        assert _pending_documents(url) == 0
        found = json.loads(ok("search", "urgent", "--url", url, "--json").stdout)
        assert len(found) == 10


@pytest.mark.sqlite
@pytest.mark.parametrize("stderr", ["closed", "/dev/full"])
def test_an_import_goes_on_when_its_progress_cannot_be_written(tmp_path: Path, stderr: str) -> None:
    """Found by attack: with stderr closed or full, the first progress line raised and
    the import stopped after one batch, saying nothing (it could not)."""
    export = _exported(tmp_path, 12)
    target = tmp_path / "target.db"
    redirect = "2>&-" if stderr == "closed" else f"2>{stderr}"
    persistence = f"{shlex.quote(sys.executable)} -m persistence --url sqlite:///{target}"
    done = subprocess.run(
        ["sh", "-c", f"{persistence} import {shlex.quote(str(export))} --batch-size 2 {redirect}"],
        capture_output=False,
        stdout=subprocess.DEVNULL,
        timeout=120,
        cwd=Path(__file__).parent.parent,
    )
    assert done.returncode == 0
    assert _stored_sessions(target) == 12


def test_an_interrupted_input_check_stops_its_thread_before_the_interrupt_goes_on() -> None:
    """Found by attack: `import` stopped while it checked its file (in a thread, so that
    Ctrl-C never lands inside ijson's C code) exited with the thread still reading,
    and Python aborted at exit (SIGABRT) once in 15 to 60 runs. The thread now stops at
    its next read, and is waited for."""
    import threading

    from persistence.cli import transfer as cli_transfer

    class Slow(io.BytesIO):
        def read(self, size: int | None = -1) -> bytes:
            time.sleep(0.005)
            return super().read(1)

    def check(stream: IO[bytes]) -> str:
        while stream.read(1):
            pass
        return "read to the end"

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    timer = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT))
    try:
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            cli_transfer._waited_for(check, Slow(b"x" * 100_000))
    finally:
        timer.cancel()
        signal.signal(signal.SIGINT, previous)
    assert [t for t in threading.enumerate() if t.name == "persistence-check-input"] == []
