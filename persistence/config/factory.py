"""create_storage: the configured backend, imported only when it is the one asked for."""

from __future__ import annotations

import importlib

from persistence.config.settings import (
    MongoDBOptions,
    PostgreSQLOptions,
    SQLiteOptions,
    StorageConfig,
    scheme_of,
)
from persistence.errors import ConfigError
from persistence.storage import SessionStorage

_URL_ESCAPES = str.maketrans({"%": "%25", "?": "%3F", "#": "%23"})


def sql_url(config: StorageConfig) -> str:
    """The SQLAlchemy URL of a SQLite or PostgreSQL configuration, password included.

    Raises:
        ConfigError: for a MongoDB configuration.
    """
    if config.backend == "sqlite":
        # SQLAlchemy cuts a `sqlite:///` URL at `?` and percent-decodes it (found by
        # attack: the file `reports?2024.db` was given as a URL of the file `reports`).
        # Only what it would misread is escaped: `--url` and STORAGE_CONNECTION_STRING
        # read the path as written, and read back any other name as SQLAlchemy does.
        return "sqlite:///" + str(config.database_path).translate(_URL_ESCAPES)
    if config.backend == "postgresql":
        assert config.connection_string is not None
        url = config.connection_string.get_secret_value()
        if scheme_of(url) == "postgres":
            url = "postgresql" + url[len("postgres") :]
        return url
    raise ConfigError("backend mongodb has no SQL schema: alembic manages SQLite and PostgreSQL")


def _mongodb_url(url: str, config: StorageConfig) -> str:
    extra = {"minPoolSize": str(config.min_pool_size), "maxPoolSize": str(config.max_pool_size)}
    base, _, query = url.partition("?")
    if "/" not in base.partition("://")[2]:
        base += "/"
    present = {pair.partition("=")[0].lower() for pair in query.split("&") if pair}
    added = [f"{key}={value}" for key, value in extra.items() if key.lower() not in present]
    return base + "?" + "&".join(part for part in [query, *added] if part)


def create_storage(config: StorageConfig, *, must_exist: bool = False) -> SessionStorage:
    """Builds the configured backend (not yet initialized).

    With `must_exist`, a SQLite store's initialize() opens its file only if it is there,
    never creating one, as open_for_reading() does (the command line's writing commands
    on a store that must exist).

    Raises:
        ConfigError: if the backend's driver is not installed (names the extra).
    """
    if config.backend == "sqlite":
        sqlite = SQLiteOptions(**config.options)
        from persistence.sql.backend import SQLiteSessionStorage

        return SQLiteSessionStorage(
            config.database_path,
            synchronous=sqlite.synchronous,
            cache_size=sqlite.cache_size,
            busy_timeout=sqlite.busy_timeout,
            must_exist=must_exist,
        )
    assert config.connection_string is not None
    url = config.connection_string.get_secret_value()
    if config.backend == "postgresql":
        pg = PostgreSQLOptions(**config.options)
        try:
            importlib.import_module("asyncpg")
        except ImportError:
            raise ConfigError(
                "backend postgresql needs the asyncpg driver: install persistence[postgresql]"
            ) from None
        from persistence.sql.backend import PostgreSQLSessionStorage

        return PostgreSQLSessionStorage(
            url,
            config.min_pool_size,
            config.max_pool_size,
            read_replicas=[replica.get_secret_value() for replica in config.read_replicas],
            statement_timeout=pg.statement_timeout,
            command_timeout=pg.command_timeout,
            connect_timeout=pg.connect_timeout,
            pool_timeout=pg.pool_timeout,
            max_replica_lag=pg.max_replica_lag,
            replica_timeout=pg.replica_timeout,
            replica_retry_interval=pg.replica_retry_interval,
        )
    mongo = MongoDBOptions(**config.options)
    try:
        module = importlib.import_module("persistence.mongo.backend")
    except ImportError as exc:
        if (exc.name or "").startswith("persistence"):
            raise ConfigError(
                "backend mongodb: this installation of persistence has no MongoDB backend"
            ) from None
        raise ConfigError(
            f"backend mongodb needs beanie and pymongo ({exc.name or 'a module'} is missing):"
            " install persistence[mongodb]"
        ) from None
    # The read preference routes only the reads that may be stale (not the whole client).
    storage: SessionStorage = module.MongoDBSessionStorage(
        _mongodb_url(url, config),
        database_name=mongo.database_name,
        read_preference=mongo.read_preference,
    )
    return storage
