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


class SessionConflictError(PersistenceError):
    """Another writer changed what this save changes, since this holder last loaded or saved.

    Nothing of the save was written and the object is as it was: load the session
    again and reapply the change. `conflicts` names each field, metadata key or
    message both writers changed.
    """

    def __init__(self, session_id: str, conflicts: list[str]) -> None:
        self.session_id = session_id
        self.conflicts = conflicts
        super().__init__(
            f"session {session_id!r}: changed by another writer since this object was"
            f" loaded or saved: {', '.join(conflicts)}; nothing was written (load it again"
            " and reapply the change)"
        )


class SessionDeletedError(PersistenceError):
    """The session this object was loaded or saved from has been deleted since.

    Nothing was written: a deleted session is never brought back by a stale copy.
    """

    def __init__(self, session_id: str) -> None:
        self.session_id = session_id
        super().__init__(
            f"session {session_id!r} was deleted after this object loaded or saved it;"
            " nothing was written (start a new session to keep talking)"
        )
