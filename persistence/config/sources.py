"""Where configuration values come from: STORAGE_* variables and YAML or TOML files.

Returns raw values and, for each, a description of its source; `persistence.config`
parses and checks them, so that every error names the setting and where it came from.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

from persistence.errors import ConfigError

CONFIG_FILE_VARIABLE = "PERSISTENCE_CONFIG"
DISCOVERED_FILES = ("persistence.yaml", "persistence.yml", "persistence.toml")
_VARIABLE = re.compile(r"\$\$\{|\$\{([^}]*)\}|\$\{")
_VARIABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class _EnvironmentSettings(BaseSettings):
    """The raw STORAGE_* variables; StorageConfig parses and checks them."""

    model_config = SettingsConfigDict(
        env_prefix="STORAGE_", env_nested_delimiter="__", env_ignore_empty=True, extra="ignore"
    )

    backend: str | None = None
    database_path: str | None = None
    connection_string: str | None = None
    read_replicas: str | None = None
    min_pool_size: str | None = None
    max_pool_size: str | None = None
    auto_save: str | None = None
    expiry_hours: str | None = None
    options: dict[str, Any] | None = None


def read_environment() -> tuple[dict[str, Any], dict[str, str]]:
    try:
        raw = _EnvironmentSettings().model_dump(exclude_none=True)
    except (ValidationError, SettingsError):
        raise ConfigError(
            "storage setting options (from environment variable STORAGE_OPTIONS): not a JSON object"
        ) from None
    names = {key.upper() for key in os.environ}
    sources = {key: f"environment variable STORAGE_{key.upper()}" for key in raw}
    for key in raw.get("options", {}):
        nested = f"STORAGE_OPTIONS__{key.upper()}"
        variable = nested if nested in names else "STORAGE_OPTIONS"
        sources[f"options.{key}"] = f"environment variable {variable}"
    return raw, sources


def expand(value: Any, where: str) -> Any:
    """Expands ${VAR} and ${VAR:-default} in every string of a file's values."""
    if isinstance(value, dict):
        return {key: expand(item, f"{where}.{key}") for key, item in value.items()}
    if isinstance(value, list):
        return [expand(item, f"{where}[{i}]") for i, item in enumerate(value)]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$${":
            return "${"
        if match.group(1) is None:
            raise ConfigError(f"{where}: unterminated ${{ (write $${{ for a literal one)")
        name, has_default, default = match.group(1).partition(":-")
        if not _VARIABLE_NAME.fullmatch(name):
            raise ConfigError(f"{where}: ${{{name}}} is not a valid variable reference")
        found = os.environ.get(name)
        if found:
            return found
        if has_default:
            return default
        if found is not None:
            return found
        raise ConfigError(
            f"{where}: environment variable {name} is not set"
            f" (write ${{{name}:-default}} to give a default)"
        )

    return _VARIABLE.sub(substitute, value)


def read_file(path: Path, known: Iterable[str]) -> dict[str, Any]:
    suffix = path.suffix.lower()
    if suffix not in (".yaml", ".yml", ".toml"):
        raise ConfigError(f"config file {path}: unknown type (use .yaml, .yml or .toml)")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {path}: not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError(f"config file {path}: cannot be read ({reason})") from None
    try:
        document = tomllib.loads(text) if suffix == ".toml" else yaml.safe_load(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: not valid TOML ({exc})") from None
    except yaml.YAMLError as exc:
        # The mark's own text quotes the line, which may hold a password.
        mark = getattr(exc, "problem_mark", None)
        at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or "malformed"
        raise ConfigError(f"config file {path}: not valid YAML ({at}{problem})") from None
    if not isinstance(document, dict) or "storage" not in document:
        raise ConfigError(f"config file {path}: no `storage` section")
    section = document["storage"]
    if section is None:
        return {}
    if not isinstance(section, dict):
        raise ConfigError(f"config file {path}: `storage` must be a mapping of settings")
    known = list(known)
    for key in section:
        if key not in known:
            raise ConfigError(
                f"config file {path}: storage.{key}: unknown setting (known: {', '.join(known)})"
            )
    options = section.get("options", {})
    if options is not None and not isinstance(options, dict):
        raise ConfigError(f"config file {path}: storage.options must be a mapping")
    expanded: dict[str, Any] = expand(section, f"config file {path}: storage")
    return expanded


def config_file_path(path: str | Path | None = None) -> Path | None:
    """The config file load_config reads: `path`, else $PERSISTENCE_CONFIG, else one
    of ./persistence.yaml, ./persistence.yml, ./persistence.toml if present."""
    if path is not None:
        return Path(path)
    named = os.environ.get(CONFIG_FILE_VARIABLE)
    if named:
        return Path(named)
    for candidate in DISCOVERED_FILES:
        if Path(candidate).is_file():
            return Path(candidate)
    return None
