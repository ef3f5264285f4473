"""The client's connection: the URL and database name checked, the client's options,
what the server offers (transactions), and the indexes it may hold.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from bson.codec_options import TypeDecoder, TypeRegistry
from bson.int64 import Int64
from pymongo import IndexModel

from persistence.errors import InvalidDataError

_SCHEMES = ("mongodb://", "mongodb+srv://")
# MongoDB's rules for database names: these characters, and fewer than 64 bytes.
_BAD_DATABASE_CHARACTERS = set('/\\. "$*<>:|?\x00')
_DATABASE_NAME_BYTES = 63


class _Int64AsInt(TypeDecoder):
    """Decodes BSON int64 as a plain int, as SQLite and PostgreSQL return it."""

    bson_type = Int64

    def transform_bson(self, value: Any) -> int:
        return int(value)


def check_connection_string(connection_string: str) -> str:
    """Accepts `mongodb://` and `mongodb+srv://` URLs, whatever the scheme's case;
    returns the URL with its scheme in lower case, the only one pymongo takes.

    Raises:
        InvalidDataError: for any other scheme (the password is never repeated).
    """
    if not isinstance(connection_string, str) or not connection_string.lower().startswith(_SCHEMES):
        scheme = (
            str(connection_string).split("://", 1)[0] if "://" in str(connection_string) else ""
        )
        shown = f"scheme {scheme!r}" if scheme else "no scheme"
        raise InvalidDataError(
            f"connection_string: {shown} is not MongoDB (use mongodb:// or mongodb+srv://)"
        )
    scheme, _, rest = connection_string.partition("://")
    return f"{scheme.lower()}://{rest}"


def check_database_name(name: str) -> str:
    """Refuses a database name MongoDB would refuse.

    Raises:
        InvalidDataError: naming the problem.
    """
    if not name:
        raise InvalidDataError("database_name: must not be empty")
    bad = sorted(set(name) & _BAD_DATABASE_CHARACTERS)
    if bad:
        raise InvalidDataError(f"database_name: {name!r} contains {''.join(bad)!r}")
    if len(name.encode("utf-8")) > _DATABASE_NAME_BYTES:
        raise InvalidDataError(f"database_name: longer than {_DATABASE_NAME_BYTES} bytes")
    return name


def client_options(connection_string: str, server_selection_timeout: float) -> dict[str, Any]:
    """Keyword options of the client: aware UTC datetimes, plain ints, a short timeout.

    A timeout the URL sets itself is kept.
    """
    given = {key.lower() for key, _ in parse_qsl(urlsplit(connection_string).query)}
    options: dict[str, Any] = {
        # MongoDB returns naive datetimes unless told otherwise; every backend returns UTC.
        "tz_aware": True,
        "tzinfo": UTC,
        "type_registry": TypeRegistry([_Int64AsInt()]),
        "connect": False,
    }
    timeout_ms = int(server_selection_timeout * 1000)
    if "serverselectiontimeoutms" not in given:
        options["serverSelectionTimeoutMS"] = timeout_ms
    if "connecttimeoutms" not in given:
        options["connectTimeoutMS"] = timeout_ms
    return options


def has_transactions(hello: Mapping[str, Any]) -> bool:
    """Whether the server that sent this `hello` reply runs multi-document transactions.

    A replica set member (`setName`) or a mongos router (`msg: isdbgrid`) with logical
    sessions does; a standalone server does not.
    """
    return "logicalSessionTimeoutMinutes" in hello and (
        "setName" in hello or hello.get("msg") == "isdbgrid"
    )


def indexes_to_create(indexes: Sequence[IndexModel], *, sharded_cluster: bool) -> list[IndexModel]:
    """The indexes to create; on a sharded cluster, each unique one as a plain index.

    MongoDB keeps a unique index on a sharded collection only where the shard key
    prefixes it, so the one on message ids would stop `chat_sessions` being sharded
    by `_id`. There a message id stays unique within its session through the saves'
    own guard; across sessions nothing enforces it (ids are random UUIDs). The index
    stays, not unique (`ix_` for `ux_`): found by review, without it every save's look
    for the message ids it adds scanned the whole collection on every shard.
    """
    if not sharded_cluster:
        return list(indexes)
    return [_not_unique(index) if index.document.get("unique") else index for index in indexes]


def _not_unique(index: IndexModel) -> IndexModel:
    document = dict(index.document)
    keys = list(document.pop("key").items())
    document.pop("unique")
    name = document.pop("name")
    return IndexModel(keys, name="ix_" + name.removeprefix("ux_"), **document)
