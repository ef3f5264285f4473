"""load_config: STORAGE_* variables over a config file's `storage` section over defaults.

The environment overrides the file completely where it speaks:
- a STORAGE_* variable replaces the file's value; an empty one clears it (the default
  applies);
- when the environment chooses the backend (STORAGE_BACKEND, or the scheme of
  STORAGE_CONNECTION_STRING), the file's settings that belong to another backend (its
  connection string, its read replicas, options the chosen backend does not have) are
  dropped with a warning.
Where the caller names the file (`--config`), each of its settings the environment
replaces or clears is logged as a warning too, naming the variable.
With `url` (the command line's --url) the URL is the store: the backend, connection
string, database path and read replicas of the file and the environment are not read
at all (an unset ${VAR} there is no error); the file's and the environment's options
the URL's backend does not have are dropped.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from persistence.config.settings import (
    OPTION_MODELS,
    StorageConfig,
    backend_of,
    build_config,
    url_settings,
)
from persistence.config.sources import (
    Environment,
    config_file_path,
    expand_file_values,
    read_environment,
    read_file,
)

logger = logging.getLogger(__name__)

# The settings that say which store: a --url replaces all of them.
STORE_SETTINGS = ("backend", "connection_string", "database_path", "read_replicas")


def load_config(path: str | Path | None = None, *, url: str | None = None) -> StorageConfig:
    """Reads STORAGE_* variables over a config file's `storage` section over defaults;
    with `url`, the store is the URL's (see the module's docstring).

    Raises:
        ConfigError: naming the setting and where it came from.
    """
    file_path = config_file_path(path)
    environment = read_environment()
    env_values = dict(environment.values)
    sources = dict(environment.sources)
    file_values: dict[str, Any] = {}
    if file_path is not None:
        file_values = read_file(file_path, StorageConfig.model_fields)
        if path is not None:
            _say_overridden(file_values, environment, file_path, by_url=url is not None)
        # The environment's word is final: the file's value is neither expanded nor used.
        for key in [*env_values, *environment.cleared]:
            if key != "options" and not key.startswith("options."):
                file_values.pop(key, None)
        _clear_options(file_values, environment.cleared)
    located = url_settings(url) if url is not None else {}
    if url is not None:
        for key in STORE_SETTINGS:
            file_values.pop(key, None)
            env_values.pop(key, None)
            sources.pop(key, None)
        chosen: str | None = located["backend"]
        _drop_other_environment_options(env_values, sources, located["backend"])
    else:
        chosen = _environment_backend(env_values)
    where = f"config file {file_path}"
    # Twice: before expanding (an unset ${VAR} in a dropped value is no error), and after.
    _drop_other_backend(file_values, chosen, where, quiet=url is not None)
    _drop_other_sqlite_file(file_values, env_values, environment.cleared)
    if file_path is not None:
        file_values = expand_file_values(file_values, file_path)
        _drop_other_backend(file_values, chosen, where, quiet=url is not None)
        _drop_other_sqlite_file(file_values, env_values, environment.cleared)
    for key in file_values:
        sources.setdefault(key, f"{where}, key storage.{key}")
    for key in file_values.get("options") or {}:
        sources.setdefault(f"options.{key}", f"{where}, key storage.options.{key}")
    values = {**file_values, **env_values}
    options = {**(file_values.get("options") or {}), **env_values.get("options", {})}
    if options:
        values["options"] = options
    values.update(located)
    sources.update({key: "the URL" for key in located})
    config = build_config(values, sources)
    logger.debug("configuration: %r (file: %s)", config, file_path or "none")
    return config


def _say_overridden(
    file_values: dict[str, Any], environment: Environment, file_path: Path, *, by_url: bool
) -> None:
    """Logs a warning for each setting of a file the caller named that the environment
    replaces or clears. Found by attack: a STORAGE_* variable left in the shell beat
    `--config staging.yaml` without a word."""

    def overridden(setting: str, source: str) -> None:
        logger.warning(
            "storage setting %s from config file %s overridden by %s",
            setting,
            file_path,
            environment.sources[source],
        )

    replaced = {key: key for key in [*environment.values, *environment.cleared]}
    # A SQLite file is one setting, whichever way each side writes it.
    if "database_path" in replaced and _sqlite_url(file_values.get("connection_string")):
        replaced["connection_string"] = "database_path"
    if _sqlite_url(environment.values.get("connection_string")):
        replaced["database_path"] = "connection_string"
    for key in file_values:
        if key == "options" or (by_url and key in STORE_SETTINGS) or key not in replaced:
            continue
        overridden(key, replaced[key])
    options = file_values.get("options")
    if not isinstance(options, dict):
        return
    if "options" in environment.cleared and options:
        overridden("options", "options")
        return
    replaced_options = {f"options.{key}" for key in environment.values.get("options", {})}
    for key in (f"options.{name}" for name in options):
        if key in replaced_options or key in environment.cleared:
            overridden(key, key)


def _sqlite_url(value: object) -> bool:
    return isinstance(value, str) and backend_of(value) == "sqlite"


def _clear_options(file_values: dict[str, Any], cleared: set[str]) -> None:
    if "options" in cleared:
        file_values.pop("options", None)
    options = file_values.get("options")
    if isinstance(options, dict):
        file_values["options"] = {
            key: value for key, value in options.items() if f"options.{key}" not in cleared
        }


def _environment_backend(env_values: dict[str, Any]) -> str | None:
    """The backend the environment chooses, if it chooses one this library knows."""
    backend = env_values.get("backend")
    if backend is not None:
        return backend if backend in OPTION_MODELS else None
    url = env_values.get("connection_string")
    return backend_of(url) if url else None


def _drop_other_sqlite_file(
    file_values: dict[str, Any], env_values: dict[str, Any], cleared: set[str]
) -> None:
    """Drops the file's SQLite file where the environment names (or clears) it the
    other way: database_path and a sqlite:/// connection string are one setting."""
    env_path = "database_path" in env_values or "database_path" in cleared
    url = file_values.get("connection_string")
    if env_path and isinstance(url, str) and backend_of(url) == "sqlite":
        file_values.pop("connection_string")
    env_url = env_values.get("connection_string")
    if isinstance(env_url, str) and backend_of(env_url) == "sqlite":
        file_values.pop("database_path", None)


def _drop_other_environment_options(
    env_values: dict[str, Any], sources: dict[str, str], chosen: str
) -> None:
    """Drops the environment's options the --url's backend does not have, as the file's
    are. Found by attack: STORAGE_OPTIONS__STATEMENT_TIMEOUT, set for the configured
    PostgreSQL store, made `--url sqlite:///old.db` (and `migrate --from` it) fail."""
    options = env_values.get("options")
    if not isinstance(options, dict):
        return
    known = OPTION_MODELS[chosen].model_fields
    dropped = [key for key in options if key not in known]
    if not dropped:
        return
    env_values["options"] = {key: value for key, value in options.items() if key in known}
    for key in dropped:
        where = sources.pop(f"options.{key}", "the environment")
        logger.info(
            "storage option %s from %s ignored: the store is %s (--url)", key, where, chosen
        )


def _drop_other_backend(
    file_values: dict[str, Any], chosen: str | None, where: str, *, quiet: bool
) -> None:
    """Drops the file's settings that belong to another backend than `chosen`."""
    if chosen is None:
        return
    log = logger.info if quiet else logger.warning
    reason = f"the store is {chosen}" + (" (--url)" if quiet else " (environment)")
    backend = file_values.get("backend")
    if isinstance(backend, str) and "$" not in backend and backend != chosen:
        file_values.pop("backend")
    url = file_values.get("connection_string")
    if isinstance(url, str) and backend_of(url) not in (None, chosen):
        file_values.pop("connection_string")
        log("storage setting connection_string from %s ignored: %s", where, reason)
    if file_values.get("read_replicas") and chosen != "postgresql":
        file_values.pop("read_replicas")
        log("storage setting read_replicas from %s ignored: %s", where, reason)
    options = file_values.get("options")
    if isinstance(options, dict):
        known = OPTION_MODELS[chosen].model_fields
        dropped = [key for key in options if key not in known]
        if dropped:
            file_values["options"] = {k: v for k, v in options.items() if k in known}
            log("storage options %s from %s ignored: %s", ", ".join(dropped), where, reason)
