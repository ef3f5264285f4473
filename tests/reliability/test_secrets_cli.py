"""The command line at -vv never prints the canary password; config YAML is read safely."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from persistence.cli import app
from persistence.config import load_config
from persistence.errors import ConfigError
from tests.reliability.conftest import Figures
from tests.reliability.test_secrets import CANARY, assert_hidden, closed_port, with_password

pytestmark = pytest.mark.postgresql


def _run(args: list[str], env: dict[str, str] | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(app, args, env=env)
    text = result.output + (result.stderr if result.stderr_bytes is not None else "")
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        text += repr(result.exception)
    return result.exit_code, text


def test_verbose_cli_output_never_shows_the_password(
    postgresql_url: str, tmp_path: Path, figures: Figures
) -> None:
    url = with_password(postgresql_url, CANARY)
    unreachable = f"postgresql://postgres:{CANARY}@127.0.0.1:{closed_port()}/postgres"
    commands = [
        (["upgrade", "--url", url, "-vv"], 0),
        (["demo", "--url", url, "-vv"], 0),
        (["stats", "--url", url, "-vv"], 0),
        (["sessions", "list", "--url", url, "-vv"], 0),
        (["export-all", str(tmp_path / "all.json"), "--url", url, "-vv"], 0),
        (["backup", str(tmp_path / "backups"), "--url", url, "-vv"], 0),
        (["migrate", "--from", url, "--to", f"sqlite:///{tmp_path / 'copy.db'}", "-vv"], 0),
        (["stats", "--url", unreachable, "-vv"], 1),
        (["sessions", "show", "no-such-session", "--url", url, "-vv"], 1),
    ]
    for args, expected in commands:
        code, text = _run(args)
        assert code == expected, (args[0], text[-500:])
        assert_hidden(text)
    # The same through the environment and a config file.
    config = tmp_path / "persistence.yaml"
    config.write_text(f"storage:\n  backend: postgresql\n  connection_string: '{url}'\n")
    code, text = _run(["stats", "--config", str(config), "-vv"])
    assert code == 0, text
    assert_hidden(text)
    code, text = _run(
        ["stats", "-vv"],
        env={"STORAGE_BACKEND": "postgresql", "STORAGE_CONNECTION_STRING": unreachable},
    )
    assert code == 1
    assert_hidden(text)
    figures["commands_checked"] = len(commands) + 2


def test_a_yaml_config_is_read_with_a_safe_loader(tmp_path: Path) -> None:
    marker = tmp_path / "executed"
    config = tmp_path / "evil.yaml"
    config.write_text(
        f"storage:\n  database_path: !!python/object/apply:os.system ['touch {marker}']\n"
    )
    with pytest.raises(ConfigError):
        load_config(config)
    assert not marker.exists()
