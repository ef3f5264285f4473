"""Reads from MongoDB secondaries: the read preference, and read-your-writes.

Only the reads that may see slightly stale data (listing, search, counts, exports)
follow the configured read preference; the client itself stays on the primary, so
that writes, loads and units of work read what was last written. A read preference
given in the URL (`readPreference`, `readPreferenceTags`, `maxStalenessSeconds`) is
taken out of the client's URL and applies to those reads only.

Read-your-writes, as PyMongo documents it for causally consistent sessions: every
write runs in a causally consistent session whose cluster and operation times the
storage keeps (`CausalClock`); every routed read runs in a new causally consistent
session advanced to them, so the server it lands on waits until it has applied
those writes (`readConcern.afterClusterTime`). A standalone server returns no
operation time; there every read goes to the one server anyway.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import parse_qsl, unquote

from bson.timestamp import Timestamp
from pymongo import AsyncMongoClient
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.read_preferences import (
    Nearest,
    PrimaryPreferred,
    Secondary,
    SecondaryPreferred,
)

from persistence.errors import InvalidDataError
from persistence.mongo.documents import DocumentSet
from persistence.mongo.uow import MongoUnitOfWork

ReadPreference = PrimaryPreferred | Secondary | SecondaryPreferred | Nearest

_MODES: dict[str, type[ReadPreference]] = {
    "primarypreferred": PrimaryPreferred,
    "secondary": Secondary,
    "secondarypreferred": SecondaryPreferred,
    "nearest": Nearest,
}
_URL_OPTIONS = ("readpreference", "readpreferencetags", "maxstalenessseconds")
# MongoDB's floor for maxStalenessSeconds with the default heartbeat (90 s).
MIN_MAX_STALENESS = 90


def _tag_set(value: str) -> dict[str, str]:
    if not value:
        return {}
    tags = {}
    for pair in value.split(","):
        name, colon, tag = pair.partition(":")
        if not colon or not name:
            raise InvalidDataError(
                f"connection_string: readPreferenceTags {unquote(value)!r} is not name:value,..."
            )
        tags[unquote(name)] = unquote(tag)
    return tags


def split_read_preference(
    connection_string: str, mode: str | None = None
) -> tuple[str, ReadPreference | None]:
    """Takes the read preference out of a MongoDB URL.

    Returns the URL without `readPreference`, `readPreferenceTags` and
    `maxStalenessSeconds`, and the read preference of the routed reads: `mode` if
    given, else the URL's; None where it is the primary (nothing to route). Routed
    reads keep secondaries more than MIN_MAX_STALENESS seconds behind out unless the
    URL sets `maxStalenessSeconds` (-1: no limit): found by review, without it a read
    landed on a far-behind secondary and waited for it to apply this storage's writes,
    where API.md skips a replica lagging too far.

    Raises:
        InvalidDataError: for an unknown mode, malformed tags or a bad staleness.
    """
    base, _, query = connection_string.partition("?")
    kept: list[str] = []
    url_mode: str | None = None
    tag_sets: list[dict[str, str]] = []
    staleness: int | None = None
    for part in query.split("&") if query else []:
        pairs = parse_qsl(part, keep_blank_values=True)
        key, value = pairs[0] if pairs else (part, "")
        lowered = key.lower()
        if lowered not in _URL_OPTIONS:
            kept.append(part)
        elif lowered == "readpreference":
            url_mode = value
        elif lowered == "readpreferencetags":
            tag_sets.append(_tag_set(value))
        else:
            try:
                staleness = int(value)
            except ValueError:
                raise InvalidDataError(
                    f"connection_string: maxStalenessSeconds {value!r} is not a whole number"
                ) from None
    url = base + ("?" + "&".join(kept) if kept else "")
    chosen = mode if mode is not None else url_mode
    if chosen is None and not tag_sets and staleness is None:
        return url, None
    lowered_mode = (chosen or "primary").lower()
    kind = _MODES.get(lowered_mode)
    if kind is None and lowered_mode != "primary":
        raise InvalidDataError(
            f"read_preference: {chosen!r} is not one of primary, primaryPreferred,"
            " secondary, secondaryPreferred, nearest"
        )
    if kind is None:
        if tag_sets or staleness not in (None, -1):
            raise InvalidDataError(
                "read_preference: primary takes no readPreferenceTags or maxStalenessSeconds"
            )
        return url, None
    if staleness is None:
        staleness = MIN_MAX_STALENESS
    if staleness != -1 and staleness < MIN_MAX_STALENESS:
        raise InvalidDataError(
            f"connection_string: maxStalenessSeconds must be -1 or at least"
            f" {MIN_MAX_STALENESS}, got {staleness}"
        )
    return url, kind(tag_sets=tag_sets or None, max_staleness=staleness)


class CausalClock:
    """The latest cluster and operation times of this storage's writes (and reads)."""

    def __init__(self) -> None:
        self.cluster_time: Mapping[str, Any] | None = None
        self.operation_time: Timestamp | None = None

    def observe(self, session: AsyncClientSession) -> None:
        """Keeps the session's times where they are later than what is known."""
        cluster_time = session.cluster_time
        if cluster_time is not None and (
            self.cluster_time is None
            or cluster_time["clusterTime"] > self.cluster_time["clusterTime"]
        ):
            self.cluster_time = cluster_time
        operation_time = session.operation_time
        if operation_time is not None and (
            self.operation_time is None or operation_time > self.operation_time
        ):
            self.operation_time = operation_time

    def session(self, client: AsyncMongoClient[Any]) -> AsyncClientSession:
        """A causally consistent session that comes after everything observed.

        Starting one sends nothing: PyMongo takes a server session only when the
        first command runs.
        """
        session = client.start_session(causal_consistency=True)
        if self.cluster_time is not None:
            session.advance_cluster_time(self.cluster_time)
        if self.operation_time is not None:
            session.advance_operation_time(self.operation_time)
        return session


class ObservedUnitOfWork(MongoUnitOfWork):
    """A unit of work whose commit the storage's clock observes (where there is one)."""

    def __init__(
        self,
        client: AsyncMongoClient[Any],
        docs: DocumentSet,
        token: str,
        transactional: bool,
        clock: CausalClock | None,
        refuse_closed: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(
            client, docs, token, transactional=transactional, refuse_closed=refuse_closed
        )
        self._clock = clock

    async def commit(self) -> None:
        client_session = self.client_session()
        try:
            await super().commit()
        finally:
            if self._clock is not None:
                self._clock.observe(client_session)


@asynccontextmanager
async def writing(
    client: AsyncMongoClient[Any], clock: CausalClock | None
) -> AsyncIterator[AsyncClientSession | None]:
    """The session of a write: causally consistent and observed where reads are routed."""
    if clock is None:
        yield None
        return
    async with client.start_session(causal_consistency=True) as session:
        try:
            yield session
        finally:
            clock.observe(session)


@asynccontextmanager
async def stale_reading(
    client: AsyncMongoClient[Any],
    clock: CausalClock | None,
    docs: DocumentSet,
    reading: DocumentSet | None,
) -> AsyncIterator[tuple[DocumentSet, AsyncClientSession | None]]:
    """The documents and session of a read that may go to a secondary.

    `reading` is bound to the database with the read preference; without routing
    (no clock) the read uses `docs` and no session, exactly as before.
    """
    if clock is None or reading is None:
        yield docs, None
        return
    async with clock.session(client) as session:
        try:
            yield reading, session
        finally:
            clock.observe(session)
