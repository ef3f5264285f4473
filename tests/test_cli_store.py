"""How the CLI opens a store: reading commands never write, bad inputs leave nothing behind."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from persistence import SQLiteSessionStorage, StorageConnectionError
from persistence.cli import app
from tests import servers

ROOT = Path(__file__).resolve().parents[1]
READING = [
    ["stats"],
    ["sessions", "list"],
    ["sessions", "show", "abc"],
    ["export", "abc"],
    ["search", "hello"],
]


def invoke(*args: str) -> Result:
    return CliRunner().invoke(app, list(args))


def failed(*args: str) -> str:
    result = invoke(*args)
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def _reading_commands(workdir: Path) -> list[list[str]]:
    return [*READING, ["export-all", str(workdir / "all.json")], ["backup", str(workdir / "bk")]]


@pytest.mark.sqlite
def test_reading_commands_leave_another_applications_sqlite_file_byte_identical(
    workdir: Path,
) -> None:
    other = workdir / "app.db"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY, item TEXT)")
        db.execute("INSERT INTO orders VALUES (1, 'tea')")
    db.close()
    before, listing = other.read_bytes(), sorted(os.listdir(workdir))

    for command in _reading_commands(workdir):
        assert "another application" in failed(*command, "--url", f"sqlite:///{other}")

    assert other.read_bytes() == before
    assert sorted(os.listdir(workdir)) == listing


@pytest.mark.postgresql
def test_reading_commands_add_no_table_to_another_applications_postgresql_database(
    workdir: Path, postgresql_admin_url: str
) -> None:
    with servers.throwaway_postgresql_database(postgresql_admin_url) as url:
        asyncio.run(_pg(url, "CREATE TABLE orders (id int)"))
        for command in _reading_commands(workdir):
            assert "another application" in failed(*command, "--url", url)
        assert asyncio.run(_pg_tables(url)) == ["orders"]


async def _pg(url: str, statement: str) -> None:
    import asyncpg

    connection = await asyncpg.connect(url)
    try:
        await connection.execute(statement)
    finally:
        await connection.close()


async def _pg_tables(url: str) -> list[str]:
    import asyncpg

    connection = await asyncpg.connect(url)
    try:
        rows = await connection.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY 1"
        )
        return [row[0] for row in rows]
    finally:
        await connection.close()


@pytest.mark.sqlite
def test_reading_commands_on_an_empty_sqlite_file_ask_for_an_upgrade(workdir: Path) -> None:
    empty = workdir / "empty.db"
    sqlite3.connect(empty).close()

    for command in READING:
        assert "persistence upgrade" in failed(*command, "--url", f"sqlite:///{empty}")
    assert empty.read_bytes() == b""


CHANGING = [["sessions", "delete", "abc"], ["sessions", "archive", "abc"], ["cleanup"]]


@contextmanager
def _sql_database(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The URL of an empty database (a SQLite file not there yet)."""
    if backend == "sqlite":
        (tmp_path / "store").mkdir()
        yield f"sqlite:///{tmp_path / 'store' / 'store.db'}"
        return
    with servers.throwaway_postgresql_database(
        request.getfixturevalue("postgresql_admin_url")
    ) as url:
        yield url


def _state(url: str) -> object:
    """Everything a command could have written: the bytes of the SQLite files that hold
    data (not the readers' -shm index, nor an empty -wal, which `stats` leaves too), or
    the PostgreSQL tables and the revision its version table holds."""
    if url.startswith("sqlite:///"):
        folder = Path(url.removeprefix("sqlite:///")).parent
        files = [path for path in sorted(folder.iterdir()) if not path.name.endswith("-shm")]
        return {path.name: path.read_bytes() for path in files if path.stat().st_size}
    tables = asyncio.run(_pg_tables(url))
    if "persistence_alembic_version" not in tables:
        return tables
    return tables, asyncio.run(
        _pg_value(url, "SELECT version_num FROM persistence_alembic_version")
    )


async def _pg_value(url: str, query: str) -> object:
    import asyncpg

    connection = await asyncpg.connect(url)
    try:
        return await connection.fetchval(query)
    finally:
        await connection.close()


@pytest.mark.parametrize(
    "backend",
    [
        pytest.param("sqlite", marks=pytest.mark.sqlite),
        pytest.param("postgresql", marks=pytest.mark.postgresql),
    ],
)
def test_commands_that_change_sessions_refuse_an_older_or_empty_store_writing_nothing(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path, workdir: Path
) -> None:
    """Found by attack: `sessions delete` and `archive` (even of an id not there, exit 1)
    and `cleanup` brought a store at revision 0004 to head, and created the schema in
    an empty database, where `stats` refuses both."""
    with _sql_database(backend, request, tmp_path) as url:
        if backend == "sqlite":
            sqlite3.connect(url.removeprefix("sqlite:///")).close()
        for command in CHANGING:
            line = failed(*command, "--url", url)
            assert "has no persistence schema: create it with `persistence upgrade`" in line
        assert _state(url) in ({}, [])

        subprocess.run(
            [sys.executable, "-m", "alembic", "-x", f"url={url}", "upgrade", "0004"],
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
        before = _state(url)
        for command in CHANGING:
            line = failed(*command, "--url", url)
            assert "is at schema revision 0004" in line, line
            assert line.endswith("run `persistence upgrade` first"), line
            assert _state(url) == before, command

        assert invoke("upgrade", "--url", url).exit_code == 0
        result = invoke("cleanup", "--url", url)
        assert result.exit_code == 0, result.output


@pytest.mark.sqlite
def test_a_read_only_store_can_be_read(workdir: Path) -> None:
    store = workdir / "ro" / "sessions.db"
    assert invoke("demo", "--url", f"sqlite:///{store}").exit_code == 0
    before = store.read_bytes()
    store.chmod(0o444)
    try:
        for command in (["stats", "--json"], ["sessions", "list"]):
            result = invoke(*command, "--url", f"sqlite:///{store}")
            assert result.exit_code == 0, result.output
    finally:
        store.chmod(0o644)
    assert store.read_bytes() == before


@pytest.mark.sqlite
def test_a_directory_url_says_so_in_one_line_without_a_thread_traceback(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STORAGE_")}
    result = subprocess.run(
        [sys.executable, "-m", "persistence", "stats", "--url", f"sqlite:///{tmp_path}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: {tmp_path} is a directory, not a database file (name a file:"
        " sqlite:///dir/name.db)"
    ]


@pytest.mark.sqlite
def test_reading_commands_name_why_no_database_can_be_at_the_path(workdir: Path) -> None:
    # Not "nothing stored yet (create one with persistence upgrade)": that advice fails.
    (workdir / "loop1").symlink_to("loop2")
    (workdir / "loop2").symlink_to("loop1")
    (workdir / "dangling.db").symlink_to(workdir / "unmounted" / "sessions.db")
    (workdir / "notes").write_text("mine")
    reasons = {
        "loop1": "cannot open loop1: Too many levels of symbolic links",
        "dangling.db": "which does not exist: refusing to create a database through it",
        "notes/x.db": "notes is a file, not a directory",
    }
    listing = sorted(os.listdir(workdir))
    for path, reason in reasons.items():
        for command in _reading_commands(workdir):
            assert reason in failed(*command, "--url", f"sqlite:///{path}"), (path, command)
    assert sorted(os.listdir(workdir)) == listing


@pytest.mark.sqlite
@pytest.mark.parametrize("command", ["import", "restore"])
@pytest.mark.parametrize("content", [None, b'{"format": ', b"not json at all"])
def test_a_failed_import_or_restore_leaves_no_database(
    workdir: Path, command: str, content: bytes | None
) -> None:
    source = workdir / "input.json"
    if content is not None:
        source.write_bytes(content)
    store = workdir / "new.db"

    failed(command, str(source), "--url", f"sqlite:///{store}")

    assert not store.exists()
    assert sorted(os.listdir(workdir)) == ([] if content is None else ["input.json"])


@pytest.mark.sqlite
def test_importing_a_single_session_export_gives_a_hint(workdir: Path) -> None:
    store = workdir / "s.db"
    assert invoke("demo", "--url", f"sqlite:///{store}").exit_code == 0
    listed = json.loads(invoke("sessions", "list", "--json", "--url", f"sqlite:///{store}").stdout)
    single = workdir / "one.json"
    result = invoke("export", listed[0]["session_id"], "--url", f"sqlite:///{store}")
    single.write_text(result.stdout)

    line = failed("import", str(single), "--url", f"sqlite:///{workdir / 'other.db'}")

    assert "single-session export" in line and "export-all" in line
    assert not (workdir / "other.db").exists()


@pytest.mark.parametrize(
    ("blocked", "expression", "extra"),
    [
        ("asyncpg", "persistence.PostgreSQLSessionStorage('postgresql://u@h/d')", "postgresql"),
        ("pymongo", "persistence.MongoDBSessionStorage", "mongodb"),
    ],
)
def test_a_missing_driver_names_the_extra_to_install(
    blocked: str, expression: str, extra: str
) -> None:
    # A None entry in sys.modules makes `import asyncpg` raise ImportError.
    script = (
        f"import sys; sys.modules[{blocked!r}] = None\n"
        "import persistence\n"
        "try:\n"
        f"    {expression}\n"
        "except persistence.ConfigError as exc:\n"
        "    print(exc)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert f"pip install 'persistence[{extra}]'" in result.stdout


def _removed_right_after(monkeypatch: pytest.MonkeyPatch, store: Path, check: str) -> None:
    """Removes the SQLite store (and its journals) right after `check`, the last check
    before the file is opened, passes: as another process would, in between."""
    from persistence.sql import sqlite_storage

    checked = getattr(sqlite_storage, check)

    def check_then_remove(*args: Any, **kwargs: Any) -> Any:
        result = checked(*args, **kwargs)
        for suffix in ("", "-wal", "-shm", "-journal"):
            store.with_name(store.name + suffix).unlink(missing_ok=True)
        return result

    monkeypatch.setattr(sqlite_storage, check, check_then_remove)


@pytest.mark.sqlite
@pytest.mark.parametrize(
    ("command", "check"),
    [
        # Writing commands: the file is checked, then checked as a store, then opened.
        (["cleanup"], "refuse_foreign_sqlite_file"),
        (["sessions", "delete", "abc"], "refuse_foreign_sqlite_file"),
        (["stamp", "head"], "check_sqlite_path"),
        (["stats"], "check_sqlite_path"),
    ],
    ids=["cleanup", "sessions delete", "stamp", "stats"],
)
def test_a_store_removed_between_its_check_and_its_opening_is_not_created_again(
    workdir: Path, monkeypatch: pytest.MonkeyPatch, command: list[str], check: str
) -> None:
    """Found by attack: `cleanup` checked that the file was there, then opened its path;
    removed in between, SQLite created a new empty store there, migrated to head."""
    store = workdir / "sessions.db"
    assert invoke("demo", "--url", f"sqlite:///{store}").exit_code == 0
    listing = sorted(name for name in os.listdir(workdir) if not name.startswith("sessions.db"))
    _removed_right_after(monkeypatch, store, check)

    error = failed(*command, "--url", f"sqlite:///{store}")

    assert error.startswith(f"error: no database at {store}: the file was removed"), error
    assert sorted(os.listdir(workdir)) == listing


def test_a_failed_stamp_names_the_store_without_its_password() -> None:
    """Found by attack: `stamp` failures named no store ("stamp schema: database
    unreachable"), where every other command names it."""
    line = failed("--url", "postgresql://app:s3cret@127.0.0.1:1/nowhere", "stamp", "head")
    assert "stamp schema of postgresql://app:***@127.0.0.1:1/nowhere" in line
    assert "s3cret" not in line


@pytest.mark.sqlite
def test_a_journal_of_a_database_is_never_opened_as_a_store(tmp_path: Path) -> None:
    """Found by attack: a reading command leaves an empty `store.db-wal` (README), and
    `--url sqlite:///store.db-wal demo` wrote a whole database into it, which the next
    open of store.db threw away, demo session and all."""
    store = tmp_path / "store.db"
    assert invoke("demo", "--url", f"sqlite:///{store}").exit_code == 0
    assert invoke("stats", "--url", f"sqlite:///{store}").exit_code == 0
    assert (tmp_path / "store.db-wal").stat().st_size == 0  # what a reader leaves
    before = store.read_bytes()

    for suffix, kind in (
        ("-wal", "write-ahead log"),
        ("-shm", "shared-memory index"),
        ("-journal", "rollback journal"),
    ):
        journal = f"{store}{suffix}"
        for command in (["demo"], ["upgrade"], ["stats"], ["sessions", "list"]):
            assert failed(*command, "--url", f"sqlite:///{journal}") == (
                f"error: {journal} is named as the {kind} of the SQLite database {store}:"
                " refusing to open it as a database (give the database's own path)"
            ), (suffix, command)
    assert not (tmp_path / "store.db-journal").exists()
    assert (tmp_path / "store.db-wal").stat().st_size == 0
    assert store.read_bytes() == before
    listed = invoke("sessions", "list", "--json", "--url", f"sqlite:///{store}")
    assert len(json.loads(listed.stdout)) == 1

    async def open_journal() -> None:
        async with SQLiteSessionStorage(f"{store}-wal"):
            pass

    with pytest.raises(StorageConnectionError, match="is named as the write-ahead log"):
        asyncio.run(open_journal())


@pytest.mark.sqlite
def test_journal_names_are_told_where_the_files_are(tmp_path: Path) -> None:
    """Found by attack on the check above: a symlink to `store.db-wal` got past it; a
    store named `foo-wal` was deleted, sessions and all, when a store `foo` was opened
    beside it; and `lnk-wal` beside a symlink `lnk` to a database elsewhere (whose
    journals SQLite keeps beside that database) was refused."""
    store = tmp_path / "store.db"
    assert invoke("demo", "--url", f"sqlite:///{store}").exit_code == 0
    (tmp_path / "link.db").symlink_to(tmp_path / "store.db-wal")
    assert failed("demo", "--url", f"sqlite:///{tmp_path / 'link.db'}") == (
        f"error: {tmp_path / 'link.db'} (a link to {store}-wal) is named as the write-ahead"
        f" log of the SQLite database {store}: refusing to open it as a database (give the"
        " database's own path)"
    )
    assert (
        not (tmp_path / "store.db-wal").exists() or not (tmp_path / "store.db-wal").stat().st_size
    )

    foo = tmp_path / "foo"
    assert invoke("demo", "--url", f"sqlite:///{foo}-wal").exit_code == 0  # no foo beside it
    kept = Path(f"{foo}-wal").read_bytes()
    assert failed("stats", "--url", f"sqlite:///{foo}") == (
        f"error: {foo}-wal is a SQLite database where {foo} keeps its write-ahead log:"
        " SQLite would take it for that and throw it away; refusing to open the store (move"
        " or rename it first)"
    )
    assert failed("demo", "--url", f"sqlite:///{foo}").startswith(f"error: {foo}-wal is a")
    assert not foo.exists() and Path(f"{foo}-wal").read_bytes() == kept
    # A symlink there too: SQLite deleted it, or failed the open naming nothing.
    for suffix in ("-journal", "-shm"):
        link = tmp_path / f"bar{suffix}"
        link.symlink_to(foo.with_name("foo-wal"))
        assert failed("demo", "--url", f"sqlite:///{tmp_path / 'bar'}") == (
            f"error: {link} is a symbolic link where {tmp_path / 'bar'} keeps its"
            f" {'rollback journal' if suffix == '-journal' else 'shared-memory index'}:"
            " SQLite would take it for that and throw it away; refusing to open the store"
            " (move or rename it first)"
        )
        assert link.is_symlink() and not (tmp_path / "bar").exists()
        link.unlink()

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "lnk").symlink_to(store)
    assert invoke("demo", "--url", f"sqlite:///{elsewhere / 'lnk-wal'}").exit_code == 0
    assert invoke("stats", "--url", f"sqlite:///{elsewhere / 'lnk'}").exit_code == 0
