"""Database URLs as operators write them: libpq's query parameters, ports, NUL bytes,
and setting values repeated in errors (masked before they are cut)."""

from __future__ import annotations

import asyncio
import os
import re
from pathlib import Path

import asyncpg
import pytest
from sqlalchemy import make_url, text
from sqlalchemy.dialects.postgresql.asyncpg import PGDialect_asyncpg

from persistence import (
    ConfigError,
    InvalidDataError,
    PostgreSQLSessionStorage,
    SQLiteSessionStorage,
)
from persistence.config import (
    StorageConfig,
    config_from_url,
    create_storage,
    load_config,
    sql_url,
)
from persistence.sql.engines import (
    async_driver_url,
    postgresql_url,
    replica_connect_args,
    sqlite_path_from_url,
)

# An empty current directory and no STORAGE_* variable or config file: a fresh machine.
pytestmark = pytest.mark.usefixtures("workdir")

LONG_SECRET = "VeryLongSecretPassw0rdThatIsLongEnoughToPassTheEightyCharacterCut1234"


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("STORAGE_BACKEND", f"postgresql://app:{LONG_SECRET}@db.example:5432/app"),
        ("STORAGE_BACKEND", "postgresql://app:Sec ret1@db/app"),
        ("STORAGE_BACKEND", "postgresql://app:Sec'ret1@db/app"),
        ("STORAGE_OPTIONS__SYNCHRONOUS", f"postgresql://app:{LONG_SECRET}@db.example/app"),
        ("STORAGE_EXPIRY_HOURS", f"postgresql://app:Sec ret1{LONG_SECRET}@db.example/app"),
    ],
)
def test_a_settings_value_in_an_error_is_masked_before_it_is_cut(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as caught:
        load_config()
    message = str(caught.value)
    for piece in (LONG_SECRET[:8], LONG_SECRET[-12:], "Sec", "ret1"):
        assert piece.lower() not in message.lower()
    assert "app:***@" in message.lower() and variable in message


def test_a_nul_byte_in_database_path_is_an_error_naming_the_setting(tmp_path: Path) -> None:
    path = tmp_path / "app.yaml"
    path.write_text('storage:\n  database_path: "a\\0b.db"\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"database_path \(from config file .*app\.yaml.*NUL"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"database_path.*NUL"):
        StorageConfig(database_path=Path("a\0b.db"))
    with pytest.raises(ConfigError, match=r"URL: .*NUL"):
        config_from_url("sqlite:///a\0b.db")
    with pytest.raises(ConfigError, match=r"connection_string.*NUL"):
        StorageConfig(connection_string="sqlite:///a\0b.db")


def test_a_lone_surrogate_in_a_sqlite_path_is_an_error_naming_the_setting(tmp_path: Path) -> None:
    """Found by attack: an emoji written as JSON escapes (`\\ud83d\\ude00`), which YAML
    reads as two lone surrogates, was accepted; opening the store then raised a bare
    UnicodeEncodeError that named neither the setting nor the file."""
    path = tmp_path / "app.yaml"
    path.write_text('storage:\n  database_path: "chats-\\ud83d\\ude00.db"\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"database_path \(from config file .*lone surrogate"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"database_path.*lone surrogate.*chats-\\ud83d"):
        StorageConfig(database_path=Path("chats-\ud83d\ude00.db"))
    with pytest.raises(ConfigError, match=r"connection_string.*lone surrogate"):
        StorageConfig(connection_string="sqlite:///chats-\ud83d.db")
    with pytest.raises(InvalidDataError, match=r"^database_path: the path holds a lone surrogate"):
        SQLiteSessionStorage("chats-\ud83d.db")
    # What an undecodable byte of a file name becomes (surrogateescape) names that file.
    assert StorageConfig(database_path=Path("chats-\udcff.db")).database_path.name == (
        "chats-\udcff.db"
    )


def test_a_url_in_database_path_is_an_error_that_never_shows_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by attack: STORAGE_DATABASE_PATH=postgresql://app:secret@db/app made a
    SQLite store under ./postgresql:/app:secret@db/ and printed the password (the
    config's repr, the `store:` log line, the demo's output)."""
    monkeypatch.chdir(tmp_path)
    url = "postgresql://app:Zq9sekret@127.0.0.1/app"
    path = tmp_path / "app.yaml"
    path.write_text(f'storage:\n  database_path: "{url}"\n', encoding="utf-8")
    monkeypatch.setenv("STORAGE_DATABASE_PATH", url)
    refusals = []
    for make in (lambda: load_config(path), lambda: StorageConfig(database_path=Path(url))):
        with pytest.raises(ConfigError) as refused:
            make()
        refusals.append(str(refused.value))
    monkeypatch.delenv("STORAGE_DATABASE_PATH")
    with pytest.raises(ConfigError) as refused:
        load_config(path)
    refusals.append(str(refused.value))

    assert "from environment variable STORAGE_DATABASE_PATH" in refusals[0]
    assert "from config file" in refusals[2]
    for refusal in refusals:
        assert "a postgresql: URL (not shown: it may hold a password) is not a file path" in (
            refusal
        )
        assert "Zq9sekret" not in refusal
    assert not [made for made in tmp_path.rglob("*") if "postgresql" in made.name]


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({"connection_string": "postgresql://u:pw@h:99999/db"}, r"connection_string: port 99999"),
        ({"connection_string": "postgresql://u@h:0/db"}, r"port 0 is not between 1 and 65535"),
        ({"connection_string": "postgresql://u@h:5x/db"}, r"port '5x' is not a number"),
        ({"connection_string": "postgresql://u@[::1]:70000/db"}, r"port 70000"),
        ({"connection_string": "mongodb://h1:27017,h2:99999/db"}, r"port 99999"),
        ({"connection_string": "postgresql://u@h/db?port=65536"}, r"query parameter port 65536"),
        (
            {"connection_string": "postgresql://u@h/db", "read_replicas": ["postgres://r:1e9/db"]},
            r"read_replicas: item 1: the port is not a number",
        ),
    ],
)
def test_a_bad_port_is_a_config_error_naming_the_setting(
    settings: dict[str, object], expected: str
) -> None:
    with pytest.raises(ConfigError, match=expected) as caught:
        StorageConfig(**settings)  # type: ignore[arg-type]
    assert "pw" not in str(caught.value)


def test_ports_and_hosts_that_are_fine_pass() -> None:
    for url in (
        "postgresql://u@h:65535/db",
        "postgresql://u@[::1]:5432/db",
        "postgresql://u@[::1]/db",
        "postgresql://u@%2Fvar%2Frun%2Fpostgresql/db",
        "postgresql:///db?host=/var/run/postgresql&port=5433",
        "mongodb+srv://cluster.example/",
        "mongodb://h1:27017,h2:27018/db",
    ):
        assert StorageConfig(connection_string=url).connection_string is not None
        if url.startswith("postgresql"):
            # What the configuration passes, the storage takes (found by attack: a list
            # of hosts passed here, and the storage refused it).
            PostgreSQLSessionStorage(url)


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("foo=1", r"unknown query parameter 'foo' \(known: application_name, command_timeout"),
        ("sslmode=requir", r"sslmode='requir' is not one of disable, allow, prefer, require"),
        ("ssl=true", r"ssl='true' is not one of"),
        ("ssl=require&sslmode=require", r"ssl and sslmode say the same thing"),
        ("sslmode=require&sslmode=disable", r"sslmode is given more than once"),
        ("connect_timeout=5", r"connect_timeout is not supported.*option connect_timeout"),
        ("sslpassword=pw", r"sslpassword is not supported"),
        ("target_session_attrs=main", r"target_session_attrs='main' is not one of"),
    ],
)
def test_an_unusable_query_parameter_is_a_config_error_naming_it(query: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=f"connection_string: .*{expected}"):
        StorageConfig(connection_string=f"postgresql://u@h/db?{query}")
    with pytest.raises(ConfigError, match=f"read_replicas: item 2: .*{expected}"):
        StorageConfig(
            connection_string="postgresql://u@h/db",
            read_replicas=["postgresql://u@r1/db", f"postgresql://u@r2/db?{query}"],
        )


@pytest.mark.parametrize(
    ("url", "query"),
    [
        ("sqlite:///store.db?mode=ro", "?mode=ro"),
        (
            "sqlite+aiosqlite:///store.db?mode=ro&immutable=1&bogus=1",
            "?mode=ro&immutable=1&bogus=1",
        ),
        ("sqlite:///reports?2024.db", "?2024.db"),
        ("sqlite:///store.db?", "?"),
    ],
)
def test_a_query_string_on_a_sqlite_url_is_refused_naming_it(
    monkeypatch: pytest.MonkeyPatch, workdir: Path, url: str, query: str
) -> None:
    """Found by attack: it was dropped without a word (`?mode=ro` did not stop `demo`
    writing store.db; `reports?2024.db` created a file named `reports`)."""
    refused = f"a SQLite URL takes no query string, got {query!r}"
    with pytest.raises(ConfigError, match=re.escape(f"URL: {refused}")):
        config_from_url(url)
    with pytest.raises(ConfigError, match=re.escape(f"connection_string: {refused}")):
        StorageConfig(connection_string=url)
    monkeypatch.setenv("STORAGE_CONNECTION_STRING", url)
    with pytest.raises(ConfigError, match="environment variable STORAGE_CONNECTION_STRING"):
        load_config()
    monkeypatch.delenv("STORAGE_CONNECTION_STRING")

    from typer.testing import CliRunner

    from persistence.cli import app

    for command in (["demo"], ["upgrade"]):
        result = CliRunner().invoke(app, ["--url", url, *command])
        assert result.exit_code == 1, result.output
        assert result.stderr.startswith(f"error: URL: {refused}"), result.stderr
        assert "database_path (STORAGE_DATABASE_PATH" in result.stderr
    assert list(workdir.iterdir()) == []
    # What the message advises names the file whose name holds the `?`.
    monkeypatch.setenv("STORAGE_DATABASE_PATH", "reports?2024.db")
    assert load_config().database_path == Path("reports?2024.db")


def test_libpq_parameters_are_written_as_asyncpg_takes_them() -> None:
    from persistence.urls import asyncpg_url

    assert asyncpg_url("postgresql://u:p%20w@h/db?sslmode=require&dbname=x") == (
        "postgresql://u:p%20w@h/db?ssl=require&database=x"
    )
    rewritten = asyncpg_url("postgresql://u@h/db?application_name=my app&sslrootcert=/ca.pem")
    query = make_url(rewritten).query
    assert query == {"dsn": "postgresql://?application_name=my%20app&sslrootcert=%2Fca.pem"}
    unchanged = "postgresql://u@h/db?ssl=prefer&statement_cache_size=0"
    assert asyncpg_url(unchanged) == unchanged
    assert asyncpg_url("mongodb://h/db?w=1") == "mongodb://h/db?w=1"
    config = StorageConfig(connection_string="postgres://u@h/db?sslmode=verify-full")
    assert sql_url(config) == "postgresql://u@h/db?sslmode=verify-full"
    # The engines take it as asyncpg does, whoever gives the URL (config, alembic -x, code).
    assert dict(postgresql_url(sql_url(config)).query) == {"ssl": "verify-full"}
    with pytest.raises(InvalidDataError, match="unknown query parameter 'sslmodes'"):
        postgresql_url("postgresql://u@h/db?sslmodes=require")
    # What the user wrote is what messages show.
    assert config.display_url == "postgres://u@h/db?sslmode=verify-full"
    # A socket directory as the host, as libpq reads it, is where asyncpg reads one.
    assert asyncpg_url("postgresql://u@%2Frun%2Fpg:5433/db?sslmode=disable") == (
        "postgresql://u@/db?host=%2Frun%2Fpg&port=5433&ssl=disable"
    )
    # Checked where it goes (found by attack: these reached SQLAlchemy's ArgumentError).
    assert asyncpg_url("postgresql://u@%2Frun%2Fpg:5432/db?port=5433") == (
        "postgresql://u@/db?host=%2Frun%2Fpg&port=5433"
    )
    for url, problem in [
        ("postgresql://u@%2Frun%2Fpg%2C%2Ftmp/db", "several hosts in one URL"),
        ("postgresql://u@%2Frun%2Fpg:abc/db", "port 'abc' is not a number"),
    ]:
        with pytest.raises(InvalidDataError, match=problem):
            PostgreSQLSessionStorage(url)
        with pytest.raises(ConfigError, match=problem):
            StorageConfig(connection_string=url)


@pytest.mark.postgresql
async def test_a_socket_directory_given_as_the_host_reaches_the_server(
    postgresql_url: str,
) -> None:
    """Found by attack: `postgresql://u@%2Fvar%2Frun%2Fpostgresql/db` passed the
    checks, and the directory was then looked up as a host name (gaierror)."""
    given = make_url(postgresql_url)
    connection = await asyncpg.connect(postgresql_url.replace("+asyncpg", ""))
    try:
        directory = (await connection.fetchval("SHOW unix_socket_directories")).split(",")[0]
    finally:
        await connection.close()
    if not directory or not await asyncio.to_thread(os.path.isdir, directory.strip()):
        pytest.skip(f"the server's socket directory {directory!r} is not on this machine")
    host = directory.strip().replace("/", "%2F")
    url = f"postgresql://{given.username}@{host}:{given.port or 5432}/{given.database}"
    async with (
        PostgreSQLSessionStorage(url) as through_socket,
        PostgreSQLSessionStorage(postgresql_url) as through_tcp,
    ):
        # One store (the fixture's database is not emptied for this test).
        assert through_socket.token == through_tcp.token
        assert await through_socket.count() == await through_tcp.count()


def test_url_schemes_are_read_whatever_their_case() -> None:
    # RFC 3986: what the configuration accepts, the engine and alembic accept too.
    for url in ("Postgres://u@h/db", "POSTGRESQL://u@h/db", "PostgreSQL+AsyncPG://u@h/db"):
        config = config_from_url(url)
        assert config.backend == "postgresql"
        storage = create_storage(config)
        assert isinstance(storage, PostgreSQLSessionStorage)
        assert storage.url.drivername == "postgresql+asyncpg"
        assert async_driver_url(sql_url(config)).drivername == "postgresql+asyncpg"
    assert sqlite_path_from_url("SQLite:///x.db") == Path("x.db")
    assert config_from_url("SQLITE+aiosqlite:///x.db").database_path == Path("x.db")


@pytest.mark.postgresql
def test_an_upper_case_scheme_works_on_the_command_line(postgresql_url: str) -> None:
    from typer.testing import CliRunner

    from persistence.cli import app

    url = "POSTGRES" + postgresql_url.removeprefix("postgresql")
    for command in ("upgrade", "stats"):
        result = CliRunner().invoke(app, [command, "--url", url])
        assert result.exit_code == 0, result.output


@pytest.mark.postgresql
async def test_libpq_parameters_reach_the_connection(postgresql_url: str) -> None:
    from persistence.urls import asyncpg_url

    url = (
        f"{postgresql_url}?sslmode=disable&application_name=fix%20c"
        "&options=-c%20lock_timeout%3D1234"
    )
    config = config_from_url(url)
    async with create_storage(config) as storage:
        assert isinstance(storage, PostgreSQLSessionStorage)
        async with storage.engine.connect() as connection:
            row = (
                await connection.execute(
                    text(
                        "SELECT current_setting('application_name'),"
                        " current_setting('lock_timeout'),"
                        " (SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid())"
                    )
                )
            ).one()
    assert tuple(row) == ("fix c", "1234ms", False)
    # A read replica connects with the same parameters.
    assert await _replica_application_name(asyncpg_url(url)) == "fix c"


async def _replica_application_name(url: str) -> str:
    """The application name a read replica's connection of `url` (asyncpg's form) has."""
    options = replica_connect_args(
        make_url(url).set(drivername="postgresql+asyncpg"),
        PGDialect_asyncpg(),
        statement_timeout=None,
        connect_timeout=5,
    )
    connection = await asyncpg.connect(**options)
    try:
        return str(await connection.fetchval("SELECT current_setting('application_name')"))
    finally:
        await connection.close()


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("password=pa+ss&user=a+b", {"password": "pa+ss", "user": "a+b"}),
        ("password=pa%2Bss+x&sslmode=disable", {"password": "pa+ss+x", "ssl": "disable"}),
        ("password=pa%20ss", {"password": "pa ss"}),
        ("application_name=a+b", {"dsn": "postgresql://?application_name=a%2Bb"}),
    ],
)
def test_a_plus_in_a_postgresql_query_stays_a_plus_as_in_libpq(
    query: str, expected: dict[str, str]
) -> None:
    """Found by attack: `?application_name=a+b` and `?password=pa+ss` reached asyncpg
    with a space (urllib's query parsing), where libpq only percent-decodes."""
    url = postgresql_url(f"postgresql://h/db?{query}")
    _, arguments = PGDialect_asyncpg().create_connect_args(url)
    assert {key: arguments[key] for key in expected} == expected


@pytest.mark.postgresql
async def test_a_plus_in_application_name_reaches_the_server(postgresql_url: str) -> None:
    from persistence.urls import asyncpg_url

    url = f"{postgresql_url}?application_name=a+b%2Bc%20d"
    async with create_storage(config_from_url(url)) as storage:
        assert isinstance(storage, PostgreSQLSessionStorage)
        async with storage.engine.connect() as connection:
            name = await connection.scalar(text("SELECT current_setting('application_name')"))
    assert name == "a+b+c d"
    assert await _replica_application_name(asyncpg_url(url)) == name


def test_expiry_hours_are_bounded_so_a_cut_off_stays_a_date() -> None:
    with pytest.raises(ConfigError, match=r"expiry_hours.*less than or equal to 10000000"):
        StorageConfig(expiry_hours=1e308)
    assert StorageConfig(expiry_hours=10_000_000).expiry_hours == 10_000_000
