"""Configuration: sources and their priority, every refusal, secrets, building storages."""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect, text

from persistence import ConfigError, PostgreSQLSessionStorage, SQLiteSessionStorage
from persistence.config import (
    StorageConfig,
    config_from_url,
    create_storage,
    load_config,
    sql_url,
)
from persistence.sql.engines import postgresql_connect_args
from tests import servers

# An empty current directory and no STORAGE_* variable or config file: a fresh machine.
pytestmark = pytest.mark.usefixtures("workdir")

ROOT = Path(__file__).resolve().parent.parent
SECRET = "Sup3r-s3cret-pw"
PG_URL = f"postgresql://app:{SECRET}@db.example:5432/app"


def _write(path: Path, text_: str) -> Path:
    path.write_text(text_, encoding="utf-8")
    return path


def test_defaults_are_sqlite_in_the_current_directory() -> None:
    config = load_config()
    assert config.backend == "sqlite"
    assert config.database_path == Path("gemini_sessions.db")
    assert (config.min_pool_size, config.max_pool_size) == (5, 20)
    assert (config.auto_save, config.expiry_hours, config.options) == (True, 72, {})
    assert sql_url(config) == "sqlite:///gemini_sessions.db"


def test_yaml_file_values_override_defaults(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "app.yaml",
        "storage:\n"
        "  backend: postgresql\n"
        f"  connection_string: {PG_URL}\n"
        "  min_pool_size: 2\n"
        "  max_pool_size: 8\n"
        "  auto_save: false\n"
        "  expiry_hours: 12.5\n"
        "  options:\n"
        "    statement_timeout: 1.5\n",
    )
    config = load_config(path)
    assert config.backend == "postgresql"
    assert (config.min_pool_size, config.max_pool_size) == (2, 8)
    assert (config.auto_save, config.expiry_hours) == (False, 12.5)
    assert config.options == {"statement_timeout": 1.5}
    assert sql_url(config) == PG_URL


def test_toml_file_values_override_defaults(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "app.toml",
        '[storage]\ndatabase_path = "data/chat.db"\nexpiry_hours = 24\n'
        '[storage.options]\nsynchronous = "normal"\ncache_size = -20000\n',
    )
    config = load_config(path)
    assert config.database_path == Path("data/chat.db")
    assert config.expiry_hours == 24
    assert config.options == {"synchronous": "NORMAL", "cache_size": -20000}


def test_environment_overrides_the_file_setting_by_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _write(
        tmp_path / "app.yaml",
        "storage:\n  database_path: from-file.db\n  expiry_hours: 10\n"
        "  options: {synchronous: FULL, cache_size: 100}\n",
    )
    monkeypatch.setenv("STORAGE_EXPIRY_HOURS", "48")
    monkeypatch.setenv("STORAGE_AUTO_SAVE", "false")
    monkeypatch.setenv("STORAGE_OPTIONS__SYNCHRONOUS", "NORMAL")
    config = load_config(path)
    assert config.database_path == Path("from-file.db")
    assert config.expiry_hours == 48
    assert config.auto_save is False
    assert config.options == {"synchronous": "NORMAL", "cache_size": 100}


def test_every_environment_variable_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STORAGE_BACKEND", "postgresql")
    monkeypatch.setenv("STORAGE_CONNECTION_STRING", PG_URL)
    monkeypatch.setenv("STORAGE_MIN_POOL_SIZE", "1")
    monkeypatch.setenv("STORAGE_MAX_POOL_SIZE", "3")
    monkeypatch.setenv("STORAGE_AUTO_SAVE", "0")
    monkeypatch.setenv("STORAGE_EXPIRY_HOURS", "1.5")
    monkeypatch.setenv("STORAGE_OPTIONS", '{"command_timeout": 9}')
    config = load_config()
    assert (config.backend, config.min_pool_size, config.max_pool_size) == ("postgresql", 1, 3)
    assert (config.auto_save, config.expiry_hours) == (False, 1.5)
    assert config.options == {"command_timeout": 9}
    monkeypatch.delenv("STORAGE_BACKEND")
    monkeypatch.delenv("STORAGE_OPTIONS")
    monkeypatch.setenv("STORAGE_DATABASE_PATH", "ignored-for-postgresql.db")
    assert load_config().backend == "postgresql"  # the URL's scheme names the backend


def test_sqlite_path_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STORAGE_DATABASE_PATH", "/var/lib/app/sessions.db")
    assert load_config().database_path == Path("/var/lib/app/sessions.db")
    monkeypatch.setenv("STORAGE_CONNECTION_STRING", "sqlite+aiosqlite:////var/lib/app/sessions.db")
    assert load_config().database_path == Path("/var/lib/app/sessions.db")


def test_config_file_is_found_by_variable_then_in_the_current_directory(
    workdir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write(workdir / "persistence.yaml", "storage:\n  expiry_hours: 5\n")
    assert load_config().expiry_hours == 5
    named = _write(tmp_path / "named.toml", "[storage]\nexpiry_hours = 7\n")
    monkeypatch.setenv("PERSISTENCE_CONFIG", str(named))
    assert load_config().expiry_hours == 7


def test_variables_in_file_values_are_expanded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DB_PASSWORD", SECRET)
    monkeypatch.delenv("DB_HOST", raising=False)
    path = _write(
        tmp_path / "app.yaml",
        "storage:\n"
        '  connection_string: "postgresql://app:${DB_PASSWORD}@${DB_HOST:-db}:5432/app"\n'
        '  options: {statement_timeout: "${TIMEOUT:-2.5}"}\n'
        '  database_path: "literal-$${NOT_A_VAR}.db"\n',
    )
    config = load_config(path)
    assert sql_url(config) == f"postgresql://app:{SECRET}@db:5432/app"
    assert config.options == {"statement_timeout": 2.5}
    assert config.database_path == Path("literal-${NOT_A_VAR}.db")


def test_unset_variable_without_default_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DB_PASSWORD", raising=False)
    path = _write(
        tmp_path / "app.yaml",
        'storage:\n  connection_string: "postgresql://app:${DB_PASSWORD}@db/app"\n',
    )
    with pytest.raises(ConfigError, match="environment variable DB_PASSWORD is not set") as err:
        load_config(path)
    assert "storage.connection_string" in str(err.value)


@pytest.mark.parametrize(
    ("variables", "file_text", "expected"),
    [
        (
            {"STORAGE_BACKEND": "oracle"},
            None,
            r"backend \(from environment variable STORAGE_BACKEND\)",
        ),
        (
            {},
            f"storage:\n  backend: mongodb\n  connection_string: {PG_URL}\n",
            r"connection_string \(from config file .*app\.yaml, key storage\.connection_string\)"
            r": scheme postgresql:// does not fit backend mongodb",
        ),
        (
            {"STORAGE_MAX_POOL_SIZE": "lots"},
            None,
            r"max_pool_size \(from environment variable STORAGE_MAX_POOL_SIZE\).*integer",
        ),
        (
            {},
            "storage:\n  expiry_hours: soon\n",
            r"expiry_hours \(from config file .*key storage\.expiry_hours\).*number",
        ),
        (
            # Two explicit bounds in conflict (one alone moves the other's default).
            {"STORAGE_MIN_POOL_SIZE": "30", "STORAGE_MAX_POOL_SIZE": "20"},
            None,
            r"min_pool_size \(from environment variable STORAGE_MIN_POOL_SIZE\): 30 is greater",
        ),
        ({}, "storage:\n  options: {journal: WAL}\n", r"options\.journal .*unknown option"),
        (
            {"STORAGE_OPTIONS__SYNCHRONOUS": "OFF"},
            None,
            r"options\.synchronous \(from environment variable STORAGE_OPTIONS__SYNCHRONOUS\)",
        ),
        ({"STORAGE_BACKEND": "postgresql"}, None, r"connection_string.*required for backend"),
        ({}, "storage:\n  pool: 3\n", r"storage\.pool: unknown setting"),
        ({}, "other: {}\n", r"no `storage` section"),
        ({}, "storage: [1, 2]\n", r"`storage` must be a mapping"),
        ({}, "storage:\n  backend: [unclosed\n", r"not valid YAML \(line \d+, column \d+"),
        ({"STORAGE_OPTIONS": "not json"}, None, r"STORAGE_OPTIONS.*not a JSON object"),
    ],
)
def test_each_wrong_setting_is_a_config_error_naming_it_and_its_source(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    variables: dict[str, str],
    file_text: str | None,
    expected: str,
) -> None:
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    path = _write(tmp_path / "app.yaml", file_text) if file_text is not None else None
    with pytest.raises(ConfigError, match=expected):
        load_config(path)


def test_unreadable_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"config file .*missing\.yaml: not found"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "dir.yaml").mkdir()
    with pytest.raises(ConfigError, match=r"dir\.yaml: not a regular file"):
        load_config(tmp_path / "dir.yaml")
    bad_toml = _write(tmp_path / "bad.toml", "[storage\nbackend = 1\n")
    with pytest.raises(ConfigError, match=r"bad\.toml: not valid TOML"):
        load_config(bad_toml)
    with pytest.raises(ConfigError, match=r"unknown type"):
        load_config(_write(tmp_path / "app.ini", "[storage]\n"))
    _write(tmp_path / "binary.yaml", "").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ConfigError, match=r"binary\.yaml: cannot be read \(not UTF-8"):
        load_config(tmp_path / "binary.yaml")


def test_a_config_path_that_is_no_regular_file_or_too_large_is_refused_at_once(
    tmp_path: Path,
) -> None:
    """Found by attack: a config path that was /dev/zero (through a symlink) was read
    until the kernel killed the process at 23 GB, and a FIFO waited for good."""
    (tmp_path / "zero.yaml").symlink_to("/dev/zero")
    with pytest.raises(ConfigError, match=r"zero\.yaml: not a regular file"):
        load_config(tmp_path / "zero.yaml")
    os.mkfifo(tmp_path / "fifo.yaml")
    with pytest.raises(ConfigError, match=r"fifo\.yaml: not a regular file"):
        load_config(tmp_path / "fifo.yaml")
    large = _write(tmp_path / "large.yaml", "# " + "x" * (1024 * 1024) + "\n")
    with pytest.raises(ConfigError, match=r"large\.yaml: larger than 1048576 bytes"):
        load_config(large)


def test_a_yaml_file_whose_aliases_expand_too_far_is_refused(tmp_path: Path) -> None:
    """Found by attack: nine lines of nested aliases stood for 10^9 replica URLs, which
    validation walked until the process was killed."""
    lines = ['a0: &a0 ["postgresql://u@h/db"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    path = _write(
        tmp_path / "laughs.yaml", "\n".join([*lines, "storage:", "  read_replicas: *a8", ""])
    )
    with pytest.raises(ConfigError, match="aliases expand it past 100,000 values"):
        load_config(path)
    # Aliases within the bound, and merge keys, still work.
    merged = _write(
        tmp_path / "merged.yaml",
        "base: &base\n  backend: sqlite\nstorage:\n  <<: *base\n  expiry_hours: 12\n",
    )
    assert load_config(merged).expiry_hours == 12


def test_yaml_is_read_with_the_safe_loader(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = _write(
        tmp_path / "evil.yaml",
        f"storage:\n  database_path: !!python/object/apply:os.system ['touch {marker}']\n",
    )
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)
    assert not marker.exists()


def test_a_key_given_twice_in_a_yaml_file_is_refused(tmp_path: Path) -> None:
    """Found by attack: the last one silently won (TOML refuses it already)."""
    path = _write(
        tmp_path / "twice.yaml",
        "storage:\n  database_path: a.db\n  busy_timeout: 3\n  database_path: b.db\n",
    )
    with pytest.raises(ConfigError, match=r"line 4, .*'database_path' is given twice"):
        load_config(path)
    nested = _write(
        tmp_path / "nested.yaml",
        "storage:\n  options:\n    cache_size: 1\n    cache_size: 2\n",
    )
    with pytest.raises(ConfigError, match="'cache_size' is given twice"):
        load_config(nested)
    # A merge key's values may be given again: that is what `<<` is for.
    merged = _write(
        tmp_path / "merged.yaml",
        "base: &base\n  database_path: a.db\nstorage:\n  <<: *base\n  database_path: b.db\n",
    )
    assert load_config(merged).database_path == Path("b.db")


def test_two_config_files_in_the_current_directory_are_refused() -> None:
    """Found by attack: persistence.yaml silently won over persistence.toml."""
    _write(Path("persistence.yaml"), "storage:\n  database_path: from-yaml.db\n")
    _write(Path("persistence.toml"), '[storage]\ndatabase_path = "from-toml.db"\n')
    with pytest.raises(ConfigError, match=r"persistence\.yaml and persistence\.toml are both"):
        load_config()
    Path("persistence.toml").unlink()
    assert load_config().database_path == Path("from-yaml.db")


def test_two_environment_variables_of_one_setting_are_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Found by attack: STORAGE_DATABASE_PATH and storage_database_path, one silently won."""
    monkeypatch.setenv("STORAGE_DATABASE_PATH", "upper.db")
    monkeypatch.setenv("storage_database_path", "lower.db")
    with pytest.raises(ConfigError, match="name the same storage setting"):
        load_config()


def _secret_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Every text the library makes from a configuration holding the password."""
    config = StorageConfig(connection_string=PG_URL, options={"statement_timeout": 3})
    yield repr(config)
    yield str(config)
    yield config.model_dump_json()
    yield str(config.model_dump())
    yield config.display_url
    yield repr(create_storage(config))
    yield repr(config_from_url(PG_URL.replace("postgresql", "postgres")))
    mongo = config_from_url(f"mongodb://app:{SECRET}@mongo.example/?authSource=admin")
    yield repr(mongo)
    failures = [
        dict(backend="sqlite", connection_string=PG_URL),
        dict(connection_string=PG_URL, min_pool_size=9, max_pool_size=2),
        dict(connection_string=PG_URL, options={"nope": 1}),
        dict(backend=PG_URL),
        dict(connection_string=PG_URL, max_pool_size=PG_URL),
        dict(connection_string=f"mysql://app:{SECRET}@db/app"),
        dict(connection_string=f"http://app:{SECRET}@db/app", backend="postgresql"),
    ]
    for fields in failures:
        with pytest.raises(ConfigError) as raised:
            StorageConfig(**fields)
        yield str(raised.value)
        yield repr(raised.value)
        assert raised.value.__cause__ is None and raised.value.__suppress_context__
    for line in (
        f"storage:\n  connection_string: {PG_URL}\n  backend: [bad\n",
        f"storage:\n  connection_string: '{PG_URL}\n",
        f"storage:\n  backend: sqlite\n  connection_string: {PG_URL}\n",
    ):
        with pytest.raises(ConfigError) as raised:
            load_config(_write(tmp_path / "s.yaml", line))
        yield str(raised.value)
    monkeypatch.setenv("STORAGE_CONNECTION_STRING", f"mysql://app:{SECRET}@db/app")
    with pytest.raises(ConfigError) as raised:
        load_config()
    yield str(raised.value)
    with pytest.raises(ConfigError) as raised:
        config_from_url(f"mysql://app:{SECRET}@db/app")
    yield str(raised.value)


def test_the_password_never_appears_in_reprs_errors_or_logs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    texts = list(_secret_paths(tmp_path, monkeypatch))
    monkeypatch.setenv("STORAGE_CONNECTION_STRING", PG_URL)
    load_config()
    assert len(texts) > 20
    for text_ in texts:
        assert SECRET not in text_, text_
    assert caplog.records, "load_config logs the configuration it settled on"
    assert SECRET not in caplog.text
    assert "app:***@db.example" in caplog.text


def test_create_storage_builds_each_sql_backend(tmp_path: Path) -> None:
    sqlite = create_storage(StorageConfig(database_path=tmp_path / "s.db"))
    assert isinstance(sqlite, SQLiteSessionStorage)
    assert sqlite.database_path == tmp_path / "s.db"
    pg = create_storage(StorageConfig(connection_string=PG_URL, min_pool_size=1, max_pool_size=4))
    assert isinstance(pg, PostgreSQLSessionStorage)
    assert (pg.min_pool_size, pg.max_pool_size) == (1, 4)


async def test_sqlite_options_reach_the_connection(tmp_path: Path) -> None:
    config = StorageConfig(
        database_path=tmp_path / "s.db", options={"synchronous": "normal", "cache_size": -4096}
    )
    async with create_storage(config) as storage:
        assert isinstance(storage, SQLiteSessionStorage)
        async with storage.engine.connect() as connection:
            assert (await connection.exec_driver_sql("PRAGMA synchronous")).scalar() == 1
            assert (await connection.exec_driver_sql("PRAGMA cache_size")).scalar() == -4096
    async with create_storage(StorageConfig(database_path=tmp_path / "d.db")) as storage:
        assert isinstance(storage, SQLiteSessionStorage)
        async with storage.engine.connect() as connection:
            assert (await connection.exec_driver_sql("PRAGMA synchronous")).scalar() == 2  # FULL


@pytest.mark.postgresql
async def test_postgresql_options_reach_the_connection(postgresql_url: str) -> None:
    config = StorageConfig(
        connection_string=postgresql_url,
        min_pool_size=1,
        max_pool_size=2,
        options={"statement_timeout": 1.5, "command_timeout": 30},
    )
    async with create_storage(config) as storage:
        assert isinstance(storage, PostgreSQLSessionStorage)
        async with storage.engine.connect() as connection:
            assert (await connection.execute(text("SHOW statement_timeout"))).scalar() == "1500ms"


@pytest.mark.parametrize(("seconds", "sent"), [(0.0009, "1"), (0.0004, "1"), (1.5, "1500")])
def test_a_timeout_under_a_millisecond_is_one_not_none(seconds: float, sent: str) -> None:
    # Found by attack: 0.0009 s was sent as statement_timeout=0, PostgreSQL's "none".
    # (The server's reading of "1500" as 1500ms: test_postgresql_options_reach_the_connection.)
    args = postgresql_connect_args(
        statement_timeout=seconds, command_timeout=None, connect_timeout=10
    )
    assert args["server_settings"]["statement_timeout"] == sent


async def test_a_busy_timeout_under_a_millisecond_is_one_not_none(tmp_path: Path) -> None:
    config = StorageConfig(database_path=tmp_path / "t.db", options={"busy_timeout": 0.0004})
    async with create_storage(config) as storage:
        assert isinstance(storage, SQLiteSessionStorage)
        async with storage.engine.connect() as connection:
            assert (await connection.exec_driver_sql("PRAGMA busy_timeout")).scalar() == 1


@pytest.mark.parametrize("option", ["statement_timeout", "busy_timeout"])
def test_a_timeout_past_what_the_engines_take_is_refused(option: str) -> None:
    backend = {"connection_string": PG_URL} if option == "statement_timeout" else {}
    with pytest.raises(ConfigError, match=rf"options.{option}.*less than or equal to 2147483"):
        StorageConfig(**backend, options={option: 1e300})
    StorageConfig(**backend, options={option: 2_147_483})


@pytest.mark.parametrize("bound", ["max_pool_size", "min_pool_size"])
@pytest.mark.parametrize("written", ["3.0", 3.0, "30.0"])
def test_one_pool_bound_moves_the_other_however_it_is_written(bound: str, written: object) -> None:
    # Found by attack: STORAGE_MAX_POOL_SIZE=3.0 kept the default minimum 5 and was refused.
    size = int(float(str(written)))
    if (bound == "max_pool_size") != (size < 5):
        pytest.skip("this size moves nothing")
    config = StorageConfig(connection_string=PG_URL, **{bound: written})
    assert (config.min_pool_size, config.max_pool_size) == (size, size)


@pytest.mark.parametrize("path", ["~old.db", "~no-such-user-here/chat.db"])
def test_a_tilde_that_names_no_home_is_a_config_error(path: str) -> None:
    # Found by attack: a bare RuntimeError ("Could not determine home directory").
    with pytest.raises(ConfigError, match=rf"database_path: {path} begins with ~.*full path"):
        StorageConfig(database_path=path)
    with pytest.raises(ConfigError, match="names no home directory"):
        config_from_url(f"sqlite:///{path}")
    full = Path.cwd() / path
    assert StorageConfig(database_path=full).database_path == full


@pytest.mark.parametrize(
    "name", ["reports?2024.db", "b%20c.db", "x#y.db", "ü n.db", "My Documents.db", "a+b.db"]
)
def test_sql_url_names_the_configured_file(tmp_path: Path, name: str) -> None:
    # Found by attack: `?` cut the URL and `%20` was decoded: another file was named.
    (tmp_path / "d").mkdir()
    path = tmp_path / "d" / name
    engine = create_engine(sql_url(StorageConfig(database_path=path)))
    try:
        with engine.begin() as connection:
            connection.execute(text("CREATE TABLE t (x INTEGER)"))
    finally:
        engine.dispose()
    assert [p.name for p in (tmp_path / "d").iterdir()] == [name]
    # A name SQLAlchemy reads as written is the same URL to --url (found by attack: a
    # first version escaped spaces too, and `--url` named another file).
    if not set(name) & set("%?#"):
        assert config_from_url(sql_url(StorageConfig(database_path=path))).database_path == path


def _has_mongo_backend() -> bool:
    try:
        return importlib.util.find_spec("persistence.mongo.backend") is not None
    except ModuleNotFoundError:
        return False


def test_missing_drivers_name_the_extra_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "asyncpg", None)
    with pytest.raises(ConfigError, match=r"install persistence\[postgresql\]"):
        create_storage(StorageConfig(connection_string=PG_URL))
    for name in [n for n in sys.modules if n.startswith("persistence.mongo")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "beanie", None)
    monkeypatch.setitem(sys.modules, "pymongo", None)
    config = StorageConfig(connection_string="mongodb://mongo.example/")
    with pytest.raises(ConfigError) as raised:
        create_storage(config)
    if not _has_mongo_backend():
        assert "has no MongoDB backend" in str(raised.value)
    else:
        assert "install persistence[mongodb]" in str(raised.value)


def test_config_from_url_accepts_every_documented_form() -> None:
    assert config_from_url("sqlite:///rel/x.db").database_path == Path("rel/x.db")
    assert config_from_url("sqlite+aiosqlite:////abs/x.db").database_path == Path("/abs/x.db")
    for url in (
        "postgresql://u@h/db",
        "postgresql+asyncpg://u@h/db",
        "postgres://u@h/db",
    ):
        config = config_from_url(url)
        assert config.backend == "postgresql"
        assert sql_url(config).startswith(("postgresql://", "postgresql+asyncpg://"))
    for url in ("mongodb://h/", "mongodb+srv://cluster.example.net/"):
        assert config_from_url(url).backend == "mongodb"
    with pytest.raises(ConfigError, match="no SQL schema"):
        sql_url(config_from_url("mongodb://h/"))
    for bad in ("mysql://h/db", "just-a-path.db", "sqlite:///:memory:", "sqlite://"):
        with pytest.raises(ConfigError, match="URL"):
            config_from_url(bad)


def test_config_from_url_keeps_tuning_from_a_base() -> None:
    base = StorageConfig(expiry_hours=5, min_pool_size=1, options={"synchronous": "NORMAL"})
    same = config_from_url("sqlite:///x.db", base=base)
    assert (same.expiry_hours, same.min_pool_size, same.options) == (
        5,
        1,
        {"synchronous": "NORMAL"},
    )
    other = config_from_url("postgresql://u@h/db", base=base)
    assert (other.expiry_hours, other.options) == (5, {})


def _alembic(environment: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("STORAGE_")}
    env.pop("PERSISTENCE_CONFIG", None)
    env["PYTHONPATH"] = str(ROOT)
    env.update(environment)
    # From an empty directory: a ./gemini_sessions.db the checkout may hold (left by
    # `persistence demo`) is neither used nor mistaken for one this test made.
    return subprocess.run(
        [sys.executable, "-m", "alembic", "-c", str(ROOT / "alembic.ini"), "upgrade", "head"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_alembic_upgrade_head_follows_the_storage_variables_on_sqlite(tmp_path: Path) -> None:
    target = tmp_path / "from-env.db"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = _alembic({"STORAGE_DATABASE_PATH": str(target)}, elsewhere)
    assert result.returncode == 0, result.stderr
    engine = create_engine(f"sqlite:///{target}")
    try:
        assert {"chat_sessions", "chat_messages", "uploaded_files"} <= set(
            inspect(engine).get_table_names()
        )
    finally:
        engine.dispose()
    assert not (elsewhere / "gemini_sessions.db").exists()


@pytest.mark.postgresql
def test_alembic_upgrade_head_follows_the_storage_variables_on_postgresql(
    postgresql_admin_url: str, tmp_path: Path
) -> None:
    with servers.throwaway_postgresql_database(postgresql_admin_url) as url:
        result = _alembic(
            {"STORAGE_BACKEND": "postgresql", "STORAGE_CONNECTION_STRING": url}, tmp_path
        )
        assert result.returncode == 0, result.stderr
        assert asyncio.run(_alembic_version(url))


async def _alembic_version(url: str) -> str | None:
    import asyncpg

    connection = await asyncpg.connect(url)
    try:
        version: str | None = await connection.fetchval(
            "SELECT version_num FROM persistence_alembic_version"
        )
        return version
    finally:
        await connection.close()
