"""`persistence verify`: two stores compared end to end, through CliRunner, reading only."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url
from typer.testing import CliRunner, Result

from persistence import ChatSession, SQLiteSessionStorage
from persistence.cli import app
from persistence.config import config_from_url, create_storage
from persistence.sql.schema import script_directory
from tests.test_cli_transfer import (  # noqa: F401 (pg_url: a fixture)
    _filled,
    counts,
    failed,
    killed_once_stored,
    ok,
    pg_url,
)

pytestmark = pytest.mark.usefixtures("workdir")

HOSTILE = "changed\u2028\x1b[31mred\r\nsession 'x': missing from the destination"


def verify(*args: str) -> Result:
    return CliRunner().invoke(app, ["verify", *args])


def _error_line(result: Result) -> str:
    # Progress lines go to stderr too (it is not a terminal here); the error line is last.
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[-1]


def _digests(*paths: Path) -> dict[str, str]:
    """The database files by content; a -wal SQLite made to read one must be empty (a
    reader in a writable directory makes the -wal and -shm files WAL mode needs)."""
    for path in paths:
        wal = path.with_name(path.name + "-wal")
        assert not wal.exists() or wal.stat().st_size == 0
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in paths}


async def _change(url: str) -> str:
    """In the store of `url`: one message's content made hostile, one session dropped, and
    a session of its own added; returns the changed message's id."""
    async with create_storage(config_from_url(url)) as storage:
        first, second = sorted(await storage.list_sessions(), key=lambda s: s.session_id)[:2]
        loaded = await storage.load_session(first.session_id)
        assert loaded is not None
        edited = loaded.edit_message(loaded.messages[1].message_id, content=HOSTILE)
        await storage.save_session(loaded)
        await storage.delete_session(second.session_id)
        own = ChatSession.create(model="only-here")
        own.add_message("user", "mine")
        await storage.save_session(own)
        return edited.message_id


@pytest.mark.sqlite
def test_verify_names_what_a_killed_migrate_left_out_until_it_runs_again(tmp_path: Path) -> None:
    """A migrate killed (SIGKILL) between two batches leaves a destination that looks
    like a smaller store; `verify` names each session and file record it lacks. The
    destination notes the copy unfinished (left by the twenty-ninth round: nothing in
    it did), which `stats` and `verify` show, until the copy runs again."""
    source = _filled(tmp_path, sessions=60)
    target = tmp_path / "copy.db"
    destination = f"sqlite:///{target}"
    written = killed_once_stored(
        ["migrate", "--from", source, "--to", destination, "--batch-size", "1"], target, 5
    )
    assert 5 <= written < 60, written
    shown = f"SQLiteSessionStorage({str(tmp_path / 'source.db')!r})"
    stats = CliRunner().invoke(app, ["--url", destination, "stats", "--json"])
    assert stats.exit_code == 0, stats.output
    [unfinished] = json.loads(stats.stdout)["unfinished_copies"]
    assert unfinished["source"] == shown
    text_stats = CliRunner().invoke(app, ["--url", destination, "stats"])
    assert f"warning: {destination}: a copy from {shown}, begun 20" in text_stats.stderr
    assert text_stats.stderr.rstrip().endswith(", has not finished")

    result = verify("--from", source, "--to", destination)

    assert result.exit_code == 1, result.output
    assert f"warning: {destination}: a copy from {shown}, begun " in result.stderr
    lines = result.stdout.splitlines()
    assert all(line.endswith(": missing from the destination") for line in lines[:-1])
    assert lines[-1] == f"... and {60 - written + 60 - 20} more (--json lists {120 - written})"
    assert _error_line(result) == (
        f"error: {destination} differs from {source}: {60 - written} missing sessions,"
        f" {4 * (60 - written)} missing messages, 60 missing file records"
    )
    ok("migrate", "--from", source, "--to", destination)
    again = verify("--from", source, "--to", destination)
    assert again.exit_code == 0, again.output
    assert again.stdout.startswith(
        f"Verified: {destination} holds what {source} holds, 60 session(s), 240 message(s) and"
        " 60 file record(s) compared in "
    )
    assert "warning" not in again.stderr
    stats = CliRunner().invoke(app, ["--url", destination, "stats", "--json"])
    assert json.loads(stats.stdout)["unfinished_copies"] == []


@pytest.mark.sqlite
def test_verify_reads_both_stores_and_never_writes_them(tmp_path: Path) -> None:
    source = _filled(tmp_path, sessions=2)
    destination = f"sqlite:///{tmp_path / 'copy.db'}"
    ok("migrate", "--from", source, "--to", destination)
    message_id = asyncio.run(_change(destination))
    before = _digests(tmp_path / "source.db", tmp_path / "copy.db")

    text = verify("--from", source, "--to", destination)
    as_json = verify("--to", destination, "--url", source, "--json")

    assert _digests(tmp_path / "source.db", tmp_path / "copy.db") == before
    assert (text.exit_code, as_json.exit_code) == (1, 1), text.output + as_json.output
    report = json.loads(as_json.stdout)
    assert report["ok"] is False
    assert (report["missing_sessions"], report["extra_sessions"]) == (1, 1)
    assert report["differing_messages"] == 1
    [different] = [m for m in report["mismatches"] if m.get("field") == "content"]
    assert (different["kind"], different["id"], different["destination"]) == (
        "message",
        message_id,
        HOSTILE,
    )
    # Each mismatch is one line, the stored text's controls and line breaks escaped.
    lines = text.stdout.splitlines()
    assert len(lines) == report["mismatch_count"], text.stdout
    assert "\x1b" not in text.stdout and "\u2028" not in text.stdout
    [line] = [line for line in lines if line.startswith(f"message '{message_id}'")]
    assert "content differs (source 'Sure." in line and "\\x1b[31mred" in line
    assert _error_line(text).endswith(
        ": 1 missing session, 4 missing messages, 1 extra session, 1 extra message,"
        " 1 differing session, 1 differing message"
    )


@pytest.mark.sqlite
def test_verify_additive_lets_the_destination_hold_more(tmp_path: Path) -> None:
    source = _filled(tmp_path, sessions=1)
    destination = f"sqlite:///{tmp_path / 'copy.db'}"
    ok("demo", "--url", destination)  # the destination's own session and file record
    ok("migrate", "--from", source, "--to", destination)

    strict = verify("--from", source, "--to", destination)
    additive = verify("--from", source, "--to", destination, "--additive")

    assert strict.exit_code == 1, strict.output
    assert _error_line(strict).endswith(": 1 extra session, 4 extra messages, 1 extra file record")
    assert additive.exit_code == 0, additive.output
    assert additive.stdout.rstrip().endswith(
        "; it also holds 1 session(s) and 1 file record(s) of its own"
    )


@pytest.mark.sqlite
def test_verify_refuses_what_is_not_two_stores_and_creates_nothing(tmp_path: Path) -> None:
    source = _filled(tmp_path, sessions=1)
    missing = tmp_path / "missing.db"
    linked = tmp_path / "link.db"
    linked.symlink_to(tmp_path / "source.db")
    not_a_database = tmp_path / "notes.txt"
    not_a_database.write_text("not a database\n")

    assert failed("verify", "--from", source, "--to", f"sqlite:///{missing}") == (
        f"error: --to: no database at {missing}: nothing stored yet"
    )
    assert not missing.exists()
    assert failed("verify", "--from", source, "--to", f"sqlite:///{tmp_path}/./source.db") == (
        "error: --from and --to name the same store"
    )
    assert failed("verify", "--url", f"sqlite:///{linked}", "--to", source) == (
        "error: --url and --to name the same store"
    )
    assert failed("verify", "--from", source, "--to", f"sqlite:///{not_a_database}") == (
        f"error: --to: open {not_a_database} failed: the file is not a SQLite database"
    )
    assert not_a_database.read_text() == "not a database\n"
    both = verify("--url", f"sqlite:///{missing}", "--from", source, "--to", source)
    assert both.exit_code == 2, both.output
    assert "--url and --from both name the source: give one" in both.output


@pytest.mark.postgresql
def test_verify_sqlite_against_postgresql_never_shows_the_password(
    tmp_path: Path,
    pg_url: str,  # noqa: F811
) -> None:
    url = make_url(pg_url)
    secret = url.password or "Sup3r-s3cret-pw"  # trust authentication takes any password
    destination = url.set(password=secret).render_as_string(hide_password=False)
    source = _filled(tmp_path, sessions=2)
    ok("migrate", "--from", source, "--to", destination)
    agree = verify("--from", source, "--to", destination, "-v")
    message_id = asyncio.run(_change(destination))

    differ = verify("--from", source, "--to", destination, "--json")
    backwards = verify("--from", destination, "--to", source)

    assert agree.exit_code == 0, agree.output
    assert "2 session(s), 8 message(s) and 2 file record(s) compared" in agree.stdout
    assert differ.exit_code == 1, differ.output
    report = json.loads(differ.stdout)
    assert (report["missing_sessions"], report["extra_sessions"]) == (1, 1)
    changed = [m for m in report["mismatches"] if m["problem"] == "different"]
    assert [m["id"] for m in changed if m["kind"] == "message"] == [message_id]
    # The source's side of the same differences, seen from PostgreSQL.
    assert backwards.exit_code == 1, backwards.output
    assert _error_line(backwards).endswith(
        ": 1 missing session, 1 missing message, 1 extra session, 4 extra messages,"
        " 1 differing session, 1 differing message"
    )
    for result in (agree, differ, backwards):
        assert secret not in result.output
    assert counts(source) == (2, 8, 2)


@pytest.mark.sqlite
def test_a_hostile_id_is_one_escaped_line(tmp_path: Path) -> None:
    source = tmp_path / "source.db"
    destination = f"sqlite:///{tmp_path / 'empty.db'}"
    ok("upgrade", "--url", destination)

    async def fill() -> None:
        async with SQLiteSessionStorage(source) as storage:
            session = ChatSession.create(model="m", session_id="a\u2028b\x1b]0;title\x07\nc")
            await storage.save_session(session)

    asyncio.run(fill())

    result = verify("--from", f"sqlite:///{source}", "--to", destination)

    assert result.exit_code == 1, result.output
    assert result.stdout == (
        "session 'a\\u2028b\\x1b]0;title\\x07\\nc': missing from the destination\n"
    )


@pytest.mark.sqlite
def test_emoji_codes_and_a_hostile_directory_print_as_they_are(tmp_path: Path) -> None:
    """Found by attack: rich wrote `:warning:` in an id or a value as an emoji (so the
    line named an id that does not exist), and a summary line printed the store's path
    raw: a directory named with `ESC]0;...` set the terminal's title, its line break
    forged a line."""
    source = tmp_path / "source.db"
    hostile = tmp_path / "x\x1b]0;PWNED\x07\nVerified: forged"
    hostile.mkdir()
    copy = f"sqlite:///{hostile / 'copy.db'}"

    async def fill() -> None:
        async with SQLiteSessionStorage(source) as storage:
            session = ChatSession.create(model="m", session_id="invoice:warning:2024")
            session.add_message("user", ":warning: :smile:")
            await storage.save_session(session)

    asyncio.run(fill())
    ok("migrate", "--from", f"sqlite:///{source}", "--to", copy)
    agree = verify("--from", f"sqlite:///{source}", "--to", copy)
    ok("sessions", "delete", "invoice:warning:2024", "--url", copy)
    differ = verify("--from", f"sqlite:///{source}", "--to", copy)
    gone = CliRunner().invoke(app, ["sessions", "delete", "invoice:warning:2024", "--url", copy])

    assert agree.exit_code == 0, agree.output
    assert agree.stdout.count("\n") == 1 and "\x1b" not in agree.stdout
    assert "/x\\x1b]0;PWNED\\x07\\nVerified: forged/copy.db holds what" in agree.stdout
    assert differ.stdout == "session 'invoice:warning:2024': missing from the destination\n"
    assert _error_line(gone).startswith("error: session 'invoice:warning:2024' not found in ")


@pytest.mark.postgresql
def test_one_postgresql_database_by_another_spelling_is_not_verified_against_itself(
    pg_url: str,  # noqa: F811
) -> None:
    ok("demo", "--url", pg_url)
    url = make_url(pg_url)
    spellings = [
        url.set(drivername="postgres", port=url.port or 5432),
        url.set(host="localhost" if url.host != "localhost" else "127.0.0.1"),
        url.update_query_dict({"application_name": "verify"}),
    ]
    for other in spellings:
        result = verify("--from", pg_url, "--to", other.render_as_string(hide_password=False))
        assert result.exit_code == 1, (other, result.output)
        assert "error: source and destination are the same store (" in _error_line(result)


def _persistence(*args: str, **environment: str) -> subprocess.CompletedProcess[bytes]:
    """`python -m persistence ARGS` in a process of its own (stdout and stderr pipes, not
    terminals), without COLUMNS."""
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"} | environment
    return subprocess.run(
        [sys.executable, "-m", "persistence", *args],
        cwd=Path(__file__).parent.parent,
        env=env,
        capture_output=True,
        check=False,
    )


@pytest.mark.sqlite
def test_every_summary_is_one_line_however_its_path_is_named(tmp_path: Path) -> None:
    """Found by attack, after say(): `export-all -` wrapped its summary on stderr at 80
    columns, `demo` and `stats` printed a path's ESC and line break raw, and a file name
    that is not UTF-8 failed `upgrade` after its work, printing the summary where stdout
    encodes strictly."""
    long = tmp_path / ("a-rather-long-directory-name-" + "x" * 60) / "chat.db"
    long.parent.mkdir()
    hostile = tmp_path / "d-\x1b]0;PWNED\x07-\nForged line" / "x.db"
    hostile.parent.mkdir()
    not_utf8 = tmp_path / os.fsdecode(b"st-\xff\xfe.db")

    assert _persistence("--url", f"sqlite:///{long}", "demo").returncode == 0
    exported = _persistence("--url", f"sqlite:///{long}", "export-all", "-")
    results = [_persistence("--url", f"sqlite:///{hostile}", c) for c in ("demo", "stats")]
    upgraded = _persistence(
        "--url", f"sqlite:///{not_utf8}", "upgrade", PYTHONIOENCODING="utf-8:strict"
    )

    assert exported.returncode == 0, exported.stderr
    summary = [s for s in exported.stderr.decode().splitlines() if s.startswith("Exported ")]
    assert len(summary) == 1 and summary[0].endswith(
        f"{long} to standard output ({len(exported.stdout)} bytes)"
    ), exported.stderr
    for result in results:
        assert result.returncode == 0, result.stderr
        assert b"\x1b" not in result.stdout and b"\nForged line" not in result.stdout
        assert b"\\x1b]0;PWNED\\x07-\\nForged line" in result.stdout
    assert upgraded.returncode == 0, upgraded.stderr
    assert upgraded.stdout.decode().endswith(
        "/st-\\udcff\\udcfe.db: schema is at head"
        f" (revision {script_directory().get_current_head()})\n"
    )
