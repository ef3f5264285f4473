"""PyMongo and BSON errors become the library's, by class, with the driver's error chained."""

from __future__ import annotations

import pytest
from bson.errors import InvalidBSON, InvalidDocument
from pymongo.errors import (
    AutoReconnect,
    ConfigurationError,
    DocumentTooLarge,
    DuplicateKeyError,
    ExecutionTimeout,
    NetworkTimeout,
    NotPrimaryError,
    OperationFailure,
    ServerSelectionTimeoutError,
    WaitQueueTimeoutError,
    WriteError,
)

from persistence.errors import InvalidDataError, PersistenceError, StorageConnectionError
from persistence.mongo.errors import mongo_errors, redact, translate

SECRET = "pa55-w0rd"


def _raised(exc: BaseException) -> PersistenceError:
    with pytest.raises(PersistenceError) as caught, mongo_errors("save session"):
        raise exc
    assert caught.value.__cause__ is exc
    return caught.value


@pytest.mark.parametrize(
    "exc",
    [
        ServerSelectionTimeoutError("127.0.0.1:1: [Errno 111] refused, Timeout: 5.0s, Topology…"),
        AutoReconnect("connection closed"),
        NetworkTimeout("timed out"),
        NotPrimaryError("not primary"),
        WaitQueueTimeoutError("pool exhausted"),
        ConnectionRefusedError(111, "refused"),
        TimeoutError("timed out"),
        OperationFailure("Authentication failed.", code=18),
    ],
    ids=lambda exc: type(exc).__name__,
)
def test_unreachable_or_refused_server_is_a_connection_error(exc: BaseException) -> None:
    error = _raised(exc)
    assert type(error) is StorageConnectionError
    assert str(error).startswith("save session:")


@pytest.mark.parametrize(
    "exc",
    [
        DocumentTooLarge("BSON document too large (16777300 bytes)"),
        OperationFailure("Resulting document after update is larger than 16777216", code=17419),
        WriteError("BSONObj size: 16777300 is invalid", code=10334),
    ],
    ids=lambda exc: type(exc).__name__,
)
def test_crossing_the_document_limit_is_invalid_data_naming_16_mib(exc: BaseException) -> None:
    error = _raised(exc)
    assert type(error) is InvalidDataError
    assert "16 MiB" in str(error)
    assert isinstance(error, ValueError)


def test_a_value_bson_cannot_encode_is_invalid_data() -> None:
    error = _raised(InvalidDocument("cannot encode object: <object>"))
    assert type(error) is InvalidDataError


def test_nesting_the_server_refuses_is_invalid_data() -> None:
    error = _raised(OperationFailure("Document exceeds maximum nesting depth", code=15))
    assert type(error) is InvalidDataError


@pytest.mark.parametrize(
    "exc",
    [
        DuplicateKeyError("E11000 duplicate key error", code=11000),
        ExecutionTimeout("operation exceeded time limit", code=50),
        OperationFailure("some failure", code=2),
        InvalidBSON("bad bytes"),
    ],
    ids=lambda exc: type(exc).__name__,
)
def test_other_driver_failures_are_persistence_errors(exc: BaseException) -> None:
    error = _raised(exc)
    assert type(error) is PersistenceError


def test_transient_transaction_errors_say_to_retry() -> None:
    exc = OperationFailure(
        "WriteConflict", code=112, details={"errorLabels": ["TransientTransactionError"]}
    )
    error = _raised(exc)
    assert type(error) is PersistenceError
    assert "retry" in str(error)


def test_configuration_errors_at_use_are_connection_errors() -> None:
    assert type(_raised(ConfigurationError("no DNS"))) is StorageConnectionError


@pytest.mark.parametrize("exc", [TypeError("bug"), AttributeError("bug"), KeyError("bug")])
def test_programming_errors_pass_through_unchanged(exc: BaseException) -> None:
    with pytest.raises(type(exc)) as caught, mongo_errors("save session"):
        raise exc
    assert caught.value is exc


def test_library_errors_pass_through_unchanged() -> None:
    original = InvalidDataError("already ours")
    with pytest.raises(InvalidDataError) as caught, mongo_errors("save session"):
        raise original
    assert caught.value is original


def test_no_password_reaches_a_translated_message() -> None:
    url = f"mongodb://admin:{SECRET}@db.example.invalid:27017/app"
    for exc in (
        ServerSelectionTimeoutError(f"{url}: refused"),
        OperationFailure(f"failed for {url}", code=2),
        ConfigurationError(f"bad option in mongodb+srv://u:{SECRET}@cluster.invalid/"),
    ):
        message = str(translate(exc, "initialize"))
        assert SECRET not in message
        assert "***@" in message


def test_redact_hides_user_info_of_every_mongodb_url() -> None:
    text = f"a mongodb://u:{SECRET}@h/ and MONGODB+SRV://{SECRET}@c.example/ end"
    assert redact(text) == "a mongodb://***@h/ and MONGODB+SRV://***@c.example/ end"


def test_an_int_beyond_64_bits_and_an_unreadable_stored_document_are_invalid_data() -> None:
    """Found by review: BSON's OverflowError and the ValidationError Beanie raises for a
    stored document the model cannot read reached the caller raw."""
    from bson import encode
    from pydantic import BaseModel, ValidationError

    class Stored(BaseModel):
        status: int

    with pytest.raises(OverflowError) as overflow:
        encode({"n": 2**64})
    assert type(_raised(overflow.value)) is InvalidDataError
    with pytest.raises(ValidationError) as invalid:  # as Beanie raises it
        Stored.model_validate({"status": "bogus"})
    error = _raised(invalid.value)
    assert type(error) is InvalidDataError
    assert "status" in str(error) and "stored document" in str(error)
