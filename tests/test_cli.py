"""The `persistence` command line, through typer's CliRunner on real stores."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import sqlite3
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from importlib.metadata import entry_points
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from persistence import ChatSession, SQLiteSessionStorage
from persistence.cli import app
from persistence.sql.revisions import HEAD
from tests.factories import file_record
from tests.installs import clean_environment, fresh_install

# An empty current directory and no STORAGE_* variable or config file: a fresh machine.
pytestmark = pytest.mark.usefixtures("workdir")

ROOT = Path(__file__).resolve().parent.parent
SECRET = "Sup3r-s3cret-pw"
COMMANDS = [
    [],
    ["upgrade"],
    ["sessions"],
    ["sessions", "list"],
    ["sessions", "show"],
    ["sessions", "delete"],
    ["sessions", "archive"],
    ["export"],
    ["stats"],
    ["cleanup"],
    ["demo"],
]


def invoke(*args: str) -> Result:
    return CliRunner().invoke(app, list(args))


def ok(*args: str) -> Result:
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    return result


def failed(*args: str) -> str:
    """Runs a command that must fail: exit 1, one error line, no traceback."""
    result = invoke(*args)
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.output
    return lines[0]


def _demo_session_id(output: str) -> str:
    line = next(line for line in output.splitlines() if line.strip().startswith("session "))
    return line.split()[1]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "app")
def test_help_on_every_command(command: list[str]) -> None:
    result = ok(*command, "--help")
    assert "Usage:" in result.output
    if command and command != ["sessions"]:
        assert "--config" in result.output and "--url" in result.output


@pytest.mark.sqlite
def test_demo_on_a_fresh_machine_then_look_at_it(workdir: Path) -> None:
    result = ok("demo")
    database = workdir / "gemini_sessions.db"
    assert database.is_file()
    assert str(database) in result.stdout
    session_id = _demo_session_id(result.stdout)
    assert "with 4 messages" in result.stdout
    assert "file record demo-" in result.stdout

    listing = ok("sessions", "list")
    assert session_id in listing.stdout and "gemini-2.5-flash" in listing.stdout
    shown = ok("sessions", "show", session_id)
    assert "Hello! Can you summarise the file I just uploaded?" in shown.stdout
    markdown = ok("export", session_id, "--format", "markdown").stdout
    assert markdown.startswith(f"# Chat Session: {session_id}\n")
    assert markdown.count("### 👤 User") == 2 and markdown.count("### 🤖 Assistant") == 2
    stats = json.loads(ok("stats", "--json").stdout)
    assert stats["backend"] == "sqlite"
    assert (stats["total_sessions"], stats["total_messages"], stats["total_files"]) == (1, 4, 1)


@pytest.mark.sqlite
def test_demo_on_an_existing_store_only_adds(tmp_path: Path) -> None:
    """Found by attack: the demo ran startup(), whose expiry sweep expired an idle
    session and deleted an expired file record of the store it was pointed at,
    saying nothing of it."""
    path = tmp_path / "store.db"
    old = ChatSession.create("m")
    old.add_message("user", "from January")
    old.updated_at = datetime(2026, 1, 1, tzinfo=UTC)
    record = file_record(file_id="old-file", expires_in=-timedelta(days=30))

    async def seed() -> None:
        async with SQLiteSessionStorage(path) as storage:
            await storage.save_session(old)
            await storage.save_file_record(record)

    asyncio.run(seed())
    ok("--url", f"sqlite:///{path}", "demo")

    async def look() -> tuple[str | None, bool]:
        async with SQLiteSessionStorage(path) as storage:
            kept = await storage.load_session(old.session_id)
            return kept and kept.status, await storage.load_file_record("old-file") is not None

    assert asyncio.run(look()) == ("active", True)


@pytest.mark.sqlite
def test_the_commands_demo_suggests_run_as_printed(tmp_path: Path) -> None:
    config = tmp_path / "conf.yaml"
    config.write_text(f"storage:\n  database_path: {tmp_path / 'chat.db'}\n")
    result = ok("--config", str(config), "demo")
    suggested = [
        line.strip()
        for line in result.stdout.splitlines()
        if line.strip().startswith("persistence ")
    ]
    assert len(suggested) == 4
    for line in suggested:
        words = shlex.split(line)[1:]
        assert ok(*words).stdout.strip()
    assert not Path("gemini_sessions.db").exists()


@pytest.mark.sqlite
def test_sessions_list_pages_filters_and_prints_json(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'x.db'}"
    ids = [_demo_session_id(ok("demo", "--url", url).stdout) for _ in range(3)]
    listed = json.loads(ok("sessions", "list", "--json", "--url", url).stdout)
    assert [s["session_id"] for s in listed] == ids[::-1]
    assert all(s["message_count"] == 4 and "messages" not in s for s in listed)
    page = json.loads(
        ok("--url", url, "sessions", "list", "--json", "--limit", "1", "--offset", "1").stdout
    )
    assert [s["session_id"] for s in page] == [ids[1]]
    assert (
        json.loads(ok("sessions", "list", "--status", "archived", "--json", "--url", url).stdout)
        == []
    )
    assert "More follow: --offset 2" in ok("sessions", "list", "--limit", "2", "--url", url).stdout
    assert "More" not in ok("sessions", "list", "--limit", "3", "--url", url).stdout
    assert invoke("sessions", "list", "--status", "gone", "--url", url).exit_code == 2


@pytest.mark.sqlite
def test_list_limits_are_bounded_and_exact(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'x.db'}"
    ok("demo", "--url", url)
    # Exactly one session and --limit 1: nothing more to follow.
    listed = ok("sessions", "list", "--limit", "1", "--url", url).stdout
    assert "gemini-2.5-flash" in listed and "More" not in listed
    for command in (["sessions", "list"], ["search", "milk"]):
        for limit in ("0", "100000000000000000000", "-1"):
            result = invoke(*command, "--limit", limit, "--url", url)
            assert result.exit_code == 2, result.output
            assert "Invalid value for '--limit'" in result.output
            assert "OverflowError" not in result.output
    huge = invoke("sessions", "list", "--offset", "100000000000000000000", "--url", url)
    assert huge.exit_code == 2 and "Invalid value for '--offset'" in huge.output


@pytest.mark.sqlite
def test_export_to_a_file_in_each_format(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'x.db'}"
    session_id = _demo_session_id(ok("demo", "--url", url).stdout)
    for fmt, marker in (("json", '"messages"'), ("text", "] ASSISTANT:"), ("markdown", "### 🤖")):
        target = tmp_path / f"out.{fmt}"
        result = ok("export", session_id, "--format", fmt, "--output", str(target), "--url", url)
        assert str(target) in result.stdout
        assert marker in target.read_text(encoding="utf-8")
    document = json.loads((tmp_path / "out.json").read_text(encoding="utf-8"))
    assert document["session_id"] == session_id and len(document["messages"]) == 4
    line = failed("export", "nope", "--url", url, "-o", str(tmp_path / "nope.json"))
    assert "session 'nope' not found" in line
    assert not (tmp_path / "nope.json").exists()
    assert "session 'nope' not found" in failed("sessions", "show", "nope", "--url", url)


@pytest.mark.sqlite
def test_cleanup_expires_idle_sessions(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'x.db'}"
    ok("demo", "--url", url)
    result = json.loads(ok("cleanup", "--json", "--url", url).stdout)
    assert result == {
        "database": url,
        "expired_sessions": 0,
        "expired_files_deleted": 0,
        "deletion_records_forgotten": 0,
    }
    # Any session is idle for longer than a millisecond.
    result = json.loads(ok("cleanup", "--json", "--expiry-hours", "0.0000001", "--url", url).stdout)
    assert result["expired_sessions"] == 1
    assert json.loads(ok("stats", "--json", "--url", url).stdout)["expired_sessions"] == 1
    assert f"Expired 0 session(s) of {url} not updated" in ok("cleanup", "--url", url).stdout
    assert "--expiry-hours" in failed("cleanup", "--expiry-hours", "0", "--url", url)


@pytest.mark.sqlite
def test_cleanup_forgets_the_records_of_old_deletions(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'x.db'}"
    ok("demo", "--url", url)
    [session_id] = [
        row["session_id"]
        for row in json.loads(ok("sessions", "list", "--json", "--url", url).stdout)
    ]
    ok("sessions", "delete", session_id, "--url", url)

    result = json.loads(ok("cleanup", "--json", "--url", url).stdout)
    assert result["deletion_records_forgotten"] == 0
    result = json.loads(
        ok("cleanup", "--json", "--deletion-record-days", "1e-9", "--url", url).stdout
    )
    assert result["deletion_records_forgotten"] == 1
    with sqlite3.connect(tmp_path / "x.db") as connection:
        assert connection.execute("SELECT count(*) FROM chat_session_deletions").fetchone() == (0,)
    for days in ("0", "-1", "nan", "inf", "1e300", "416667"):
        line = failed("cleanup", "--deletion-record-days", days, "--url", url)
        assert line.startswith("error: --deletion-record-days: must be more than 0"), line
        assert "at most 416,666," in line  # the bound it names is accepted
    ok("cleanup", "--deletion-record-days", "416666", "--url", url)


@pytest.mark.sqlite
def test_cleanup_refuses_expiry_hours_no_date_can_reach(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'x.db'}"
    ok("demo", "--url", url)
    for hours in ("inf", "1e308", "nan", "-1", "10000001"):
        line = failed("cleanup", "--expiry-hours", hours, "--url", url)
        assert line.startswith("error: --expiry-hours: must be more than 0 and at most"), line
    assert "Expired 0 session(s)" in ok("cleanup", "--expiry-hours", "1e7", "--url", url).stdout


@pytest.mark.sqlite
def test_upgrade_brings_a_fresh_database_to_head_and_refuses_an_unknown_revision(
    tmp_path: Path,
) -> None:
    database = tmp_path / "x.db"
    url = f"sqlite:///{database}"
    assert "schema is at head" in ok("upgrade", "--url", url).stdout
    with sqlite3.connect(database) as connection:
        tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master")}
        assert {"chat_sessions", "chat_messages", "uploaded_files"} <= tables
        connection.execute("UPDATE persistence_alembic_version SET version_num = 'f00dfeed'")
    line = failed("upgrade", "--url", url)
    assert "f00dfeed" in line and "newer version" in line
    assert "f00dfeed" in failed("stats", "--url", url)


@pytest.mark.sqlite
def test_reading_commands_do_not_create_a_database(workdir: Path) -> None:
    for command in (["stats"], ["sessions", "list"], ["cleanup"], ["export", "x"]):
        assert "no database at gemini_sessions.db" in failed(*command)
    assert list(workdir.iterdir()) == []


def test_wrong_configuration_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert "not found" in failed("stats", "--config", str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("storage:\n  max_pool_size: many\n")
    line = failed("--config", str(bad), "stats")
    assert "max_pool_size" in line and "bad.yaml" in line
    assert "scheme mysql://" in failed("stats", "--url", "mysql://u@h/db")
    monkeypatch.setenv("STORAGE_BACKEND", "oracle")
    assert "STORAGE_BACKEND" in failed("demo")


def test_a_bad_port_query_parameter_or_path_is_one_line_naming_the_setting(
    tmp_path: Path,
) -> None:
    for url, expected in (
        (f"postgresql://app:{SECRET}@127.0.0.1:99999/app", "port 99999 is not between"),
        ("postgresql://app@127.0.0.1:5432/app?sslmode=requir", "sslmode='requir' is not one"),
        ("postgresql://app@127.0.0.1:5432/app?sslmod=require", "query parameter 'sslmod'"),
        ("postgresql://app@127.0.0.1:5432/app?connect_timeout=3", "connect_timeout"),
    ):
        line = failed("stats", "--url", url)
        assert "connection_string (from the URL)" in line and expected in line, line
        assert SECRET not in line
    config = tmp_path / "nul.yaml"
    config.write_text('storage:\n  database_path: "a\\0b.db"\n', encoding="utf-8")
    for command in (["demo"], ["stats"], ["upgrade"]):
        line = failed("--config", str(config), *command)
        assert "storage setting database_path (from config file" in line, line
        assert "NUL byte" in line


@pytest.mark.postgresql
def test_libpq_query_parameters_work_on_the_command_line(postgresql_url: str) -> None:
    ok("upgrade", "--url", postgresql_url)
    database = postgresql_url.rpartition("/")[2]
    for query in (
        "sslmode=disable",
        "sslmode=prefer&application_name=persistence%20cli",
        f"dbname={database}&target_session_attrs=any",
    ):
        result = ok("stats", "--json", "--url", f"{postgresql_url}?{query}")
        assert json.loads(result.stdout)["backend"] == "postgresql"


@pytest.mark.postgresql
def test_unreachable_server_is_one_line_without_the_password() -> None:
    url = f"postgresql://app:{SECRET}@127.0.0.1:1/app"
    for args in (["stats", "--url", url], ["-vv", "upgrade", "--url", url]):
        result = invoke(*args)
        assert result.exit_code == 1
        assert "database unreachable" in result.stderr
        assert SECRET not in result.output
        assert "Traceback" not in result.output


@pytest.mark.sqlite
def test_verbose_logs_to_stderr(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'x.db'}"
    quiet = ok("upgrade", "--url", url)
    assert quiet.stderr == ""
    loud = ok("upgrade", "--url", url, "-v")
    assert "store: sqlite:///" in loud.stderr
    assert loud.stdout == quiet.stdout


@pytest.mark.postgresql
def test_demo_and_friends_on_postgresql(postgresql_url: str) -> None:
    import asyncio

    from persistence import PostgreSQLSessionStorage

    async def empty() -> None:
        from sqlalchemy import text

        async with PostgreSQLSessionStorage(postgresql_url, 1, 1) as storage:
            statement = text("TRUNCATE chat_messages, chat_sessions, uploaded_files CASCADE")
            async with storage.engine.begin() as connection:
                await connection.execute(statement)

    asyncio.run(empty())
    # The local server trusts every connection, so any password works and none may show.
    from sqlalchemy import make_url

    url = make_url(postgresql_url).set(password=SECRET).render_as_string(hide_password=False)
    result = ok("--url", url, "demo", "-v")
    assert SECRET not in result.output
    masked = shlex.quote(url.replace(SECRET, "***"))
    assert f"persistence --url {masked} sessions list" in result.stdout
    assert "*** stands for the password" in result.stdout
    session_id = _demo_session_id(result.stdout)
    listing = ok("sessions", "list", "--url", url).stdout
    assert session_id in listing and SECRET not in listing
    stats = json.loads(ok("stats", "--json", "--url", url).stdout)
    assert (stats["backend"], stats["total_sessions"], stats["total_files"]) == ("postgresql", 1, 1)
    assert stats["database"] == url.replace(SECRET, "***")
    text = ok("export", session_id, "-f", "text", "--url", url).stdout
    assert text.startswith(f"Chat Session: {session_id}\n")
    assert "schema is at head" in ok("upgrade", "--url", url).stdout


def test_python_dash_m_and_the_console_script_run_the_same_app(workdir: Path) -> None:
    (script,) = entry_points(group="console_scripts", name="persistence")
    assert script.value == "persistence.cli:main"
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("STORAGE_")}
    env["PYTHONPATH"] = str(ROOT)
    result = subprocess.run(
        [sys.executable, "-m", "persistence", "demo"],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "Look at them with:" in result.stdout
    assert (workdir / "gemini_sessions.db").is_file()


@pytest.mark.sqlite
def test_stored_text_that_looks_like_rich_markup_prints_as_it_is(tmp_path: Path) -> None:
    import asyncio

    from persistence import ChatSession, SQLiteSessionStorage

    database = tmp_path / "[x].db"

    async def store() -> str:
        async with SQLiteSessionStorage(database) as storage:
            session = ChatSession.create("[bold]model[/bold]")
            session.add_message("user", "[red]not red[/red] and [link=x]y[/link]")
            await storage.save_session(session)
            return session.session_id

    session_id = asyncio.run(store())
    url = f"sqlite:///{database}"
    assert "[bold]model[/bold]" in ok("sessions", "list", "--url", url).stdout
    shown = ok("sessions", "show", session_id, "--url", url).stdout
    assert "[red]not red[/red] and [link=x]y[/link]" in shown
    target = tmp_path / "[out].md"
    assert str(target) in ok("export", session_id, "-o", str(target), "--url", url).stdout
    assert f"sqlite:///{database}: schema is at head" in ok("upgrade", "--url", url).stdout


@pytest.mark.sqlite
def test_console_script_demo_in_a_fresh_venv(tmp_path: Path) -> None:
    venv = fresh_install(tmp_path)
    env = clean_environment()
    home = tmp_path / "fresh"
    home.mkdir()
    for args in (["demo"], ["stats", "--json"]):
        done = subprocess.run(
            [str(venv / "bin" / "persistence"), *args],
            cwd=home,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["total_messages"] == 4
    assert (home / "gemini_sessions.db").is_file()


@pytest.mark.sqlite
def test_sessions_archive_and_delete(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'x.db'}"
    kept, gone = (_demo_session_id(ok("demo", "--url", url).stdout) for _ in range(2))
    # Each names the store it changed (found by attack: a STORAGE_* variable left in
    # the shell could point a command at another store than the one meant).
    archived = ok("sessions", "archive", kept, "--url", url).stdout
    assert archived == f"Archived session {kept} in {url}.\n"
    again = ok("sessions", "archive", kept, "--url", url).stdout
    assert again == f"Session {kept} in {url} was already archived.\n"
    archived = json.loads(
        ok("sessions", "list", "--status", "archived", "--json", "--url", url).stdout
    )
    assert [s["session_id"] for s in archived] == [kept]

    deleted = ok("sessions", "delete", gone, "--url", url).stdout
    assert deleted == f"Deleted session {gone} and its messages from {url}.\n"
    assert "not found" in failed("sessions", "delete", gone, "--url", url)
    assert "not found" in failed("sessions", "archive", gone, "--url", url)
    listed = json.loads(ok("sessions", "list", "--json", "--url", url).stdout)
    assert [s["session_id"] for s in listed] == [kept]
    assert json.loads(ok("stats", "--json", "--url", url).stdout)["total_messages"] == 4


@pytest.mark.sqlite
def test_store_options_work_at_every_level_and_choices_ignore_case(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'x.db'}"
    session_id = _demo_session_id(ok("demo", "--url", url).stdout)
    for args in (
        ["--url", url, "sessions", "list", "--json"],
        ["sessions", "--url", url, "list", "--json"],
        ["sessions", "list", "--url", url, "--json"],
        ["sessions", "-v", "--url", url, "list", "--json"],
        # The innermost wins: the top-level URL names no database.
        ["--url", "sqlite:///missing.db", "sessions", "--url", url, "list", "--json"],
    ):
        listed = json.loads(ok(*args).stdout)
        assert [s["session_id"] for s in listed] == [session_id], args
    assert "no database at missing.db" in failed(
        "sessions", "--url", url, "list", "--url", "sqlite:///missing.db"
    )
    markdown = ok("export", session_id, "-f", "MARKDOWN", "--url", url).stdout
    assert markdown.startswith(f"# Chat Session: {session_id}")
    assert json.loads(ok("sessions", "list", "--status", "Active", "--json", "--url", url).stdout)
    assert ok("search", "milk", "--role", "ASSISTANT", "--url", url).exit_code == 0


@pytest.mark.sqlite
def test_an_empty_url_is_refused_at_every_level(workdir: Path) -> None:
    # `--url "$DATABASE_URL"` with the variable unset must not fall back to the default store.
    for args in (
        ["--url", "", "upgrade"],
        ["upgrade", "--url", ""],
        ["sessions", "--url", "", "list"],
        ["sessions", "list", "--url", ""],
    ):
        assert "URL: no scheme" in failed(*args), args
    assert os.listdir(workdir) == []


DRIVERS = ("sqlalchemy", "alembic", "aiosqlite", "asyncpg", "pymongo", "beanie", "motor")
# Runs `python -m persistence ARGS` in this process, then lists the drivers it loaded.
LOADED_DRIVERS = f"""
import runpy, sys
sys.argv = ["persistence", *sys.argv[1:]]
try:
    runpy.run_module("persistence", run_name="__main__", alter_sys=True)
except SystemExit:
    pass
print("LOADED", sorted(m for m in {DRIVERS!r} if m in sys.modules))
"""


def _run_listing_drivers(workdir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`python -m persistence ARGS` in a process of its own, which then prints the
    drivers it loaded (a line `LOADED [...]`)."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("STORAGE_")}
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run(
        [sys.executable, "-c", LOADED_DRIVERS, *args],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["sessions", "--help"]])
def test_help_and_version_import_no_backend(workdir: Path, args: list[str]) -> None:
    done = _run_listing_drivers(workdir, *args)
    assert "LOADED []" in done.stdout, done.stdout
    assert ("Usage:" if "--help" in args else "persistence ") in done.stdout


@pytest.mark.sqlite
def test_commands_on_a_store_at_head_import_no_alembic(workdir: Path) -> None:
    """A store at head is checked by its version table alone: importing alembic took
    about 120 ms of every command (persistence.sql.revisions). Creating one runs it."""
    url = "sqlite:///store.db"
    created = _run_listing_drivers(workdir, "--url", url, "upgrade")
    assert "'alembic'" in created.stdout, created.stdout
    for args in (["stats"], ["sessions", "list"], ["upgrade"]):
        done = _run_listing_drivers(workdir, "--url", url, *args)
        assert "'sqlalchemy'" in done.stdout and "'alembic'" not in done.stdout, (args, done)
    assert f"schema is at head (revision {HEAD})" in done.stdout


def test_version_prints_the_installed_version() -> None:
    from importlib.metadata import version

    assert ok("--version").stdout == f"persistence {version('persistence')}\n"


HOSTILE = "\x1b[31mred\x1b[0m \x1b]0;owned\x07 bell\x07 back\x08 csi\x9b2J [bold]x[/bold]"


@pytest.mark.sqlite
def test_terminal_escapes_in_stored_text_print_visibly(tmp_path: Path) -> None:
    import asyncio

    from persistence import ChatSession, SQLiteSessionStorage

    database = tmp_path / "x.db"

    async def store() -> str:
        async with SQLiteSessionStorage(database) as storage:
            session = ChatSession.create("model\x1b[5m", metadata={"title": "t\x1b]0;x\x07"})
            session.add_message("user", f"line one\n{HOSTILE}\ttab\r\nlast")
            await storage.save_session(session)
            return session.session_id

    session_id = asyncio.run(store())
    url = f"sqlite:///{database}"
    outputs = {
        "show": ok("sessions", "show", session_id, "--url", url).stdout,
        "list": ok("sessions", "list", "--url", url).stdout,
        "search": ok("search", "bell", "--url", url).stdout,
        "text": ok("export", session_id, "-f", "text", "--url", url).stdout,
        "markdown": ok("export", session_id, "-f", "markdown", "--url", url).stdout,
    }
    target = tmp_path / "out.md"
    ok("export", session_id, "-f", "markdown", "-o", str(target), "--url", url)
    outputs["markdown file"] = target.read_text(encoding="utf-8")
    for name, text in outputs.items():
        for control in ("\x1b", "\x07", "\x08", "\x9b"):
            assert control not in text, (name, control)
        assert "\\x1b" in text, name
    for name in ("show", "text", "markdown", "markdown file"):
        assert (
            "\\x1b[31mred\\x1b[0m \\x1b]0;owned\\x07 bell\\x07 back\\x08 csi\\x9b2J"
            in (outputs[name])
        )
        assert "[bold]x[/bold]" in outputs[name] and "tab\nlast" in outputs[name]
    # JSON keeps every character exactly.
    exported = json.loads(ok("export", session_id, "-f", "json", "--url", url).stdout)
    assert exported["messages"][0]["content"] == f"line one\n{HOSTILE}\ttab\r\nlast"
    assert exported["model"] == "model\x1b[5m"


@pytest.mark.sqlite
def test_show_writes_every_message_of_a_long_session_in_order(tmp_path: Path) -> None:
    """`sessions show` writes its messages in parts (SHOWN_PER_PRINT a print): across
    the parts' bounds every message is a blank line, its header, its text, in order."""
    from persistence.cli.sessions import SHOWN_PER_PRINT
    from persistence.formats import wall_time

    database = tmp_path / "x.db"
    count = 2 * SHOWN_PER_PRINT + 3
    contents = [
        f"m{i}\r\n[12:00:01] ASSISTANT: forged {i}\tend" if i % 7 == 0 else f"m{i}"
        for i in range(count)
    ]

    async def store() -> ChatSession:
        async with SQLiteSessionStorage(database) as storage:
            session = ChatSession.create("m")
            for index, content in enumerate(contents):
                session.add_message("user" if index % 2 == 0 else "assistant", content)
            await storage.save_session(session)
            return session

    session = asyncio.run(store())
    shown = ok("sessions", "show", session.session_id, "--url", f"sqlite:///{database}").stdout
    lines = shown.split("\n")
    first = lines.index("Messages: " + str(count)) + 1
    expected: list[str] = []
    for message in session.messages:
        expected += ["", f"[{wall_time(message.created_at)}] {message.role.upper()}"]
        index = int(message.content.split("\r")[0][1:])
        if index % 7 == 0:
            # A header-shaped line is indented; rich writes a tab as spaces to its stop.
            forged = f"  [12:00:01] ASSISTANT: forged {index}\tend".expandtabs(8)
            expected += [f"m{index}", forged]
        else:
            expected.append(f"m{index}")
    assert lines[first:] == [*expected, ""]


def test_show_bounds_each_print_by_lines_and_characters() -> None:
    """Found by attack: 256 messages of 2,000 line breaks each, printed as one Text,
    took 569 MB where one message at a time took 87. A print ends after the message
    that brings it to its bound of lines or characters."""
    from persistence.cli.sessions import (
        SHOWN_CHARACTERS_PER_PRINT,
        SHOWN_LINES_PER_PRINT,
        _parts_shown,
    )

    session = ChatSession.create("m")
    for _ in range(300):
        session.add_message("tool", "line\n" * 200)
    for _ in range(10):
        session.add_message("tool", "x" * 100_000)
    parts = [part.plain for part in _parts_shown(session.messages)]
    assert "\n".join(parts).count("\nline") == 300 * 200
    one_message = 3 + 200
    for part in parts:
        assert part.count("\n") + 1 < SHOWN_LINES_PER_PRINT + one_message
        assert len(part) < SHOWN_CHARACTERS_PER_PRINT + 100_100


@pytest.mark.sqlite
def test_a_role_set_by_hand_shows_escaped_in_its_headers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by attack: a role past the CHECK constraint (`us\rer`) lost its CR in
    rich, which moved the styles of every later header of `sessions show`; and its
    escapes (`x\x1b[31m`) were written raw in `show` and text exports."""
    database = tmp_path / "x.db"

    async def store() -> str:
        async with SQLiteSessionStorage(database) as storage:
            session = ChatSession.create("m")
            for content in ("a", "b", "c"):
                session.add_message("user", content)
            await storage.save_session(session)
            return session.session_id

    session_id = asyncio.run(store())
    with sqlite3.connect(database) as connection:
        connection.execute("PRAGMA ignore_check_constraints = 1")
        for content, role in (("a", "us\rer"), ("b", "x\x1b[31m")):
            connection.execute(
                "UPDATE chat_messages SET role = ? WHERE content = ?", (role, content)
            )
    url = f"sqlite:///{database}"
    monkeypatch.setenv("FORCE_COLOR", "1")
    monkeypatch.delenv("NO_COLOR", raising=False)
    shown = ok("sessions", "show", session_id, "--url", url).stdout
    roles = re.findall(r"\x1b\[1;36m(.*?)\x1b\[0m\n(.)\n", shown)
    assert roles == [("US\\rER", "a"), ("X\\x1b[31M", "b"), ("USER", "c")]
    text = ok("export", session_id, "-f", "text", "--url", url).stdout
    assert "] US\\rER:\n" in text and "] X\\x1b[31M:\n" in text and "\x1b" not in text
    markdown = ok("export", session_id, "-f", "markdown", "--url", url).stdout
    assert "### US\\rER (" in markdown and " User (" in markdown


FORGED_ID = "00000000-dead-beef-0000-000000000000"


@pytest.mark.sqlite
def test_line_breaks_in_one_line_fields_cannot_forge_a_row_or_a_header(tmp_path: Path) -> None:
    """Found by attack: a model name holding a line break printed a `sessions list` row
    of its own, with a forged session id (a CR drew one over the real id), and a
    message line shaped like `sessions show`'s headers printed as one."""
    import asyncio

    from persistence import ChatSession, SQLiteSessionStorage

    database = tmp_path / "x.db"
    forged_row = f"{FORGED_ID}  gpt-4  archived  99  2020-01-01 00:00:00"

    async def store() -> tuple[str, str]:
        async with SQLiteSessionStorage(database) as storage:
            first = ChatSession.create(f"gpt-4\n{forged_row}")
            first.add_message("user", "hi\n\n[2026-12-05 11:00:00] ASSISTANT\nforged reply")
            second = ChatSession.create(f"claude\r{FORGED_ID}", session_id=f"id\r\n{FORGED_ID}")
            second.add_message("user", "hi again")
            await storage.save_session(first)
            await storage.save_session(second)
            return first.session_id, second.session_id

    first_id, second_id = asyncio.run(store())
    url = f"sqlite:///{database}"
    listing = ok("sessions", "list", "--url", url).stdout
    rows = listing.splitlines()[2:]
    assert len(rows) == 2 and "\r" not in listing
    assert not any(row.startswith(FORGED_ID) for row in rows)
    assert f"gpt-4\\n{forged_row}" in listing and f"claude\\r{FORGED_ID}" in listing
    assert f"id\\r\\n{FORGED_ID}" in listing
    shown = ok("sessions", "show", first_id, "--url", url).stdout
    assert f"Model: gpt-4\\n{forged_row}" in shown
    assert "\n  [2026-12-05 11:00:00] ASSISTANT\nforged reply" in shown
    headers = [line for line in shown.splitlines() if line.startswith("[")]
    assert len(headers) == 1 and headers[0].endswith("] USER")
    shown = ok("sessions", "show", second_id, "--url", url).stdout
    assert shown.splitlines()[0] == f"Session id\\r\\n{FORGED_ID}"
    found = ok("search", "hi", "--url", url).stdout
    assert "\r" not in found and FORGED_ID in found
    assert all(f"\\n{FORGED_ID}" in line for line in found.splitlines() if FORGED_ID in line)


@pytest.mark.sqlite
def test_ids_that_differ_by_an_invisible_character_list_apart(tmp_path: Path) -> None:
    """Found by attack: `victim`, `vic\\u200btim` and `vict\\u2060im` listed as three rows
    reading `victim`; `sessions delete victim` then took the one the operator had not
    meant. The invisible characters of ids and models print as escapes."""
    import asyncio

    from persistence import ChatSession, SQLiteSessionStorage

    database = tmp_path / "x.db"
    ids = ["victim", "vic\u200btim", "vict\u2060im", "victim\u00a0", "\ufeffvictim"]

    async def store() -> None:
        async with SQLiteSessionStorage(database) as storage:
            for session_id in ids:
                session = ChatSession.create("gpt\u200d-4", session_id=session_id)
                session.add_message("user", "look alike")
                await storage.save_session(session)

    asyncio.run(store())
    url = f"sqlite:///{database}"
    listing = ok("sessions", "list", "--url", url).stdout
    shown_ids = {row.split()[0] for row in listing.splitlines()[2:]}
    assert shown_ids == {"victim", "vic\\u200btim", "vict\\u2060im", "victim\\xa0", "\\ufeffvictim"}
    assert "gpt\\u200d-4" in listing
    found = ok("search", "alike", "--url", url).stdout
    assert "vic\\u200btim" in found and "\u200b" not in found
    shown = ok("sessions", "show", "vict\u2060im", "--url", url).stdout
    assert shown.splitlines()[0] == "Session vict\\u2060im"
