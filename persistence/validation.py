"""What every backend can store faithfully: checks of text, JSON and datetimes.

The domain models run these before any I/O (API.md, Round trips), so any store can be
migrated to any other.
"""

from __future__ import annotations

import math
import reprlib
from collections.abc import Collection
from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator

from persistence.clock import truncate_to_millisecond
from persistence.errors import InvalidDataError

MAX_ID_LENGTH = 255
# MongoDB refuses documents nested deeper than 100 levels; a message's metadata sits
# three levels down in its session document, so every backend stops well before.
MAX_METADATA_DEPTH = 64
# BSON integers are 64-bit; PostgreSQL JSONB and SQLite would keep larger ones.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# PostgreSQL JSONB prints an integral float such as 1e16 without exponent or point, so
# it would come back as an int; floats below this magnitude keep their decimal point.
_FLOAT_INTEGRAL_LIMIT = 1e16


def check_text(value: str, field: str) -> str:
    """Refuses text that some backend would alter: NUL characters and lone surrogates.

    Raises:
        InvalidDataError: naming the field.
    """
    if "\x00" in value:
        raise InvalidDataError(
            f"{field}: NUL characters cannot be stored (PostgreSQL refuses them)"
        )
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidDataError(
            f"{field}: lone surrogate characters are not valid UTF-8 and cannot be stored"
        ) from None
    return value


def lookup_id(value: str, field: str) -> bool:
    """Whether `value`, an id given to look something up, may name something stored
    (storable_text).

    Raises:
        InvalidDataError: it is not a string, naming `field` (found by attack: None or a
            number gave a bare TypeError from deep inside).
    """
    if not isinstance(value, str):
        raise InvalidDataError(f"{field}: must be a string, got {type(value).__name__}")
    return storable_text(value)


def check_instance(value: object, kind: type, field: str) -> None:
    """Refuses what is not a `kind` (API.md: bad input raises a ValueError subclass).

    Raises:
        InvalidDataError: naming `field` (found by audit: a dict given to a save raised a
            bare AttributeError).
    """
    if not isinstance(value, kind):
        raise InvalidDataError(f"{field}: expected {kind.__name__}, got {type(value).__name__}")


def check_instances(values: object, kind: type, field: str) -> None:
    """Refuses a collection of which an element is not a `kind`, or no collection.

    Raises:
        InvalidDataError: naming `field` and the first element that is not.
    """
    if isinstance(values, str | bytes | dict) or not isinstance(values, Collection):
        raise InvalidDataError(
            f"{field}: expected a list of {kind.__name__}, got {type(values).__name__}"
        )
    for index, value in enumerate(values):
        if not isinstance(value, kind):
            raise InvalidDataError(
                f"{field}[{index}]: expected {kind.__name__}, got {type(value).__name__}"
            )


def storable_text(value: str) -> bool:
    """Whether `value` passes check_text: no backend holds text that does not, so an id
    that does not names nothing stored."""
    try:
        check_text(value, "")
    except InvalidDataError:
        return False
    return True


def check_json_object(value: dict[str, Any], field: str) -> dict[str, Any]:
    """Refuses metadata that some backend could not return unchanged.

    Walks iteratively, so hostile nesting cannot exhaust the interpreter's stack.

    Raises:
        InvalidDataError: naming the field and the path of the offending value.
    """
    stack: list[tuple[Any, str, int]] = [(value, field, 1)]
    while stack:
        item, path, depth = stack.pop()
        if isinstance(item, dict):
            if depth > MAX_METADATA_DEPTH:
                raise InvalidDataError(
                    f"{path}: nested deeper than {MAX_METADATA_DEPTH} levels"
                    " (MongoDB cannot keep it)"
                )
            for key, child in item.items():
                if not isinstance(key, str):
                    raise InvalidDataError(f"{path}: key {key!r} is not a string")
                check_text(key, f"{path} key {key!r}")
                if key.startswith("$") or "." in key:
                    raise InvalidDataError(
                        f"{path}: key {key!r} starts with '$' or contains '.',"
                        " which MongoDB cannot keep"
                    )
                stack.append((child, f"{path}.{key}", depth + 1))
        elif isinstance(item, list):
            if depth > MAX_METADATA_DEPTH:
                raise InvalidDataError(f"{path}: nested deeper than {MAX_METADATA_DEPTH} levels")
            stack.extend((child, f"{path}[{i}]", depth + 1) for i, child in enumerate(item))
        elif isinstance(item, str):
            check_text(item, path)
        elif isinstance(item, bool) or item is None:
            continue
        elif isinstance(item, int):
            if not INT64_MIN <= item <= INT64_MAX:
                raise InvalidDataError(f"{path}: integer {item} does not fit in 64 bits")
        elif isinstance(item, float):
            if not math.isfinite(item):
                raise InvalidDataError(f"{path}: {item} is not a JSON number")
            if item == 0 and math.copysign(1.0, item) < 0:
                raise InvalidDataError(
                    f"{path}: -0.0 would come back from PostgreSQL as 0.0; store 0.0"
                )
            if item.is_integer() and abs(item) >= _FLOAT_INTEGRAL_LIMIT:
                raise InvalidDataError(
                    f"{path}: float {item!r} would come back from PostgreSQL as an integer;"
                    " store it as an int or a string"
                )
        else:
            raise InvalidDataError(f"{path}: {type(item).__name__} is not a JSON value")
    return value


# asyncpg, the PostgreSQL driver, sends this instant as '-infinity' (its encoder takes
# the microseconds of datetime.min for it) and reads '-infinity' back naive.
_FIRST_INSTANT = datetime(1, 1, 1, tzinfo=UTC)


def _not_a_number(value: object) -> object:
    # pydantic reads a number, or a string of one, as Unix time, guessing whether it
    # counts seconds or milliseconds; the API takes timezone-aware datetimes only.
    if isinstance(value, datetime):
        return value
    if isinstance(value, int | float | Decimal) or _numeric_text(value):
        raise ValueError(
            f"expected a timezone-aware datetime or ISO 8601 text, got the number {value!r}"
            " (Unix time is ambiguous: seconds or milliseconds)"
        )
    return value


def _numeric_text(value: object) -> bool:
    if not isinstance(value, str | bytes | bytearray):
        return False
    try:
        float(value)
    except ValueError:
        return False
    return True


def _utc_millisecond(value: datetime) -> datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError("datetime must be timezone-aware (a naive datetime is ambiguous)")
    try:
        instant = truncate_to_millisecond(value.astimezone(UTC))
    except OverflowError:
        raise ValueError(f"{value.isoformat()} is out of range once converted to UTC") from None
    if instant == _FIRST_INSTANT:
        raise ValueError(
            "0001-01-01T00:00:00Z would come back from PostgreSQL as a naive '-infinity';"
            " the earliest instant stored is 0001-01-01T00:00:00.001Z"
        )
    return plain(instant)


def plain(instant: datetime) -> datetime:
    """`instant` (in UTC) as a plain datetime: a subclass keeps its own methods
    (isoformat, ==), which the backends would call."""
    if type(instant) is datetime:
        return instant
    return datetime(*instant.timetuple()[:6], instant.microsecond, tzinfo=UTC)


def _identifier(value: str) -> str:
    if not value:
        raise ValueError("must not be empty")
    if len(value) > MAX_ID_LENGTH:
        raise ValueError(f"must be at most {MAX_ID_LENGTH} characters, got {len(value)}")
    return value


UtcDatetime = Annotated[datetime, BeforeValidator(_not_a_number), AfterValidator(_utc_millisecond)]
Identifier = Annotated[str, AfterValidator(_identifier)]


_SHOWN = reprlib.Repr()
_SHOWN.maxstring = _SHOWN.maxother = 80
_SHOWN.maxlevel = 3


def shown(value: Any) -> str:
    """A value for an error line: its repr, cut short however long or deep the value.
    Found by attack: a header value of 5 MB was quoted whole, and one nested 1,000
    levels deep raised RecursionError."""
    return _SHOWN.repr(value)
