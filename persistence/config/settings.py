"""StorageConfig: which store to use, and how; config_from_url for one URL.

`load_config` (loading.py) gathers the values from the environment and a file.
A connection string's password never appears in a repr, a log line or an error, and
a user name or password that is not percent-encoded is refused (persistence.urls).
"""

from __future__ import annotations

import logging
import os
import re
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    TypeAdapter,
    ValidationError,
    model_validator,
)

from persistence.arguments import unnamable
from persistence.clock import MAX_EXPIRY_HOURS
from persistence.config.masking import (
    mask_secrets,
    mask_url,
    port_problem,
    postgresql_url_problem,
    userinfo_problem,
)
from persistence.errors import ConfigError
from persistence.urls import split_url, url_given_as_path

logger = logging.getLogger(__name__)

Backend = Literal["sqlite", "postgresql", "mongodb"]
DEFAULT_DATABASE_PATH = Path("gemini_sessions.db")
DEFAULT_MIN_POOL_SIZE = 5
DEFAULT_MAX_POOL_SIZE = 20
SCHEMES: dict[str, tuple[str, ...]] = {
    "sqlite": ("sqlite", "sqlite+aiosqlite"),
    "postgresql": ("postgresql", "postgresql+asyncpg", "postgres"),
    "mongodb": ("mongodb", "mongodb+srv"),
}
# Where each setting came from, for error messages; set by load_config.
_SOURCES: ContextVar[dict[str, str] | None] = ContextVar("_SOURCES", default=None)


def scheme_of(url: str) -> str | None:
    head, separator, _ = url.partition("://")
    return head.lower() if separator and re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*", head) else None


class _SettingError(ValueError):
    """A refused value, with the name of the setting it belongs to."""

    def __init__(self, setting: str, problem: str) -> None:
        super().__init__(problem)
        self.setting = setting
        self.problem = problem


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# How the pool size fields read a value.
_POOL_SIZE = TypeAdapter(int)

# The longest timeout the engines take: a C int of milliseconds (about 24.8 days).
# Found by attack: statement_timeout=1e300 passed here and failed only at the connection,
# with a server error quoting a 300-digit number.
LONGEST_TIMEOUT = 2_147_483.0


class SQLiteOptions(_Options):
    synchronous: Literal["FULL", "NORMAL", "EXTRA"] = "FULL"
    cache_size: int | None = None
    busy_timeout: float = Field(30.0, gt=0, le=LONGEST_TIMEOUT, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _upper(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("synchronous"), str):
            return {**data, "synchronous": data["synchronous"].upper()}
        return data


class PostgreSQLOptions(_Options):
    statement_timeout: float | None = Field(None, gt=0, le=LONGEST_TIMEOUT, allow_inf_nan=False)
    command_timeout: float | None = Field(None, gt=0, allow_inf_nan=False)
    connect_timeout: float = Field(10.0, gt=0, allow_inf_nan=False)
    pool_timeout: float = Field(30.0, gt=0, allow_inf_nan=False)
    max_replica_lag: float = Field(10.0, gt=0, allow_inf_nan=False)
    replica_timeout: float = Field(1.0, gt=0, allow_inf_nan=False)
    replica_retry_interval: float = Field(5.0, gt=0, allow_inf_nan=False)


class MongoDBOptions(_Options):
    database_name: str = Field("gemini_mcp", min_length=1)
    read_preference: (
        Literal["primary", "primaryPreferred", "secondary", "secondaryPreferred", "nearest"] | None
    ) = None


OPTION_MODELS: dict[str, type[_Options]] = {
    "sqlite": SQLiteOptions,
    "postgresql": PostgreSQLOptions,
    "mongodb": MongoDBOptions,
}


def _check_options(backend: str, options: dict[str, Any]) -> dict[str, Any]:
    model = OPTION_MODELS[backend]
    known = ", ".join(model.model_fields)
    for key in options:
        if key not in model.model_fields:
            raise _SettingError(
                f"options.{key}", f"unknown option for backend {backend} (known: {known})"
            )
    try:
        checked = model(**options)
    except ValidationError as exc:
        error = exc.errors()[0]
        name = ".".join(str(part) for part in error["loc"])
        value = error["input"]
        shown = repr(_shown(value)) if isinstance(value, str) else repr(value)
        raise _SettingError(f"options.{name}", f"{error['msg']}, got {shown}") from None
    return checked.model_dump(include=set(options))


class StorageConfig(BaseModel):
    """Which store to use and how to tune it.

    Takes exactly what it is given; `load_config()` adds the environment and a file.
    For SQLite, a `sqlite:///path` connection string sets `database_path`. For the
    other backends the backend may be left out: the connection string's scheme names it.

    Raises:
        ConfigError: naming the setting, for any value that cannot be used.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    backend: Backend = "sqlite"
    database_path: Path = DEFAULT_DATABASE_PATH
    connection_string: SecretStr | None = None
    read_replicas: tuple[SecretStr, ...] = ()
    min_pool_size: int = Field(DEFAULT_MIN_POOL_SIZE, ge=0)
    max_pool_size: int = Field(DEFAULT_MAX_POOL_SIZE, ge=1)
    auto_save: bool = True
    expiry_hours: float = Field(72, gt=0, le=MAX_EXPIRY_HOURS, allow_inf_nan=False)
    options: dict[str, Any] = Field(default_factory=dict)

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            # `from None`: pydantic's error repeats the raw input, password included.
            raise ConfigError(_describe(exc)) from None

    @model_validator(mode="before")
    @classmethod
    def _one_pool_bound(cls, data: Any) -> Any:
        """With one pool bound given, the other's default follows it where they conflict."""
        if not isinstance(data, dict) or ("min_pool_size" in data) == ("max_pool_size" in data):
            return data
        given = "min_pool_size" if "min_pool_size" in data else "max_pool_size"
        try:
            # As the field reads it (found by attack: int("3.0") failed here, so
            # STORAGE_MAX_POOL_SIZE=3.0 kept the default minimum 5 and was refused).
            size = _POOL_SIZE.validate_python(data[given])
        except ValidationError:
            return data  # the field's own check names the problem
        if given == "max_pool_size" and 1 <= size < DEFAULT_MIN_POOL_SIZE:
            return {**data, "min_pool_size": size}
        if given == "min_pool_size" and size > DEFAULT_MAX_POOL_SIZE:
            return {**data, "max_pool_size": size}
        return data

    @model_validator(mode="before")
    @classmethod
    def _infer_backend(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("read_replicas"), str):
            # STORAGE_READ_REPLICAS: URLs separated by commas.
            data = {**data, "read_replicas": split_urls(data["read_replicas"])}
        if not isinstance(data, dict) or data.get("backend") is not None:
            return data
        url = data.get("connection_string")
        if isinstance(url, SecretStr):
            url = url.get_secret_value()
        scheme = scheme_of(url) if isinstance(url, str) else None
        for backend, schemes in SCHEMES.items():
            if scheme in schemes:
                return {**data, "backend": backend}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> StorageConfig:
        url = self.connection_string.get_secret_value() if self.connection_string else None
        if url is not None:
            scheme = scheme_of(url)
            if scheme is None:
                raise _SettingError(
                    "connection_string", "not a URL (expected scheme://...; see the README)"
                )
            if scheme not in SCHEMES[self.backend]:
                allowed = ", ".join(f"{s}://" for s in SCHEMES[self.backend])
                raise _SettingError(
                    "connection_string",
                    f"scheme {scheme}:// does not fit backend {self.backend} (use {allowed})",
                )
            if self.backend == "sqlite":
                self._check_one_sqlite_file(_sqlite_path(url))
                object.__setattr__(self, "database_path", _sqlite_path(url))
            elif (problem := _url_problem(self.backend, url)) is not None:
                raise _SettingError("connection_string", problem)
        elif self.backend != "sqlite":
            raise _SettingError("connection_string", f"required for backend {self.backend}")
        self._check_read_replicas()
        if str(self.database_path) in ("", ":memory:"):
            raise _SettingError("database_path", "must name a file")
        if (url := url_given_as_path(self.database_path)) is not None:
            # Found by attack: STORAGE_DATABASE_PATH=postgresql://app:secret@db/app made a
            # SQLite store under ./postgresql:/app:secret@db/, and printed the password.
            raise _SettingError(
                "database_path",
                f"{url} is not a file path; give a URL as connection_string",
            )
        if (problem := unnamable(str(self.database_path))) is not None:
            raise _SettingError("database_path", problem)
        object.__setattr__(self, "database_path", _home_expanded(self.database_path))
        if self.min_pool_size > self.max_pool_size:
            raise _SettingError(
                "min_pool_size",
                f"{self.min_pool_size} is greater than max_pool_size {self.max_pool_size}",
            )
        object.__setattr__(self, "options", _check_options(self.backend, self.options))
        return self

    def _check_one_sqlite_file(self, url_path: Path) -> None:
        """Refuses a database_path given beside a SQLite URL that names another file.

        load_config drops the file's one where the environment gives the other, so both
        here come from one place: neither may silently win.
        """
        if "database_path" not in self.model_fields_set:
            return
        given = self.database_path
        if os.path.abspath(_home_expanded(given)) == os.path.abspath(_home_expanded(url_path)):
            return
        source = (_SOURCES.get() or {}).get("database_path")
        where = f" (from {source})" if source else ""
        raise _SettingError(
            "connection_string",
            f"names the SQLite file {url_path}, but database_path{where} names {given}:"
            " give one of them",
        )

    def _check_read_replicas(self) -> None:
        if not self.read_replicas:
            return
        if self.backend != "postgresql":
            logger.warning(
                "storage setting read_replicas ignored: backend %s has no read replicas"
                " (MongoDB reads from secondaries with options.read_preference)",
                self.backend,
            )
            object.__setattr__(self, "read_replicas", ())
            return
        for index, url in enumerate(self.read_replicas, start=1):
            scheme = scheme_of(url.get_secret_value())
            if scheme not in SCHEMES["postgresql"]:
                got = f"scheme {scheme}://" if scheme else "not a URL"
                raise _SettingError(
                    "read_replicas",
                    f"item {index}: {got} is not PostgreSQL"
                    " (use postgresql://, postgres:// or postgresql+asyncpg://)",
                )
            if (problem := _url_problem("postgresql", url.get_secret_value())) is not None:
                raise _SettingError("read_replicas", f"item {index}: {problem}")

    def __repr_args__(self) -> Any:
        for name, value in super().__repr_args__():
            if name == "connection_string" and value is not None:
                yield name, mask_url(value.get_secret_value())
            elif name == "read_replicas":
                yield name, tuple(mask_url(url.get_secret_value()) for url in value)
            else:
                yield name, value

    @property
    def display_url(self) -> str:
        """The store's URL with the password masked, for messages and logs."""
        if self.backend == "sqlite":
            return f"sqlite:///{self.database_path}"
        assert self.connection_string is not None
        return mask_url(self.connection_string.get_secret_value())

    def typed_options(self) -> Any:
        """The options as the backend's options model, defaults filled in."""
        return OPTION_MODELS[self.backend](**self.options)


def split_urls(value: str) -> tuple[str, ...]:
    """The URLs of a comma-separated list (STORAGE_READ_REPLICAS).

    A URL ends only at a comma that the next `scheme://` (or the end) follows, so a
    comma inside one (a raw `,` in a password, libpq's `host1:5432,host2:5432`) does
    not cut it.
    """
    urls = (url.strip() for url in _NEXT_URL.split(value))
    return tuple(url for url in urls if url)


# Commas (and spaces) before `scheme://` or the end: where a URL of a list ends.
_NEXT_URL = re.compile(r",[\s,]*(?=[A-Za-z][A-Za-z0-9+.-]*://|$)")


def _url_problem(backend: str, url: str) -> str | None:
    """Why the PostgreSQL or MongoDB URL `url` cannot be used, or None (never repeats
    the password, nor what may be one: see `_hidden_port_problem`)."""
    problem = userinfo_problem(url) or _hidden_port_problem(url) or port_problem(url)
    if problem is None and backend == "postgresql":
        problem = postgresql_url_problem(url)
    return problem


def _hidden_port_problem(url: str) -> str | None:
    """A problem with the first port of a URL without `@`, told without the port.

    There, `scheme://user:password` (its `@host` left out, or cut off at a raw comma)
    reads as host and port: the "port" may be a password.
    """
    parts = split_url(url)
    if parts is None or parts.userinfo is not None:
        return None
    first_host = re.split(r"[/?#,]", parts.rest, maxsplit=1)[0]
    if port_problem(f"{parts.scheme}://{first_host}") is None:
        return None
    return (
        "the port is not a number from 1 to 65535 (not repeated: in a URL without"
        " `user:password@`, a password would read as a port)"
    )


def _sqlite_path(url: str) -> Path:
    rest = url.partition("://")[2]
    if not rest.startswith("/"):
        raise _SettingError("connection_string", "a SQLite URL is sqlite:///path")
    path, question, query = rest[1:].partition("?")
    if question:
        # Found by attack: the query was dropped without a word (`?mode=ro` did not
        # stop a write; `reports?2024.db` named the file `reports`).
        raise _SettingError(
            "connection_string",
            f"a SQLite URL takes no query string, got {_shown('?' + query)!r} (SQLite is"
            " tuned with the storage options synchronous, cache_size and busy_timeout);"
            " a sqlite:/// URL's path is read as written, so a file whose name holds '?'"
            " is named with database_path (STORAGE_DATABASE_PATH, or"
            " storage.database_path in a config file)",
        )
    if not path or path == ":memory:":
        raise _SettingError("connection_string", "a SQLite URL must name a file (sqlite:///path)")
    if (problem := unnamable(path)) is not None:
        raise _SettingError("connection_string", problem)
    return Path(path)


def _home_expanded(path: Path) -> Path:
    """`path` with a leading ~ or ~user expanded, as the shell would.

    Raises:
        _SettingError: the ~ names no home directory (found by attack: `~old.db` raised
            a bare RuntimeError, naming no setting).
    """
    try:
        return path.expanduser()
    except RuntimeError:
        raise _SettingError(
            "database_path",
            f"{path} begins with ~, which names no home directory here (a file whose name"
            " begins with ~ is named by its full path)",
        ) from None


def _describe(exc: ValidationError) -> str:
    sources = _SOURCES.get() or {}
    problems = []
    for error in exc.errors():
        original = (error.get("ctx") or {}).get("error")
        if isinstance(original, _SettingError):
            setting, problem = original.setting, original.problem
        else:
            setting = ".".join(str(part) for part in error["loc"]) or "storage"
            problem = error["msg"]
            if setting.split(".")[0] not in ("connection_string", "read_replicas", "storage"):
                value = error.get("input")
                # Masked whole before it is cut: a cut URL may have lost its `@`.
                problem += f", got {_shown(value)!r}" if isinstance(value, str) else ""
        source = sources.get(setting) or sources.get(setting.split(".")[0])
        where = f" (from {source})" if source else ""
        problems.append(mask_secrets(f"storage setting {setting}{where}: {problem}"))
    return "; ".join(problems)


def _shown(value: str, limit: int = 80) -> str:
    """A setting's value for an error message: passwords masked, then cut to `limit`."""
    masked = mask_secrets(value)
    return masked if len(masked) <= limit else masked[: limit - 3] + "..."


def backend_of(url: str) -> str | None:
    """The backend a URL's scheme names, or None."""
    scheme = scheme_of(url)
    return next((name for name, schemes in SCHEMES.items() if scheme in schemes), None)


def url_settings(url: str) -> dict[str, Any]:
    """The settings that say where the store at `url` is: backend and URL or path.

    Raises:
        ConfigError: for a scheme this library does not know (the password is never
            repeated).
    """
    backend = backend_of(url)
    if backend is None:
        scheme = scheme_of(url)
        known = ", ".join(f"{s}://" for schemes in SCHEMES.values() for s in schemes)
        got = f"scheme {scheme}://" if scheme else "no scheme"
        raise ConfigError(f"URL: {got} is not a database URL this library knows ({known})")
    if backend != "sqlite":
        return {"backend": backend, "connection_string": url}
    try:
        return {"backend": backend, "database_path": _sqlite_path(url)}
    except _SettingError as exc:
        raise ConfigError(f"URL: {exc.problem}") from None


def build_config(values: dict[str, Any], sources: dict[str, str]) -> StorageConfig:
    """StorageConfig(**values), its errors naming where each setting came from."""
    token = _SOURCES.set(sources)
    try:
        return StorageConfig(**values)
    finally:
        _SOURCES.reset(token)


def config_from_url(url: str, *, base: StorageConfig | None = None) -> StorageConfig:
    """Returns the configuration of the store at `url`.

    Accepts sqlite:///path, sqlite+aiosqlite:///path, postgresql://, postgres://,
    postgresql+asyncpg://, mongodb:// and mongodb+srv://. Pool sizes, auto-save and
    expiry come from `base` (and its options when the backend is the same).

    Raises:
        ConfigError: for any other scheme (the URL's password is never repeated).
    """
    fields = url_settings(url)
    sources = {key: "the URL" for key in fields}
    if base is not None:
        fields |= base.model_dump(include={"min_pool_size", "max_pool_size"})
        fields |= base.model_dump(include={"auto_save", "expiry_hours"})
        if base.backend == fields["backend"]:
            fields["options"] = base.options
    return build_config(fields, sources)
