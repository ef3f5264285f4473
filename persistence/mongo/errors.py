"""PyMongo and BSON errors -> PersistenceError, at the MongoDB backend boundary."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from bson.errors import BSONError, InvalidDocument
from pydantic import ValidationError
from pymongo.errors import (
    ConfigurationError,
    ConnectionFailure,
    DocumentTooLarge,
    DuplicateKeyError,
    OperationFailure,
    PyMongoError,
)

from persistence.errors import InvalidDataError, PersistenceError, StorageConnectionError
from persistence.urls import mask_secrets

MAX_DOCUMENT_BYTES = 16 * 1024 * 1024
# Server error codes (src/mongo/base/error_codes.yml and uassert locations).
_AUTHENTICATION_FAILED = 18
_OVERFLOW = 15  # nesting deeper than the server keeps
_TOO_LARGE = {
    10334,  # BSONObjectTooLarge: an inserted or upserted document
    17419,  # "Resulting document after update is larger than 16777216"
}


def redact(text: str) -> str:
    """Replaces the user info of every URL in `text` (never a password out), up to the
    last `@` of each URL: a password typed with a raw `@` is hidden whole."""
    return mask_secrets(text, hide_user=True)


def _detail(exc: BaseException) -> str:
    """Names the driver's error in one short line, without user info."""
    text = str(exc).strip()
    # A server selection message goes on with the whole topology description.
    text = text.split(", Timeout:", 1)[0].split("\n", 1)[0][:200]
    name = type(exc).__name__
    code = getattr(exc, "code", None)
    if code is not None:
        name = f"{name} {code}"
    return f"{name}: {redact(text)}" if text else name


def too_large(action: str) -> InvalidDataError:
    return InvalidDataError(
        f"{action}: the session document would exceed MongoDB's 16 MiB document limit;"
        " nothing was written (start a new session, or store large content elsewhere)"
    )


def translate(exc: BaseException, action: str) -> PersistenceError:
    """Returns the library error for a PyMongo or BSON error (chain it with `from`)."""
    if isinstance(exc, DocumentTooLarge):
        return too_large(action)
    if isinstance(exc, InvalidDocument | OverflowError):
        # OverflowError: BSON's encoder, for an int beyond 64 bits.
        return InvalidDataError(f"{action}: MongoDB cannot store the value ({_detail(exc)})")
    if isinstance(exc, ValidationError):
        # Beanie building a model from a stored document (another version's, or edited).
        return InvalidDataError(
            f"{action}: a stored document does not read as this version's model"
            f" ({exc.error_count()} errors, first: {_first_error(exc)})"
        )
    if isinstance(exc, ConnectionFailure | OSError | TimeoutError):
        return StorageConnectionError(f"{action}: MongoDB unreachable ({_detail(exc)})")
    if isinstance(exc, ConfigurationError):
        return StorageConnectionError(f"{action}: MongoDB cannot be used ({_detail(exc)})")
    if isinstance(exc, DuplicateKeyError):
        return PersistenceError(
            f"{action} failed: a session, message or file id is already stored"
            f" ({type(exc).__name__})"
        )
    if isinstance(exc, OperationFailure):
        if exc.code == _AUTHENTICATION_FAILED:
            return StorageConnectionError(f"{action}: MongoDB authentication failed")
        if exc.code in _TOO_LARGE:
            return too_large(action)
        if exc.code == _OVERFLOW:
            return InvalidDataError(f"{action}: nested deeper than MongoDB keeps")
        if exc.has_error_label("TransientTransactionError"):
            return PersistenceError(
                f"{action} failed: transaction conflict, retry the unit of work ({_detail(exc)})"
            )
    return PersistenceError(f"{action} failed: {_detail(exc)}")


@contextmanager
def mongo_errors(action: str) -> Iterator[None]:
    """Translates what PyMongo and BSON raise inside the block.

    Raises:
        StorageConnectionError: the server cannot be reached or refused the credentials.
        InvalidDataError: a value MongoDB cannot store (too large, too deep, an int
            beyond 64 bits), or a stored document this version cannot read.
        PersistenceError: any other backend failure, with the driver's error chained.
    """
    try:
        yield
    except PersistenceError:
        raise
    except (PyMongoError, BSONError, OSError, TimeoutError, OverflowError, ValidationError) as exc:
        raise translate(exc, action) from exc


def _first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    location = ".".join(str(part) for part in error["loc"])
    return redact(f"{location}: {error['msg']}")[:200]
