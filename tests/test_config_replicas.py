"""The `read_replicas` setting: a list in files, comma-separated in the environment,
masked everywhere, and what reaches the storage."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from persistence import ConfigError, InvalidDataError, PostgreSQLSessionStorage
from persistence.config import StorageConfig, config_from_url, create_storage, load_config

# An empty current directory and no STORAGE_* variable or config file: a fresh machine.
pytestmark = pytest.mark.usefixtures("workdir")

SECRET = "R3plica-s3cret"
PRIMARY = f"postgresql://app:{SECRET}@primary.example:5432/app"
REPLICA_1 = f"postgresql://reader:{SECRET}@replica1.example:5432/app"
REPLICA_2 = f"postgres://reader:{SECRET}@replica2.example/app"


def _urls(config: StorageConfig) -> list[str]:
    return [url.get_secret_value() for url in config.read_replicas]


def test_read_replicas_are_a_list_in_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REPLICA_PASSWORD", SECRET)
    path = tmp_path / "app.yaml"
    path.write_text(
        "storage:\n"
        f"  connection_string: {PRIMARY}\n"
        "  read_replicas:\n"
        "    - postgresql://reader:${REPLICA_PASSWORD}@replica1.example:5432/app\n"
        f"    - {REPLICA_2}\n",
        encoding="utf-8",
    )
    assert _urls(load_config(path)) == [REPLICA_1, REPLICA_2]


def test_read_replicas_are_an_array_in_toml(tmp_path: Path) -> None:
    path = tmp_path / "app.toml"
    path.write_text(
        f'[storage]\nconnection_string = "{PRIMARY}"\n'
        f'read_replicas = ["{REPLICA_1}", "{REPLICA_2}"]\n',
        encoding="utf-8",
    )
    assert _urls(load_config(path)) == [REPLICA_1, REPLICA_2]


def test_the_environment_gives_them_comma_separated_over_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "app.toml"
    path.write_text(
        f'[storage]\nconnection_string = "{PRIMARY}"\nread_replicas = ["{REPLICA_1}"]\n',
        encoding="utf-8",
    )
    monkeypatch.setenv("STORAGE_READ_REPLICAS", f" {REPLICA_2} , {REPLICA_1},")
    assert _urls(load_config(path)) == [REPLICA_2, REPLICA_1]


def test_they_reach_the_storage_with_the_replica_options() -> None:
    config = StorageConfig(
        connection_string=PRIMARY,
        read_replicas=[REPLICA_1, REPLICA_2],
        options={"max_replica_lag": 2.5, "replica_timeout": 0.5, "replica_retry_interval": 3},
    )
    storage = create_storage(config)
    assert isinstance(storage, PostgreSQLSessionStorage)
    shown = repr(storage)
    assert "replica1.example" in shown and "replica2.example" in shown
    assert SECRET not in shown
    assert storage._replicas is not None
    settings = storage._replicas.settings
    assert (settings.max_lag, settings.timeout, settings.retry_interval) == (2.5, 0.5, 3)


def test_a_url_given_on_the_command_line_brings_no_replicas() -> None:
    base = StorageConfig(connection_string=PRIMARY, read_replicas=[REPLICA_1])
    assert config_from_url("postgresql://other@host/db", base=base).read_replicas == ()


def test_replica_urls_are_masked_in_reprs_errors_and_logs(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("STORAGE_CONNECTION_STRING", PRIMARY)
    monkeypatch.setenv("STORAGE_READ_REPLICAS", f"{REPLICA_1},mysql://reader:{SECRET}@x/app")
    with pytest.raises(ConfigError) as refused:
        load_config()
    message = str(refused.value)
    assert "read_replicas" in message and "STORAGE_READ_REPLICAS" in message
    assert "item 2" in message and "mysql://" in message
    monkeypatch.setenv("STORAGE_READ_REPLICAS", f"{REPLICA_1},{REPLICA_2}")
    config = load_config()
    for text in (message, repr(config), str(config), caplog.text):
        assert SECRET not in text
    assert "reader:***@replica1.example" in repr(config)


def test_replicas_of_a_backend_without_them_are_dropped_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("STORAGE_BACKEND", "sqlite")
    monkeypatch.setenv("STORAGE_READ_REPLICAS", REPLICA_1)
    config = load_config()
    assert config.read_replicas == ()
    assert "read_replicas ignored" in caplog.text and SECRET not in caplog.text


@pytest.mark.parametrize(
    "options",
    [{"max_replica_lag": 0}, {"replica_timeout": -1}, {"replica_retry_interval": "soon"}],
)
def test_replica_options_out_of_range_are_refused(options: dict[str, object]) -> None:
    with pytest.raises(ConfigError, match=f"options.{next(iter(options))}"):
        StorageConfig(connection_string=PRIMARY, options=options)


def test_the_deploying_at_scale_examples_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.test_readme import blocks

    monkeypatch.setenv("DB_PASSWORD", SECRET)
    marker = "# persistence.yaml of every instance"
    examples = [block for block in blocks("yaml") if marker in block]
    assert len(examples) == 2
    postgresql, mongodb = (load_config(_write(tmp_path, text)) for text in examples)
    assert [url.get_secret_value() for url in postgresql.read_replicas] == [
        f"postgresql://app:{SECRET}@replica-{n}:5432/app" for n in (1, 2)
    ]
    assert postgresql.options["max_replica_lag"] == 10
    assert mongodb.backend == "mongodb"
    storage = create_storage(mongodb)
    assert repr(getattr(storage, "read_preference", None)).startswith("SecondaryPreferred")


def _write(directory: Path, text: str) -> Path:
    path = directory / f"example-{abs(hash(text))}.yaml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    "password", ["Tops3cret,9999", "Tops3cret,Xyzzy", "Tops3cret, part2", "a,postgresql:b"]
)
def test_a_raw_comma_in_a_password_does_not_cut_the_url(
    monkeypatch: pytest.MonkeyPatch, password: str
) -> None:
    monkeypatch.setenv("STORAGE_CONNECTION_STRING", PRIMARY)
    replica = f"postgresql://reader:{password}@replica1.example:5432/app"
    monkeypatch.setenv("STORAGE_READ_REPLICAS", f"{replica}, {REPLICA_2}")
    assert _urls(load_config()) == [replica, REPLICA_2]


def test_a_percent_encoded_comma_reaches_the_driver_as_a_comma(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from sqlalchemy.dialects.postgresql.asyncpg import dialect

    from persistence.sql.engines import postgresql_url, replica_connect_args

    monkeypatch.setenv("STORAGE_CONNECTION_STRING", PRIMARY)
    replica = "postgresql://reader:Tops3cret%2C9999@replica1.example:5432/app"
    monkeypatch.setenv("STORAGE_READ_REPLICAS", f"{replica},{REPLICA_2}")
    (first, _) = _urls(load_config())
    arguments = replica_connect_args(
        postgresql_url(first), dialect(), statement_timeout=None, connect_timeout=1
    )
    assert arguments["password"] == "Tops3cret,9999"


def test_a_multi_host_url_is_refused_as_one_item_naming_its_source(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Found by attack: libpq's list of hosts passed load_config(), and the storage
    then refused it as "not a database URL", naming no source. It is one item (the
    list is not cut at its commas), refused here; so is a primary's."""
    monkeypatch.setenv("STORAGE_CONNECTION_STRING", PRIMARY)
    replica = "postgresql://reader@replica1.example:5432,replica2.example:5433/app"
    monkeypatch.setenv("STORAGE_READ_REPLICAS", f"{REPLICA_2},{replica}")
    with pytest.raises(ConfigError) as refused:
        load_config()
    assert "read_replicas (from environment variable STORAGE_READ_REPLICAS): item 2:" in str(
        refused.value
    )
    assert "several hosts in one URL" in str(refused.value)
    monkeypatch.setenv("STORAGE_READ_REPLICAS", REPLICA_2)
    monkeypatch.setenv("STORAGE_CONNECTION_STRING", replica)
    with pytest.raises(ConfigError, match=r"connection_string .*several hosts in one URL"):
        load_config()
    with pytest.raises(InvalidDataError, match="several hosts in one URL"):
        PostgreSQLSessionStorage(replica)


@pytest.mark.parametrize(
    "replicas",
    [
        "postgresql://reader:Tops3cret",
        "postgresql://reader:Tops3cret/app",
        "postgresql://reader:Tops3cret,postgresql://reader:99999",
        "postgresql://reader:70000",
    ],
)
def test_an_error_about_a_replica_url_repeats_no_part_of_a_password(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, replicas: str
) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("STORAGE_CONNECTION_STRING", PRIMARY)
    monkeypatch.setenv("STORAGE_READ_REPLICAS", replicas)
    with pytest.raises(ConfigError) as refused:
        load_config()
    message = str(refused.value)
    assert "read_replicas" in message and "port" in message
    for secret in ("Tops3cret", "99999", "70000"):
        assert secret not in message and secret not in caplog.text
