"""The exceptions that `persistence` raises; no raw driver exception reaches a caller."""

from __future__ import annotations


class PersistenceError(Exception):
    """Base of every error raised by the library."""


class StorageConnectionError(PersistenceError):
    """The database server cannot be reached, or the connection was lost."""


class InvalidDataError(PersistenceError, ValueError):
    """A value was refused because no backend could store it faithfully."""


class ConfigError(PersistenceError, ValueError):
    """The configuration is malformed or names something that cannot be used."""


class MigrationError(PersistenceError):
    """Moving data or migrating a schema failed."""


class SchemaVersionError(MigrationError):
    """The database schema is at a revision this code does not know."""
