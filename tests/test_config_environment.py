"""The environment over the file, completely where it speaks; --url over both.

Unknown STORAGE_* variables are errors; an empty variable clears the file's value;
STORAGE_BACKEND switches a file's store; one pool bound moves the other's default;
${VAR} in a URL's user info is percent-encoded; --url never reads the file's store.
"""

from __future__ import annotations

import logging
from pathlib import Path
from urllib.parse import quote

import pytest
from typer.testing import CliRunner

from persistence import ConfigError
from persistence.cli import app
from persistence.config import StorageConfig, load_config

# An empty current directory and no STORAGE_* variable or config file: a fresh machine.
pytestmark = pytest.mark.usefixtures("workdir")

PG_FILE = (
    "storage:\n"
    "  backend: postgresql\n"
    "  connection_string: postgresql://app:pw@db.example/app\n"
    "  read_replicas: [postgresql://app:pw@replica.example/app]\n"
    "  min_pool_size: 2\n"
    "  options:\n"
    "    statement_timeout: 5\n"
    "    synchronous: NORMAL\n"
)


def _file(tmp_path: Path, text: str, name: str = "app.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# Item 3: unknown STORAGE_* variables.


@pytest.mark.parametrize(
    ("name", "hint"),
    [
        ("STORAGE_DATABASEPATH", "did you mean STORAGE_DATABASE_PATH"),
        ("STORAGE_POOL", None),
        ("storage_max_pool", "did you mean STORAGE_MAX_POOL_SIZE"),
    ],
)
def test_an_unknown_storage_variable_is_an_error_naming_it(
    monkeypatch: pytest.MonkeyPatch, name: str, hint: str | None
) -> None:
    monkeypatch.setenv(name, "/srv/x.db")
    with pytest.raises(ConfigError, match=f"environment variable {name}: unknown") as caught:
        load_config()
    assert "STORAGE_DATABASE_PATH" in str(caught.value)  # the known ones are listed
    if hint:
        assert hint in str(caught.value)


def test_every_documented_variable_and_other_prefixes_are_accepted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, value in {
        "STORAGE_BACKEND": "sqlite",
        "STORAGE_CONNECTION_STRING": "",
        "STORAGE_DATABASE_PATH": "/srv/chat.db",
        "STORAGE_MIN_POOL_SIZE": "1",
        "STORAGE_MAX_POOL_SIZE": "2",
        "STORAGE_AUTO_SAVE": "false",
        "STORAGE_EXPIRY_HOURS": "3",
        "STORAGE_READ_REPLICAS": "",
        "STORAGE_OPTIONS": '{"busy_timeout": 5}',
        "STORAGE_OPTIONS__SYNCHRONOUS": "NORMAL",
        "PERSISTENCE_TEST_WHATEVER": "x",
        "MY_STORAGE_THING": "x",
    }.items():
        monkeypatch.setenv(name, value)
    config = load_config()
    assert config.database_path == Path("/srv/chat.db")
    assert config.options == {"busy_timeout": 5.0, "synchronous": "NORMAL"}


# Item 4: the environment overrides the file completely where it speaks.


def test_storage_backend_sqlite_switches_a_files_postgresql_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("STORAGE_BACKEND", "sqlite")
    monkeypatch.setenv("STORAGE_DATABASE_PATH", str(tmp_path / "local.db"))
    with caplog.at_level(logging.WARNING, logger="persistence"):
        config = load_config(_file(tmp_path, PG_FILE))
    assert config.backend == "sqlite"
    assert config.connection_string is None
    assert config.database_path == tmp_path / "local.db"
    assert config.options == {"synchronous": "NORMAL"}
    assert config.min_pool_size == 2  # what applies to every backend stays
    warnings = " ".join(record.getMessage() for record in caplog.records)
    for dropped in ("connection_string", "read_replicas", "statement_timeout"):
        assert dropped in warnings
    assert "pw" not in warnings


def test_the_settings_the_environment_overrides_in_a_named_file_are_logged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Found by attack: STORAGE_DATABASE_PATH left in the shell beat `--config
    staging.yaml` without a word. The precedence stays; it is said, values unshown."""
    text = (
        "storage:\n  connection_string: postgresql://app:Sekr1t@db.example/app\n"
        "  expiry_hours: 5\n  options: {statement_timeout: 5, command_timeout: 9}\n"
    )
    path = _file(tmp_path, text)
    monkeypatch.setenv("STORAGE_CONNECTION_STRING", "postgresql://app:Other2@db2.example/app")
    monkeypatch.setenv("STORAGE_OPTIONS__STATEMENT_TIMEOUT", "7")
    monkeypatch.setenv("STORAGE_OPTIONS__COMMAND_TIMEOUT", "")
    with caplog.at_level(logging.WARNING, logger="persistence"):
        config = load_config(path)
    assert config.display_url == "postgresql://app:***@db2.example/app"
    assert [record.getMessage() for record in caplog.records] == [
        f"storage setting {key} from config file {path} overridden by {variable}"
        for key, variable in [
            ("connection_string", "environment variable STORAGE_CONNECTION_STRING"),
            (
                "options.statement_timeout",
                "environment variable STORAGE_OPTIONS__STATEMENT_TIMEOUT",
            ),
            (
                "options.command_timeout",
                "empty environment variable STORAGE_OPTIONS__COMMAND_TIMEOUT",
            ),
        ]
    ]
    # A file found in the current directory, not named: the precedence as before, quietly.
    caplog.clear()
    Path("persistence.yaml").write_text(text, encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="persistence"):
        assert load_config() == config
    assert caplog.records == []


@pytest.mark.parametrize(
    ("in_file", "variable", "value"),
    [
        ("connection_string: sqlite:///file.db", "STORAGE_DATABASE_PATH", "env.db"),
        ("database_path: file.db", "STORAGE_CONNECTION_STRING", "sqlite:///env.db"),
    ],
)
def test_a_named_files_sqlite_file_overridden_either_way_is_logged(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    in_file: str,
    variable: str,
    value: str,
) -> None:
    # A SQLite file is one setting, however each side writes it.
    path = _file(tmp_path, f"storage:\n  {in_file}\n")
    monkeypatch.setenv(variable, value)
    with caplog.at_level(logging.WARNING, logger="persistence"):
        assert load_config(path).database_path == Path("env.db")
    setting = in_file.partition(":")[0]
    assert [record.getMessage() for record in caplog.records] == [
        f"storage setting {setting} from config file {path} overridden by"
        f" environment variable {variable}"
    ]


def test_the_command_line_says_which_settings_of_its_config_file_the_environment_overrides(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _file(tmp_path, f"storage:\n  database_path: {tmp_path / 'staging.db'}\n")
    monkeypatch.setenv("STORAGE_DATABASE_PATH", str(tmp_path / "production.db"))
    result = CliRunner().invoke(app, ["--config", str(path), "upgrade"])
    assert result.exit_code == 0, result.output
    assert result.stderr == (
        f"WARNING persistence.config.loading: storage setting database_path from config"
        f" file {path} overridden by environment variable STORAGE_DATABASE_PATH\n"
    )
    assert f"sqlite:///{tmp_path / 'production.db'}: schema is at head" in result.stdout


def test_an_overriding_variable_is_named_as_it_is_set_whatever_its_case(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by attack: `storage_database_path` (read, as pydantic-settings reads names
    whatever their case) was named STORAGE_DATABASE_PATH, a variable not set."""
    text = f"storage:\n  database_path: {tmp_path / 'staging.db'}\n  options: {{busy_timeout: 5}}\n"
    path = _file(tmp_path, text)
    monkeypatch.setenv("storage_database_path", str(tmp_path / "production.db"))
    monkeypatch.setenv("Storage_Options__Busy_Timeout", "7")
    result = CliRunner().invoke(app, ["--config", str(path), "upgrade"])
    assert result.exit_code == 0, result.output
    assert result.stderr == "".join(
        f"WARNING persistence.config.loading: storage setting {setting} from config"
        f" file {path} overridden by environment variable {variable}\n"
        for setting, variable in [
            ("database_path", "storage_database_path"),
            ("options.busy_timeout", "Storage_Options__Busy_Timeout"),
        ]
    )
    monkeypatch.setenv("Storage_Options__Busy_Timeout", "never")
    with pytest.raises(ConfigError, match="environment variable Storage_Options__Busy_Timeout"):
        load_config(path)
    monkeypatch.delenv("Storage_Options__Busy_Timeout")
    monkeypatch.setenv("storage_Options", "[1]")
    with pytest.raises(ConfigError, match=r"variable storage_Options\): not a JSON"):
        load_config(path)


def test_storage_backend_sqlite_gets_past_an_unset_variable_of_the_dropped_url(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _file(tmp_path, "storage:\n  connection_string: postgresql://a:${UNSET_PW}@db/x\n")
    monkeypatch.setenv("STORAGE_BACKEND", "sqlite")
    assert load_config(path).backend == "sqlite"


def test_an_environment_url_of_another_backend_wins_over_the_files_backend(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STORAGE_CONNECTION_STRING", f"sqlite:///{tmp_path / 'env.db'}")
    config = load_config(_file(tmp_path, PG_FILE))
    assert (config.backend, config.database_path) == ("sqlite", tmp_path / "env.db")


def test_storage_backend_postgresql_drops_the_files_sqlite_options(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _file(tmp_path, "storage:\n  options: {synchronous: NORMAL, cache_size: 100}\n")
    monkeypatch.setenv("STORAGE_BACKEND", "postgresql")
    monkeypatch.setenv("STORAGE_CONNECTION_STRING", "postgresql://app@db/app")
    config = load_config(path)
    assert (config.backend, config.options) == ("postgresql", {})


def test_conflicts_inside_the_environment_stay_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STORAGE_BACKEND", "sqlite")
    monkeypatch.setenv("STORAGE_CONNECTION_STRING", "postgresql://app@db/app")
    with pytest.raises(ConfigError, match="does not fit backend sqlite"):
        load_config()


def test_storage_database_path_replaces_the_files_sqlite_url(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _file(tmp_path, "storage:\n  connection_string: sqlite:///${FILE_DB}\n")
    monkeypatch.setenv("FILE_DB", "file.db")
    monkeypatch.setenv("STORAGE_DATABASE_PATH", "env.db")
    assert load_config(path).database_path == Path("env.db")
    monkeypatch.setenv("STORAGE_DATABASE_PATH", "")  # cleared: the default applies
    assert load_config(path).database_path == Path("gemini_sessions.db")
    monkeypatch.delenv("STORAGE_DATABASE_PATH")
    # And the other way round: the environment's URL replaces the file's database_path.
    path = _file(tmp_path, "storage:\n  database_path: file.db\n")
    monkeypatch.setenv("STORAGE_CONNECTION_STRING", "sqlite:///env.db")
    assert load_config(path).database_path == Path("env.db")


@pytest.mark.parametrize("where", ["environment", "file"])
def test_a_database_path_and_a_sqlite_url_of_one_source_must_agree(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    if where == "environment":
        monkeypatch.setenv("STORAGE_DATABASE_PATH", "a.db")
        monkeypatch.setenv("STORAGE_CONNECTION_STRING", "sqlite:///b.db")
        path = None
    else:
        path = _file(
            tmp_path, "storage:\n  database_path: a.db\n  connection_string: sqlite:///b.db\n"
        )
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    message = str(raised.value)
    assert "b.db" in message and "database_path" in message and "a.db" in message
    assert ("STORAGE_DATABASE_PATH" in message) == (where == "environment")
    if where == "environment":
        monkeypatch.setenv("STORAGE_DATABASE_PATH", "./b.db")  # the same file: no conflict
        assert load_config().database_path == Path("b.db")


def test_an_empty_variable_clears_the_files_value(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _file(
        tmp_path,
        "storage:\n  backend: sqlite\n  connection_string: sqlite:////srv/file.db\n"
        "  expiry_hours: 5\n  options: {synchronous: NORMAL}\n",
    )
    monkeypatch.setenv("STORAGE_CONNECTION_STRING", "")
    monkeypatch.setenv("STORAGE_EXPIRY_HOURS", "")
    monkeypatch.setenv("STORAGE_OPTIONS__SYNCHRONOUS", "")
    config = load_config(path)
    assert config.connection_string is None
    assert config.database_path == Path("gemini_sessions.db")
    assert (config.expiry_hours, config.options) == (72, {})


def test_an_empty_connection_string_and_sqlite_backend_leave_postgresql(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STORAGE_CONNECTION_STRING", "")
    with pytest.raises(ConfigError, match=r"connection_string .*required for backend postgresql"):
        load_config(_file(tmp_path, PG_FILE))
    monkeypatch.setenv("STORAGE_BACKEND", "sqlite")
    assert load_config(_file(tmp_path, PG_FILE)).backend == "sqlite"


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ({"STORAGE_MAX_POOL_SIZE": "3"}, (3, 3)),
        ({"STORAGE_MAX_POOL_SIZE": "8"}, (5, 8)),
        ({"STORAGE_MIN_POOL_SIZE": "30"}, (30, 30)),
        ({"STORAGE_MIN_POOL_SIZE": "1"}, (1, 20)),
    ],
)
def test_one_pool_bound_moves_the_others_default(
    monkeypatch: pytest.MonkeyPatch, given: dict[str, str], expected: tuple[int, int]
) -> None:
    monkeypatch.setenv("STORAGE_BACKEND", "postgresql")
    monkeypatch.setenv("STORAGE_CONNECTION_STRING", "postgresql://app@db/app")
    for name, value in given.items():
        monkeypatch.setenv(name, value)
    config = load_config()
    assert (config.min_pool_size, config.max_pool_size) == expected
    assert StorageConfig(max_pool_size=3).min_pool_size == 3


def test_two_explicit_conflicting_pool_bounds_stay_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STORAGE_MAX_POOL_SIZE", "3")
    path = _file(tmp_path, "storage:\n  min_pool_size: 10\n")
    with pytest.raises(ConfigError, match=r"min_pool_size \(from config file .*greater"):
        load_config(path)
    with pytest.raises(ConfigError, match="greater than max_pool_size"):
        StorageConfig(min_pool_size=9, max_pool_size=2)


# Item 2: ${VAR} in a URL's user info is percent-encoded.


@pytest.mark.parametrize("password", ["p@ss/w?rd#x", "100%", "plain", "a:b c"])
def test_a_variable_in_the_user_info_is_percent_encoded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, password: str
) -> None:
    monkeypatch.setenv("DB_USER", "app@tenant")
    monkeypatch.setenv("DB_PASSWORD", password)
    monkeypatch.setenv("DB_HOST", "db.example:5432")
    path = _file(
        tmp_path,
        "storage:\n"
        "  connection_string: postgresql://${DB_USER}:${DB_PASSWORD}@${DB_HOST}/app\n"
        "  read_replicas: ['postgresql://app:${DB_PASSWORD}@replica/app']\n",
    )
    config = load_config(path)
    assert config.connection_string is not None
    encoded = quote(password, safe="")
    assert config.connection_string.get_secret_value() == (
        f"postgresql://app%40tenant:{encoded}@db.example:5432/app"
    )
    assert config.read_replicas[0].get_secret_value() == f"postgresql://app:{encoded}@replica/app"


def test_a_whole_url_variable_and_other_settings_are_inserted_as_they_are(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://app:p%40ss@db/app")
    monkeypatch.setenv("NAME", "a@b")
    path = _file(
        tmp_path,
        "storage:\n  connection_string: ${DATABASE_URL}\n"
        "  options: {statement_timeout: 3}\n  database_path: /srv/${NAME}.db\n",
    )
    config = load_config(path)
    assert config.connection_string is not None
    assert config.connection_string.get_secret_value() == "postgresql://app:p%40ss@db/app"
    assert config.database_path == Path("/srv/a@b.db")


def test_a_raw_password_written_in_a_file_is_refused_naming_the_file(tmp_path: Path) -> None:
    path = _file(tmp_path, "storage:\n  connection_string: 'postgresql://app:p@ss#x@db/app'\n")
    with pytest.raises(ConfigError, match=r"connection_string \(from config file .*%40") as caught:
        load_config(path)
    assert "p@ss" not in str(caught.value)


# Item 5: --url replaces the configured store without reading it.


def test_url_gets_past_a_file_whose_store_variable_is_unset(tmp_path: Path) -> None:
    path = _file(
        tmp_path,
        "storage:\n  backend: postgresql\n"
        "  connection_string: postgresql://app:${UNSET_DB_PASSWORD}@db/app\n"
        "  read_replicas: ['${UNSET_REPLICA}']\n"
        "  expiry_hours: 7\n  options: {statement_timeout: 5}\n",
    )
    with pytest.raises(ConfigError, match="UNSET_DB_PASSWORD is not set"):
        load_config(path)
    target = tmp_path / "other.db"
    config = load_config(path, url=f"sqlite:///{target}")
    assert (config.backend, config.database_path, config.expiry_hours) == ("sqlite", target, 7)
    assert config.options == {}
    result = CliRunner().invoke(
        app, ["--config", str(path), "--url", f"sqlite:///{target}", "demo"]
    )
    assert result.exit_code == 0, result.output
    assert target.exists()


def test_url_ignores_the_environments_store_but_keeps_same_backend_options(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STORAGE_BACKEND", "mongodb")
    monkeypatch.setenv("STORAGE_CONNECTION_STRING", "mongodb://${broken")
    monkeypatch.setenv("STORAGE_OPTIONS__SYNCHRONOUS", "NORMAL")
    config = load_config(url=f"sqlite:///{tmp_path / 'x.db'}")
    assert (config.backend, config.options) == ("sqlite", {"synchronous": "NORMAL"})
    with pytest.raises(ConfigError, match="scheme mysql://"):
        load_config(url="mysql://app@db/app")


def test_url_drops_the_environments_options_of_another_backend(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Found by attack: a PostgreSQL deployment's STORAGE_OPTIONS__STATEMENT_TIMEOUT made
    # `--url sqlite:///old.db` fail as an unknown option, where the file's was dropped.
    monkeypatch.setenv("STORAGE_CONNECTION_STRING", "postgresql://app@db.invalid/app")
    monkeypatch.setenv("STORAGE_OPTIONS__STATEMENT_TIMEOUT", "30")
    monkeypatch.setenv("STORAGE_OPTIONS__BUSY_TIMEOUT", "7")
    with caplog.at_level(logging.INFO, logger="persistence.config.loading"):
        config = load_config(url=f"sqlite:///{tmp_path / 'old.db'}")
    assert (config.backend, config.options) == ("sqlite", {"busy_timeout": 7.0})
    assert (
        "storage option statement_timeout from environment variable"
        " STORAGE_OPTIONS__STATEMENT_TIMEOUT ignored: the store is sqlite (--url)"
    ) in caplog.messages
    assert load_config(url="postgresql://app@db.invalid/app").options == {"statement_timeout": 30.0}


def test_a_nested_option_variable_is_named_as_set(monkeypatch: pytest.MonkeyPatch) -> None:
    # Found by attack: the error named STORAGE_OPTIONS, a variable not set.
    monkeypatch.setenv("STORAGE_OPTIONS__SYNCHRONOUS__X", "1")
    with pytest.raises(
        ConfigError,
        match=r"options.synchronous \(from environment variable STORAGE_OPTIONS__SYNCHRONOUS__X\)",
    ):
        load_config()
