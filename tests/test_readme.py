"""Every example of the README runs as written (or, where it cannot here, is checked)."""

from __future__ import annotations

import glob
import json
import os
import re
import shlex
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from persistence import ChatSession
from persistence.cli import app
from persistence.config import load_config, sql_url
from persistence.formats import render_json, render_markdown, render_text

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
BLOCKS = re.findall(r"^```(\w*)\n(.*?)^```$", README, flags=re.MULTILINE | re.DOTALL)
TEST_COMMAND = "python -m pytest -q -p no:cacheprovider"


def blocks(language: str) -> list[str]:
    return [body for lang, body in BLOCKS if lang == language]


def _environment() -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.upper().startswith("STORAGE_") and k != "PERSISTENCE_CONFIG"
    }
    env["PYTHONPATH"] = str(ROOT)
    return env


def _run_example(source: str, directory: Path) -> subprocess.CompletedProcess[str]:
    script = directory / "example.py"
    script.write_text(source, encoding="utf-8")
    return subprocess.run(
        [sys.executable, str(script)],
        cwd=directory,
        env=_environment(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture
def clean(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    for name in list(os.environ):
        if name.upper().startswith("STORAGE_") or name == "PERSISTENCE_CONFIG":
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_readme_has_the_examples_this_file_runs() -> None:
    assert len(blocks("python")) >= 4
    assert len(blocks("shell")) == 1
    assert {"markdown", "text", "json", "yaml", "toml", "sh"} <= {lang for lang, _ in BLOCKS}


@pytest.mark.parametrize("index", range(len(blocks("python"))))
def test_python_example_runs(index: int, tmp_path: Path) -> None:
    result = _run_example(blocks("python")[index], tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()


@pytest.mark.postgresql
def test_the_quick_start_runs_as_written_on_postgresql(tmp_path: Path, postgresql_url: str) -> None:
    quick_start = blocks("python")[0]
    assert 'SQLiteSessionStorage("quickstart.db")' in quick_start
    on_postgresql = quick_start.replace("SQLiteSessionStorage", "PostgreSQLSessionStorage")
    result = _run_example(on_postgresql.replace('"quickstart.db"', repr(postgresql_url)), tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Paris is the capital of France." in result.stdout


def test_set_up_commands_are_the_ci_ones() -> None:
    set_up = blocks("sh")[:2]
    assert set_up[0].strip() == 'python -m pip install -e ".[dev]" && persistence demo'
    assert set_up[1].strip() == TEST_COMMAND
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert re.search(rf"^{re.escape(TEST_COMMAND)}$", ci, flags=re.MULTILINE)


def test_export_examples_are_what_the_renderers_write() -> None:
    (document,) = blocks("json")
    session = ChatSession.model_validate(json.loads(document))
    assert render_json(session) == document
    assert render_markdown(session) == blocks("markdown")[0]
    assert render_text(session) == blocks("text")[0]


def test_config_file_examples_load(clean: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DB_PASSWORD", "pw")
    monkeypatch.delenv("DB_HOST", raising=False)
    (config_yaml,) = [b for b in blocks("yaml") if b.startswith("storage:")]
    (clean / "persistence.yaml").write_text(config_yaml, encoding="utf-8")
    config = load_config()
    assert sql_url(config) == "postgresql://app:pw@localhost:5432/app"
    assert config.options == {"statement_timeout": 30, "command_timeout": 60}
    (config_toml,) = blocks("toml")
    (clean / "persistence.toml").write_text(config_toml, encoding="utf-8")
    config = load_config("persistence.toml")
    assert config.database_path == Path("data/sessions.db")
    assert config.options == {"synchronous": "NORMAL", "cache_size": -20000}


def test_compose_example_migrates_before_the_service_starts() -> None:
    # No Docker here: check the file's shape instead of running it.
    (compose_text,) = [b for b in blocks("yaml") if b.startswith("services:")]
    compose = yaml.safe_load(compose_text)
    services = compose["services"]
    assert services["migrate"]["command"] == ["persistence", "upgrade"]
    assert services["migrate"]["depends_on"]["db"]["condition"] == "service_healthy"
    assert services["app"]["depends_on"]["migrate"]["condition"] == (
        "service_completed_successfully"
    )
    storage = services["app"]["environment"]
    assert storage["STORAGE_BACKEND"] == "postgresql"
    assert storage["STORAGE_CONNECTION_STRING"].startswith("postgresql://app:${DB_PASSWORD}@db")


def test_cli_examples_run_as_written(clean: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (shell,) = blocks("shell")
    lines = [line for line in shell.splitlines() if line.strip()]
    runner = CliRunner()
    first = runner.invoke(app, shlex.split(lines[0])[1:])
    assert first.exit_code == 0, first.output
    session_id = re.search(r"session (\S+) \(model", first.stdout)
    assert session_id is not None
    monkeypatch.setenv("SESSION_ID", session_id.group(1))
    for line in lines[1:]:
        words = []
        for word in shlex.split(os.path.expandvars(line)):
            # What the shell's globbing would do.
            words += sorted(glob.glob(word)) if "*" in word else [word]
        assert words[0] == "persistence"
        result = runner.invoke(app, words[1:])
        assert result.exit_code == 0, f"{line}\n{result.output}"
    assert (clean / "session.md").read_text(encoding="utf-8").startswith("# Chat Session: ")
    for copy in ("copy.db", "imported.db", "restored.db"):
        stats = runner.invoke(app, ["stats", "--json", "--url", f"sqlite:///{copy}"])
        assert json.loads(stats.stdout)["total_messages"] == 4, copy


def test_alembic_examples_run_from_a_project_root(tmp_path: Path) -> None:
    (migrations,) = [b for b in blocks("sh") if "alembic upgrade head" in b]
    for name in ("alembic.ini", "alembic", "persistence"):
        (tmp_path / name).symlink_to(ROOT / name)
    ran = 0
    for line in migrations.splitlines():
        words = shlex.split(line, comments=True)
        if not words or any("example" in word for word in words):
            continue  # a server that exists only in the example
        assert words[0] == "alembic"
        result = subprocess.run(
            [sys.executable, "-m", "alembic", *words[1:]],
            cwd=tmp_path,
            env=_environment(),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert result.returncode == 0, f"{line}\n{result.stderr}"
        ran += 1
    assert ran == 3
    with sqlite3.connect(tmp_path / "sessions.db") as connection:
        assert connection.execute("SELECT version_num FROM persistence_alembic_version").fetchone()
    with sqlite3.connect(tmp_path / "gemini_sessions.db") as connection:
        tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master")}
    assert "chat_sessions" not in tables  # downgrade base left an empty schema
