"""persistence: chat sessions, ordered messages and file records behind one async API."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from persistence.errors import (
    ConfigError,
    InvalidDataError,
    MigrationError,
    PersistenceError,
    SchemaVersionError,
    SessionConflictError,
    SessionDeletedError,
    StorageConnectionError,
)
from persistence.manager import SessionManager
from persistence.models import ChatMessage, ChatSession, UploadedFileRecord
from persistence.sql.backend import PostgreSQLSessionStorage, SQLiteSessionStorage
from persistence.storage import SessionStorage, StorageCounts, UnitOfWork
from persistence.transfer import (
    backup_storage,
    export_to_json,
    import_from_json,
    migrate_storage,
    restore_backup,
    verify_migration,
)

if TYPE_CHECKING:
    from persistence.mongo.backend import MongoDBSessionStorage

logging.getLogger(__name__).addHandler(logging.NullHandler())


def __getattr__(name: str) -> Any:
    # MongoDB's drivers are the optional `mongodb` extra: import them on first use only.
    if name == "MongoDBSessionStorage":
        try:
            from persistence.mongo.backend import MongoDBSessionStorage
        except ImportError as exc:
            if (exc.name or "").startswith("persistence"):
                raise
            raise ConfigError(
                f"MongoDBSessionStorage needs beanie and pymongo ({exc.name or 'a module'}"
                " is missing): pip install 'persistence[mongodb]'"
            ) from None
        return MongoDBSessionStorage
    raise AttributeError(f"module 'persistence' has no attribute {name!r}")


__all__ = [
    "ChatMessage",
    "ChatSession",
    "ConfigError",
    "InvalidDataError",
    "MigrationError",
    "MongoDBSessionStorage",
    "PersistenceError",
    "PostgreSQLSessionStorage",
    "SQLiteSessionStorage",
    "SchemaVersionError",
    "SessionConflictError",
    "SessionDeletedError",
    "SessionManager",
    "SessionStorage",
    "StorageConnectionError",
    "StorageCounts",
    "UnitOfWork",
    "UploadedFileRecord",
    "backup_storage",
    "export_to_json",
    "import_from_json",
    "migrate_storage",
    "restore_backup",
    "verify_migration",
]
