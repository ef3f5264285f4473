"""Column types shared by SQLite and PostgreSQL; dialect differences stay here."""

from __future__ import annotations

import json
import json.scanner
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, DateTime, Dialect, Integer, TypeDecorator
from sqlalchemy.dialects import sqlite
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.types import TypeEngine

from persistence.frozen_metadata import EMPTY, FrozenDict, freeze, freeze_arrays, frozen_dict

JsonObject: Any = JSON().with_variant(JSONB(), "postgresql")

# SQLite only auto-increments a column declared exactly INTEGER PRIMARY KEY.
RowId = BigInteger().with_variant(Integer(), "sqlite")


class UtcDateTime(TypeDecorator[datetime]):
    """A timezone-aware timestamp, stored and returned in UTC."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        # SQLite drops the offset: normalise first.
        return None if value is None else value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        # SQLite returns naive values, written as UTC.
        return value if value is None or value.tzinfo else value.replace(tzinfo=UTC)

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "sqlite":
            # Text with an explicit UTC offset: it sorts like the instant it names, and
            # datetime.fromisoformat reads it back aware, in C, with no processing around.
            return dialect.type_descriptor(
                sqlite.DATETIME(  # type: ignore[no-untyped-call]  # untyped in SQLAlchemy
                    storage_format=_SQLITE_FORMAT, regexp=_SQLITE_PATTERN
                )
            )
        return dialect.type_descriptor(self.impl_instance)

    def result_processor(self, dialect: Dialect, coltype: object) -> Callable[[Any], Any] | None:
        if dialect.name == "sqlite":
            return datetime.fromisoformat
        if dialect.driver == "asyncpg":
            # asyncpg returns a timestamptz aware, in UTC: nothing to do for each value
            # (a history's load called a no-op for every message).
            return None
        return super().result_processor(dialect, coltype)

    def bind_processor(self, dialect: Dialect) -> Callable[[Any], Any] | None:
        if dialect.name == "sqlite":
            # The same text as _SQLITE_FORMAT, written by C code (bulk inserts bind thousands).
            return _sqlite_text
        return super().bind_processor(dialect)


def _sqlite_text(value: datetime | None) -> str | None:
    global _last_text
    if value is None:
        return None
    # datetime's own methods, unbound: a subclass may override isoformat or astimezone.
    if value.tzinfo is not UTC or type(value) is not datetime:
        # Only UTC values are reused: two datetimes sharing another tzinfo compare by
        # wall time, ignoring fold (01:30 before and after a DST change are "equal").
        return datetime.isoformat(datetime.astimezone(value, UTC), " ", "microseconds")
    # A bulk insert's messages mostly share their millisecond: the last text is reused.
    # The models hold plain UTC datetimes already (persistence.validation).
    last_value, last_text = _last_text
    if value == last_value:
        return last_text
    text = datetime.isoformat(value, " ", "microseconds")
    _last_text = (value, text)
    return text


# One tuple, swapped whole: threads never see a value with another's text.
_last_text: tuple[datetime | None, str] = (None, "")


_SQLITE_FORMAT = (
    "%(year)04d-%(month)02d-%(day)02d %(hour)02d:%(minute)02d:%(second)02d.%(microsecond)06d+00:00"
)
_SQLITE_PATTERN = r"(\d+)-(\d+)-(\d+) (\d+):(\d+):(\d+)\.(\d+)\+00:00"


def json_dumps(value: Any) -> str:
    """json.dumps, with the empty object of most metadata columns answered at once."""
    return "{}" if value == {} else json.dumps(value)


def json_value_loads(text: str) -> Any:
    """json.loads of any JSON value, with `{}` answered at once: the engines' decoder of
    JSON columns and of the server's own JSON (PostgreSQL's `EXPLAIN (FORMAT JSON)` is a
    list). The metadata columns are read as text and decoded by json_loads."""
    return {} if text == "{}" else json.loads(text)


# The C scanner json.loads ends in, called directly: 0.35 us where json.loads takes
# 1.0 for a small object, a tenth of a page of 100 sessions' building. typeshed types
# make_scanner's argument as a scanner; it takes the decoder whose settings it uses.
_scan_once = json.scanner.make_scanner(json.JSONDecoder())  # type: ignore[arg-type]
# Objects decoded straight into FrozenDict: a message's metadata (frozen_metadata).
_scan_frozen = json.scanner.make_scanner(json.JSONDecoder(object_pairs_hook=frozen_dict))  # type: ignore[arg-type]
_NOT_ONE = object()


def _one_object(scan: Callable[[str, int], tuple[Any, int]], text: str) -> Any:
    """What `scan` decodes of `text` if the text is one JSON object and nothing else
    (as our writers store it), else _NOT_ONE: json.loads then decides."""
    if type(text) is str and text[:1] == "{":
        try:
            value, end = scan(text, 0)
        except StopIteration:
            return _NOT_ONE
        if end == len(text):
            return value
    return _NOT_ONE


def frozen_json_loads(text: str) -> FrozenDict:
    """A message's metadata column as frozen metadata, as `freeze(json_loads(text))`.

    Decoded with its objects built frozen, then its arrays frozen where the text holds
    one: 0.8 us for a flat object of three keys, against 1.2 for json.loads alone and
    3.8 for freezing what json.loads gives (2.8 / 1.6 / 9.3 with a nested array).

    Raises:
        ValueError: as json_loads.
    """
    if text == "{}":
        return EMPTY
    value = _one_object(_scan_frozen, text)
    if value is _NOT_ONE:
        return freeze(json_loads(text))
    return freeze_arrays(value) if "[" in text else value


def json_loads(text: str) -> Any:
    """json.loads of a metadata column, with its commonest value, `{}`, answered at once.

    Raises:
        ValueError: the text is not JSON, or not a JSON object (found by attack: a
            hand-edited `[1, 2]` or `null` was loaded into the models, copied by
            `migrate`, and written into exports that `import` then refused).
    """
    if text == "{}":
        return {}
    value = _one_object(_scan_once, text)
    if value is not _NOT_ONE:
        return value
    value = json.loads(text)
    if type(value) is not dict:
        raise ValueError(f"not a JSON object but {type(value).__name__}")
    return value
