"""Where configuration values come from: STORAGE_* variables and YAML or TOML files.

Returns raw values and, for each, a description of its source; `persistence.config`
parses and checks them, so that every error names the setting and where it came from.
"""

from __future__ import annotations

import difflib
import os
import re
import stat
import tomllib
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import yaml
from pydantic import ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

from persistence.errors import ConfigError
from persistence.urls import SCHEME, url_given_as_path

CONFIG_FILE_VARIABLE = "PERSISTENCE_CONFIG"
DISCOVERED_FILES = ("persistence.yaml", "persistence.yml", "persistence.toml")
_VARIABLE = re.compile(r"\$\$\{|\$\{([^}]*)\}|\$\{")
_VARIABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
ENVIRONMENT_PREFIX = "STORAGE_"
# Settings whose values are database URLs: a ${VAR} in their user info is encoded.
URL_SETTINGS = ("connection_string", "read_replicas")


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


@dataclass
class Environment:
    """What the STORAGE_* variables say: values, where each came from, and the settings
    an empty variable clears (back to its default, whatever a file says)."""

    values: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    cleared: set[str] = field(default_factory=set)


def _check_names(known: Collection[str]) -> list[str]:
    """The STORAGE_* variables set; an unknown one is an error naming it."""
    names = [name for name in os.environ if name.upper().startswith(ENVIRONMENT_PREFIX)]
    allowed = [f"{ENVIRONMENT_PREFIX}{key.upper()}" for key in known]
    by_setting: dict[str, str] = {}
    for name in names:
        if (other := by_setting.setdefault(name.upper(), name)) != name:
            # Found by attack: one of the two silently won.
            raise ConfigError(
                f"environment variables {other} and {name} name the same storage setting"
                " (names are read whatever their case): set one of them"
            )
    for name in names:
        upper = name.upper()
        if upper in allowed or upper.startswith(f"{ENVIRONMENT_PREFIX}OPTIONS__"):
            continue
        close = difflib.get_close_matches(upper, allowed, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise ConfigError(
            f"environment variable {name}: unknown storage setting"
            f" ({hint}known: {', '.join(allowed)}, {ENVIRONMENT_PREFIX}OPTIONS__<option>)"
        )
    return names


def read_environment() -> Environment:
    """Reads the STORAGE_* variables (names case-insensitive, as pydantic-settings reads them).

    Raises:
        ConfigError: for an unknown STORAGE_* variable, or STORAGE_OPTIONS not JSON.
    """
    names = _check_names(_EnvironmentSettings.model_fields)
    # Found by attack: a warning named STORAGE_DATABASE_PATH for `storage_database_path`,
    # a variable `env | grep STORAGE_` does not show. Each is named as it is set.
    as_set = {name.upper(): name for name in names}

    def variable(upper: str) -> str:
        return as_set.get(upper, upper)

    options = variable(f"{ENVIRONMENT_PREFIX}OPTIONS")
    try:
        raw = _EnvironmentSettings().model_dump(exclude_none=True)
    except (ValidationError, SettingsError):
        raise ConfigError(
            f"storage setting options (from environment variable {options}): not a JSON object"
        ) from None
    environment = Environment(values=raw)
    environment.sources = {
        key: f"environment variable {variable(ENVIRONMENT_PREFIX + key.upper())}" for key in raw
    }
    for key in raw.get("options", {}):
        # Found by attack: STORAGE_OPTIONS__SYNCHRONOUS__X was reported as STORAGE_OPTIONS,
        # a variable not set: a deeper name is a part of the option too.
        prefix = f"{ENVIRONMENT_PREFIX}OPTIONS__{key.upper()}"
        setting = sorted(
            name
            for upper, name in as_set.items()
            if upper == prefix or upper.startswith(prefix + "__")
        )
        nested = ", ".join(setting) or options
        environment.sources[f"options.{key}"] = f"environment variable {nested}"
    for name in names:
        if os.environ[name] == "":
            key = name[len(ENVIRONMENT_PREFIX) :].lower().replace("options__", "options.", 1)
            environment.cleared.add(key)
            environment.sources[key] = f"empty environment variable {name}"
    return environment


def _userinfo_span(template: str) -> tuple[int, int] | None:
    """Where a URL template's user info lies: from `://` to its last literal `@`."""
    head, separator, _ = template.partition("://")
    if not separator or not SCHEME.fullmatch(head):
        return None
    start = len(head) + len(separator)
    references = [match.span() for match in _VARIABLE.finditer(template)]
    ats = [
        index
        for index in range(start, len(template))
        if template[index] == "@" and not any(a <= index < b for a, b in references)
    ]
    return (start, ats[-1]) if ats else None


def expand(value: Any, where: str, *, url: bool = False) -> Any:
    """Expands ${VAR} and ${VAR:-default} in every string of a file's values.

    With `url` (the values are database URLs), a reference inside a URL's user info
    (`scheme://${USER}:${PASSWORD}@host`) is inserted percent-encoded: the variable
    holds the user name or password as it is, `@`, `/`, `?`, `#` and `%` included.
    """
    if isinstance(value, dict):
        return {key: expand(item, f"{where}.{key}", url=url) for key, item in value.items()}
    if isinstance(value, list):
        return [expand(item, f"{where}[{i}]", url=url) for i, item in enumerate(value)]
    if not isinstance(value, str):
        return value
    span = _userinfo_span(value) if url else None

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$${":
            return "${"
        found = _resolve(match, where)
        if span is not None and span[0] <= match.start() and match.end() <= span[1]:
            return quote(found, safe="")
        return found

    return _VARIABLE.sub(substitute, value)


def _resolve(match: re.Match[str], where: str) -> str:
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


# Values a config file may expand to, aliases counted each time they are used.
MAX_CONFIG_VALUES = 100_000


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (found by attack:
    the last one silently won; TOML and the JSON import files refuse it too), and a
    document whose aliases expand it past MAX_CONFIG_VALUES values (found by attack: a
    few lines of nested aliases, `read_replicas: *a8`, stood for 10^9 values, which
    validation walked until killed)."""

    def compose_document(self) -> yaml.Node | None:
        document: yaml.Node | None = super().compose_document()
        if document is not None and _expanded_size(document, {}) > MAX_CONFIG_VALUES:
            raise yaml.composer.ComposerError(
                None,
                None,
                f"its aliases expand it past {MAX_CONFIG_VALUES:,} values",
                document.start_mark,
            )
        return document

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *base`: its keys may be given again, on purpose
            key = self.construct_object(key_node, deep=deep)
            try:
                repeated = key in seen
            except TypeError:
                continue  # unhashable: the base class refuses it
            if repeated:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} is given twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def _expanded_size(node: yaml.Node, sizes: dict[int, int]) -> int:
    """How many values `node` stands for, each alias's counted where it is used (the
    size of a node reached again is remembered, not walked again)."""
    known = sizes.get(id(node))
    if known is not None:
        return known
    size = 1
    if isinstance(node, yaml.SequenceNode):
        size += sum(_expanded_size(item, sizes) for item in node.value)
    elif isinstance(node, yaml.MappingNode):
        size += sum(_expanded_size(k, sizes) + _expanded_size(v, sizes) for k, v in node.value)
    sizes[id(node)] = size
    return size


# A config file is a few lines; the bound keeps a wrong path from reading for good.
MAX_CONFIG_BYTES = 1024 * 1024


def _config_text(path: Path) -> str:
    """The file's text, if it is a regular file of at most MAX_CONFIG_BYTES.

    Found by attack: a config path that was /dev/zero (through a symlink) was read until
    the kernel killed the process at 23 GB, and a FIFO waited for a writer for good.

    Raises:
        ConfigError: for anything but a regular file, or one too large.
        OSError, UnicodeDecodeError: as reading it raises them.
    """
    # Without blocking: opening a FIFO to read waits for a writer.
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            raise ConfigError(f"config file {path}: not a regular file")
        os.set_blocking(descriptor, True)
        handle = os.fdopen(descriptor, "rb")
    except BaseException:
        os.close(descriptor)
        raise
    with handle:
        data = handle.read(MAX_CONFIG_BYTES + 1)
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {path}: larger than {MAX_CONFIG_BYTES} bytes")
    return data.decode("utf-8")


def read_file(path: Path, known: Iterable[str]) -> dict[str, Any]:
    """The file's `storage` section as written: `expand_file_values` expands its ${VAR}s
    (only those of the settings used, so an unset variable elsewhere is no error).

    Raises:
        ConfigError: naming the file and the problem.
    """
    suffix = path.suffix.lower()
    if suffix not in (".yaml", ".yml", ".toml"):
        raise ConfigError(f"config file {path}: unknown type (use .yaml, .yml or .toml)")
    try:
        text = _config_text(path)
    except FileNotFoundError:
        raise ConfigError(f"config file {path}: not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError(f"config file {path}: cannot be read ({reason})") from None
    try:
        document = (
            tomllib.loads(text) if suffix == ".toml" else yaml.load(text, _UniqueKeyLoader)  # noqa: S506  # a SafeLoader
        )
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
    return dict(section)


def expand_file_values(values: dict[str, Any], path: Path) -> dict[str, Any]:
    """Expands the ${VAR}s of a file's settings (see `expand`).

    Raises:
        ConfigError: for an unset variable without a default, naming it and the setting.
    """
    where = f"config file {path}: storage"
    return {
        key: expand(value, f"{where}.{key}", url=key in URL_SETTINGS)
        for key, value in values.items()
    }


def config_file_path(path: str | Path | None = None) -> Path | None:
    """The config file load_config reads: `path`, else $PERSISTENCE_CONFIG, else one
    of ./persistence.yaml, ./persistence.yml, ./persistence.toml if present."""
    if path is not None:
        return _not_a_url(path, "--config")
    named = os.environ.get(CONFIG_FILE_VARIABLE)
    if named:
        return _not_a_url(named, f"${CONFIG_FILE_VARIABLE}")
    found = [Path(candidate) for candidate in DISCOVERED_FILES if Path(candidate).is_file()]
    if len(found) > 1:
        # Found by attack: the first silently won over the other.
        raise ConfigError(
            f"config files {' and '.join(map(str, found))} are both here: keep one, or name"
            f" the one to read with --config or ${CONFIG_FILE_VARIABLE}"
        )
    return found[0] if found else None


def _not_a_url(path: str | Path, given: str) -> Path:
    """`path`, refused if it is a URL (persistence.urls.url_given_as_path).

    Raises:
        ConfigError: naming the scheme only.
    """
    url = url_given_as_path(path)
    if url is not None:
        raise ConfigError(
            f"{given} names a config file, and this is {url}; give a store's URL with --url"
            " or STORAGE_* variables"
        )
    return Path(path)
