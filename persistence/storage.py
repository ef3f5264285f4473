"""The one interface every backend implements: SessionStorage and its unit of work."""

from __future__ import annotations

import uuid
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Literal, Protocol, Self, TypeVar, cast

from persistence.clock import truncate_to_millisecond
from persistence.errors import InvalidDataError
from persistence.models import (
    ROLES,
    STATUSES,
    ChatMessage,
    ChatSession,
    Role,
    Status,
    UploadedFileRecord,
)
from persistence.validation import (
    check_instance,
    check_instances,
    check_json_object,
    lookup_id,
    plain,
    storable_text,
)

BackendName = Literal["sqlite", "postgresql", "mongodb"]


def check_file_records(records: object, field: str) -> None:
    """Refuses a collection of which an element is not a file record, or one whose
    metadata some backend could not give back unchanged.

    Raises:
        InvalidDataError: naming `field`, the record and the offending value. Found by
            attack: metadata changed in place after the record was made skipped its
            validation; SQLite stored NUL and NaN (a migration to PostgreSQL then
            failed), PostgreSQL raised a server error, sets a raw TypeError.
    """
    check_instances(records, UploadedFileRecord, field)
    for record in cast(Collection[UploadedFileRecord], records):
        _check_record_metadata(record)


def check_file_record(record: object, field: str) -> None:
    """As check_file_records, for one record."""
    check_instance(record, UploadedFileRecord, field)
    _check_record_metadata(cast(UploadedFileRecord, record))


def _check_record_metadata(record: UploadedFileRecord) -> None:
    check_json_object(record.metadata, f"file record {record.file_id!r} metadata")


def check_status(status: str | None) -> Status | None:
    """Returns `status` if it is one of STATUSES (or None).

    Raises:
        InvalidDataError: naming the argument.
    """
    if status is not None and status not in STATUSES:
        raise InvalidDataError(f"status: {status!r} is not one of {', '.join(STATUSES)}")
    return status


def check_new_status(status: str) -> Status:
    """Returns `status` if it is one of STATUSES.

    Raises:
        InvalidDataError: naming the argument (found by attack: None failed an
            assertion, and under `python -O` changed nothing and said so).
    """
    checked = check_status(status)
    if checked is None:
        raise InvalidDataError(f"status: must be one of {', '.join(STATUSES)}, got None")
    return checked


def check_instant(value: datetime, field: str) -> datetime:
    """Returns `value` as a plain datetime in UTC, truncated to the millisecond as every
    stored time is. Found by attack: a cutoff with microseconds (`expiry_hours=1/7`)
    expired on SQL a session updated in the cutoff's own millisecond, which MongoDB
    (BSON keeps milliseconds) would have left active.

    Raises:
        InvalidDataError: naming the argument, for anything but a timezone-aware
            datetime (a naive one is read as local time by one backend, UTC by another).
    """
    if not isinstance(value, datetime) or value.utcoffset() is None:
        raise InvalidDataError(f"{field}: expected a timezone-aware datetime, got {value!r}")
    try:
        utc = datetime.astimezone(value, UTC)
    except OverflowError:
        raise InvalidDataError(f"{field}: {value!r} is out of range in UTC") from None
    return plain(truncate_to_millisecond(utc))


def lookup_ids(ids: Sequence[str], field: str = "session_ids") -> list[str]:
    """The ids of a lookup by many (sessions, file records) that something stored may
    carry: the others (a NUL, a lone surrogate) name nothing, on every backend.

    Raises:
        InvalidDataError: for a str or bytes instead of a sequence of ids (whose
            characters would pass as ids), or an id that is not a string.
    """
    if isinstance(ids, str | bytes):
        raise InvalidDataError(
            f"{field}: expected a sequence of ids, got one string {ids!r}"
            f" (wrap it in a list: [{ids!r}])"
        )
    if not isinstance(ids, Iterable):
        raise InvalidDataError(f"{field}: expected a sequence of ids, got {type(ids).__name__}")
    return [identifier for identifier in ids if lookup_id(identifier, field)]


# A search's place in stored order, of the backend's kind (search_batches).
K = TypeVar("K")

# The largest count a database column or parameter holds (a signed 64-bit integer).
LARGEST_COUNT = 2**63 - 1


def _check_count(name: str, value: object) -> None:
    """Refuses a count that is not an int (a bool is not one) in 0..LARGEST_COUNT.

    Raises:
        InvalidDataError: naming the argument.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidDataError(f"{name}: must be an int, got {type(value).__name__} {value!r}")
    if value < 0:
        raise InvalidDataError(f"{name}: must be >= 0, got {value}")
    if value > LARGEST_COUNT:
        raise InvalidDataError(f"{name}: must be at most 2**63 - 1, got {value}")


def check_batch_size(batch_size: int) -> None:
    """Refuses a batch size that is not a count above 0 (see _check_count).

    Raises:
        InvalidDataError: naming the argument. Found by attack: 2**70 reached the
            drivers, SQLite's as OverflowError, and on PostgreSQL left the pooled
            connection broken for every later snapshot read; "2" a TypeError.
    """
    if type(batch_size) is int and batch_size <= 0:
        raise InvalidDataError(f"batch_size: must be > 0, got {batch_size}")
    _check_count("batch_size", batch_size)


def check_last(last: int | None) -> None:
    """Refuses a `last` that is not None or a count (see _check_count).

    Raises:
        InvalidDataError: naming the argument.
    """
    if last is not None:
        _check_count("last", last)


def check_search(query: object, limit: int, role: str | None) -> Role | None:
    """Refuses a search's query that is not a string, its limit that is not a count and
    an unknown role; returns the role.

    Raises:
        InvalidDataError: naming the argument.
    """
    if not isinstance(query, str):
        raise InvalidDataError(f"query: must be a string, got {type(query).__name__}")
    check_page(limit)
    return check_role(role)


def check_search_batches(
    query: object, batch_size: int, limit: int | None, role: str | None
) -> Role | None:
    """check_search for iter_search_messages, and its batch size; returns the role.

    Raises:
        InvalidDataError: naming the argument.
    """
    checked = check_search(query, 0 if limit is None else limit, role)
    check_batch_size(batch_size)
    return checked


async def search_batches(
    page: Callable[[int, K | None], Awaitable[tuple[list[ChatMessage], K | None, str | None]]],
    batch_size: int,
    limit: int | None,
) -> AsyncIterator[list[ChatMessage]]:
    """iter_search_messages' batches, each `page(size, below)`: the newest `size` matches
    below the key `below` (None: the newest of all), the key of its last match, and the
    incarnation of the session searched (None: every session).

    The batches end when that incarnation changes: a session deleted and created again
    under its id starts its positions again (found by attack: the batches went on into
    the new session's messages).
    """
    below: K | None = None
    left = limit
    first = True
    incarnation: str | None = None
    while left is None or left > 0:
        want = batch_size if left is None else min(batch_size, left)
        messages, last, held = await page(want, below)
        if first:
            first, incarnation = False, held
        elif messages and held != incarnation:
            return
        if messages:
            yield messages
        if len(messages) < want or last is None:
            return
        below = last
        left = None if left is None else left - len(messages)


def searchable_session(session_id: object) -> bool:
    """Whether a search scoped to `session_id` (None: every session) may find anything:
    an id no backend can store holds no session, as load_session answers None.

    Raises:
        InvalidDataError: if `session_id` is not a string.
    """
    if session_id is None:
        return True
    if not isinstance(session_id, str):
        raise InvalidDataError(f"session_id: must be a string, got {type(session_id).__name__}")
    return storable_text(session_id)


def check_role(role: str | None) -> Role | None:
    """Returns `role` if it is one of ROLES (or None).

    Raises:
        InvalidDataError: naming the argument.
    """
    if role is not None and role not in ROLES:
        raise InvalidDataError(f"role: {role!r} is not one of {', '.join(ROLES)}")
    return role


def check_page(limit: int, offset: int = 0) -> None:
    """Refuses a limit or offset that is not a count (see _check_count).

    Raises:
        InvalidDataError: naming the argument.
    """
    _check_count("limit", limit)
    _check_count("offset", offset)


def page_cursor(after: ChatSession | None) -> tuple[datetime, str] | None:
    """Where a page that follows `after` starts: (updated_at, session_id) where a
    listing returned it (found by attack: a walk that saved each listed session
    restarted at the top with each page, and never ended), else where it is now.

    Raises:
        InvalidDataError: `after` is not a ChatSession.
    """
    if after is None:
        return None
    check_instance(after, ChatSession, "after")
    return after.listed_at()


@dataclass(frozen=True, slots=True)
class StorageCounts:
    """What a store holds, counted inside the database."""

    sessions_by_status: dict[str, int]
    messages: int
    files: int
    expired_files: int

    @property
    def total_sessions(self) -> int:
        return sum(self.sessions_by_status.values())


class SessionRepository(Protocol):
    """The sessions of one unit of work."""

    async def get(self, session_id: str) -> ChatSession | None: ...

    async def add(self, session: ChatSession) -> None: ...

    async def delete(self, session_id: str) -> bool: ...


class FileRecordRepository(Protocol):
    """The file records of one unit of work."""

    async def get(self, file_id: str) -> UploadedFileRecord | None: ...

    async def add(self, record: UploadedFileRecord) -> None: ...

    async def delete(self, file_id: str) -> bool: ...


class UnitOfWork(ABC):
    """Changes that are committed together or not at all.

    Leaving the `async with` block without `commit()` rolls everything back.
    """

    sessions: SessionRepository
    files: FileRecordRepository

    @abstractmethod
    async def commit(self) -> None:
        """Makes every change of this unit of work durable."""

    @abstractmethod
    async def rollback(self) -> None:
        """Discards every change not yet committed."""

    @abstractmethod
    async def __aenter__(self) -> Self: ...

    @abstractmethod
    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


class SessionStorage(ABC):
    """Chat sessions, their ordered messages and uploaded-file records in one store."""

    backend_name: BackendName

    @property
    def token(self) -> str:
        """Identifies the store in each session's record of what it holds.

        Once initialized, every storage opened on one store has the same token (the
        backend's identity of the database, `_identified_as`): a session loaded through
        one and saved through another is known there, not taken for a new object.
        """
        token: str | None = self.__dict__.get("_bookkeeping_token")
        if token is None:
            token = self.__dict__["_bookkeeping_token"] = uuid.uuid4().hex
        return token

    async def running_instance(self) -> str | None:
        """Which running server answers for the store, where copies of one store can run
        apart under its token (None: a store cannot). Read-only comparisons tell such
        copies apart by it; anything that writes goes by the token alone."""
        return None

    def _identified_as(self, identity: str) -> None:
        """Takes `identity`, the store's, as this storage's token (when it opens)."""
        self.__dict__["_bookkeeping_token"] = f"{self.backend_name}:{identity}"

    def own_file(self, path: str | Path) -> str | None:
        """Which of this store's own files `path` names ("the store X", "the wal file of
        the store X"), or None: a file that writing would replace the store by. Only a
        SQLite store has files of its own."""
        return None

    def check_plain_save(self, session: ChatSession) -> None:
        """Raises if a save of `session` outside a unit of work, from this task, could
        only wait for a unit of work this task holds open. SessionManager asks before
        it queues a save; a backend whose units of work hold nothing until they commit
        has nothing to refuse.

        Raises:
            PersistenceError: naming the unit of work that stands in the way.
        """
        return None

    def has_unsaved_changes(self, session: ChatSession) -> bool:
        """Whether this store lacks something of `session` (True if it never held it)."""
        return session.has_changes_for(self.token)

    async def __aenter__(self) -> Self:
        await self.initialize()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @abstractmethod
    async def initialize(self) -> None:
        """Connects and brings the schema of an empty or older store to head.

        Raises:
            StorageConnectionError: if the server cannot be reached.
            SchemaVersionError: if the store was written by a newer version.
            MigrationError: if the database holds another application's tables or
                version table; nothing is written then.
        """

    @abstractmethod
    async def open_for_reading(self) -> None:
        """Connects to an existing store at head, writing nothing (not even a schema).

        Use it instead of `initialize()` where only reads follow: the storage then
        refuses writes. A SQLite file is opened read-only, so it may sit on a
        read-only disk.

        Raises:
            StorageConnectionError: if the server or file cannot be reached.
            SchemaVersionError: if the store was written by a newer version.
            MigrationError: if the database is empty, at an older revision (run
                `persistence upgrade`), or another application's.
        """

    @abstractmethod
    async def close(self) -> None:
        """Releases every connection; calling it twice is harmless."""

    @abstractmethod
    def unit_of_work(self) -> UnitOfWork:
        """Returns a new unit of work over this store."""

    @abstractmethod
    async def save_session(self, session: ChatSession, *, force: bool = False) -> bool:
        """Writes what this object changed since it last loaded or saved it here.

        New messages are appended after whatever the store holds; edits and removals
        (`edit_message`, `rewind`, `pop_message`) and changed fields are written;
        metadata merges per top-level key; `updated_at` never moves backwards. A new
        object (never loaded or saved here) creates the session, or adds its messages
        and fields to the one stored under its id.

        With `force`, this object's values win over another writer's for what it
        changed, instead of a conflict (edits of messages removed meanwhile are
        skipped): last writer wins, for callers that decided so (SessionManager, after
        reloading).

        Raises:
            SessionConflictError: another writer changed the same field, metadata key or
                message since this object's last load or save (nothing written; never
                with `force`).
            SessionDeletedError: the session was deleted since (nothing written).
            InvalidDataError: a change the model cannot express, a message that belongs
                to another session or repeats an id, an id changed since the load, or
                `session` not a ChatSession (nothing written).
            PersistenceError: if the backend fails.
        """

    @abstractmethod
    async def load_session(self, session_id: str, *, last: int | None = None) -> ChatSession | None:
        """Returns the session with its history in order, or None.

        With `last=N`, only the newest N messages (cost flat in the history's length),
        `message_count` still the full count.

        Raises:
            InvalidDataError: if `last` is not a count, or `session_id` not a string.
        """

    @abstractmethod
    async def load_sessions(self, session_ids: Sequence[str]) -> list[ChatSession]:
        """Returns the sessions among `session_ids` that exist, with their messages.

        Raises:
            InvalidDataError: `session_ids` is not a sequence of strings.
        """

    @abstractmethod
    async def list_sessions(
        self,
        status: str | None = None,
        limit: int = 100,
        offset: int = 0,
        *,
        after: ChatSession | None = None,
    ) -> list[ChatSession]:
        """Returns a page of sessions, newest `updated_at` first, without messages.

        With `after` (the last session of the page before), the page of those that
        follow it in that order, `offset` counted from there: a listing that goes on
        so neither repeats nor skips a session that stays as it was, while others are
        written (a session written meanwhile moves to the top, ahead of the listing),
        and each page costs what the first does.

        Raises:
            InvalidDataError: a status, limit or offset out of range, or an `after`
                that is not a ChatSession.
        """

    @abstractmethod
    async def delete_session(self, session_id: str) -> bool:
        """Removes the session and its messages; False if it did not exist.

        Raises:
            InvalidDataError: `session_id` is not a string.
        """

    @abstractmethod
    async def save_file_record(self, file_record: UploadedFileRecord) -> bool:
        """Upserts a file record.

        Raises:
            InvalidDataError: `file_record` is not an UploadedFileRecord.
        """

    @abstractmethod
    async def load_file_record(self, file_id: str) -> UploadedFileRecord | None:
        """Returns the file record, or None.

        Raises:
            InvalidDataError: `file_id` is not a string.
        """

    @abstractmethod
    async def list_file_records(self, limit: int = 100) -> list[UploadedFileRecord]:
        """Returns file records, newest `uploaded_at` first."""

    @abstractmethod
    async def delete_expired_files(self) -> int:
        """Deletes the file records whose `expires_at` has passed; returns how many."""

    @abstractmethod
    async def search_messages(
        self,
        query: str,
        limit: int = 50,
        *,
        session_id: str | None = None,
        role: str | None = None,
    ) -> list[ChatMessage]:
        """Returns the newest `limit` messages that match `query`, newest first.

        One rule on every backend (persistence.search): text and query are compared
        after NFKC, case folding and removal of accents from Latin, Greek and Cyrillic
        letters; words are runs of letters, marks and digits; a message matches when
        every query word begins one of its words (`capit` finds `capital`), or, for a
        word of Han, Hiragana, Katakana or Thai, occurs anywhere in it (`日本語` finds
        `日本語のテキスト`). A message's first 1 MiB of characters is searchable.
        Newest first is stored order. A query without words finds nothing; no query
        raises.

        Args:
            query: what a person typed; any text.
            limit: at most this many messages (>= 0).
            session_id: only messages of this session.
            role: only messages of this role (user, assistant, system or tool).

        Raises:
            InvalidDataError: for a negative limit or an unknown role.
            PersistenceError: if the backend fails.
        """

    @abstractmethod
    def iter_search_messages(
        self,
        query: str,
        batch_size: int = 500,
        *,
        session_id: str | None = None,
        role: str | None = None,
        limit: int | None = None,
    ) -> AsyncIterator[list[ChatMessage]]:
        """Yields the messages that match `query`, newest first, in batches (keyset paging).

        The rule and the order are search_messages'; each batch is one search that
        begins below the last message of the batch before, so a long result is never
        held whole. Messages that stay where they are come once each; one stored while
        the iteration runs is newer than where it stands, and is left out, except where
        a place is taken again (README, Search): SQLite's reused row ids after its
        newest messages are deleted, a PostgreSQL transaction committed after the
        batches passed its row ids, MongoDB's order across processes within a second.
        With `session_id`, the batches end when the session is created again under
        its id.

        Args:
            batch_size: at most this many messages per batch (> 0).
            limit: at most this many messages in all (None: every match).

        Raises:
            InvalidDataError: for a batch size that is not a count above 0, a negative
                limit, an unknown role, or a query that is not a string.
            PersistenceError: if the backend fails.
        """

    async def index_for_search(self) -> int:
        """Writes the search documents or terms that inserts left pending; returns how many.

        On SQLite every insert leaves its documents to later, and on PostgreSQL an
        insert of more than 32 messages in one statement leaves its index terms (the
        document is written with the row). The first search that needs them writes
        them before it answers; until then searches test those messages one by one,
        and a store opened for reading never writes them. Tools that load a store call
        this at the end (the CLI's import, migrate and restore) so that its searches
        are fast at once. MongoDB writes everything with the messages and returns 0.

        Raises:
            PersistenceError: if the backend fails, or a SQL store was opened for reading.
        """
        return 0

    @abstractmethod
    def iter_sessions(
        self, batch_size: int = 500, *, with_messages: bool = True
    ) -> AsyncIterator[list[ChatSession]]:
        """Yields every session in batches, in `session_id` order (keyset paging).

        Each batch is read as one consistent state: a session's fields, count and
        history always belong together, even while writers append. On SQLite and
        PostgreSQL every batch is of one state, read on a connection of the iteration's
        own until it ends (closed early with `contextlib.aclosing`); with read replicas
        and on MongoDB, each batch is its own.
        """

    @abstractmethod
    def iter_file_records(self, batch_size: int = 500) -> AsyncIterator[list[UploadedFileRecord]]:
        """Yields every file record in batches, in `file_id` order."""

    @abstractmethod
    async def count(self) -> StorageCounts:
        """Counts sessions by status, messages, files and expired files in the database."""

    @abstractmethod
    async def count_sessions(self) -> dict[str, int]:
        """Counts sessions per status (every status a key); cheap whatever the store's size.

        What `SessionManager.startup` needs, without the table scans of `count`: the
        SQL backends keep these counts in step with every write (revision 0004).
        """

    @abstractmethod
    async def expire_sessions(self, updated_before: datetime) -> int:
        """Marks active sessions last updated before the cutoff `expired`; returns how many.

        Raises:
            InvalidDataError: if the cutoff is not a timezone-aware datetime; nothing
                is written then.
            PersistenceError: if the backend fails.
        """

    @abstractmethod
    async def forget_deletions(self, deleted_before: datetime) -> int:
        """Removes the records of sessions deleted before the cutoff; returns how many.

        Every delete leaves the session's id and incarnation behind (about 100 bytes), so
        that a save retrying a creation of unknown outcome finds its session deleted
        rather than creating it again. A retry from before the cutoff, of a creation
        whose session was then deleted, creates it again once the record is gone.

        Raises:
            InvalidDataError: if the cutoff is not a timezone-aware datetime; nothing
                is written then.
            PersistenceError: if the backend fails.
        """

    async def source_key(self) -> str:
        """What a copy from this store is known by in the destination's notes (see
        persistence.transfer.unfinished): the store's token (on PostgreSQL it holds the
        store's own id); on SQLite with the store's id, which another file reusing a
        deleted one's inode does not have (found by attack)."""
        return f"store {self.token}"

    @abstractmethod
    async def read_notes(self) -> dict[str, str]:
        """The notes the store keeps about itself, by name (the transfer tools': a copy
        into it not finished yet). Not the store's id, which no note may replace.

        Raises:
            PersistenceError: if the backend fails.
        """

    @abstractmethod
    async def write_note(self, name: str, value: str | None) -> None:
        """Sets the note `name` (None: removes it), committed at once.

        Raises:
            InvalidDataError: for a name that is not a note's (`store_id`, or more than
                64 characters).
            PersistenceError: if the backend fails.
        """

    @abstractmethod
    async def set_status(self, session_ids: Sequence[str], status: Status) -> int:
        """Sets the status of the given sessions in one statement; returns how many changed."""

    @abstractmethod
    async def insert_sessions(self, sessions: Sequence[ChatSession]) -> bool:
        """Inserts sessions the store does not hold yet, with their histories, in one go.

        The bulk path of migrations and imports: every session and message of the
        batch in one transaction, as multi-row statements (one `insert_many` on
        MongoDB), each stored as a new session (revision 1, positions 0..n-1, its
        `message_count` the messages it carries). The objects are not marked as
        stored: this is for data on its way in, not for objects an application keeps
        saving.

        Returns:
            True if everything was inserted; False, with nothing written, if the store
            already holds one of the session ids or message ids (the caller then
            merges those sessions the careful way).

        Raises:
            InvalidDataError: if a message names another session or an id repeats
                within the batch.
            PersistenceError: if the backend fails.
        """

    @abstractmethod
    async def insert_file_records(self, records: Sequence[UploadedFileRecord]) -> list[str]:
        """Inserts the records whose file id the store does not hold, in one go; keeps
        the ones it holds as they are (where `save_file_record` replaces them).

        The file path of migrations and imports: a record a service wrote between the
        copy's look and its write is the service's, and stays.

        Returns:
            The file ids inserted, in the order of `records`.

        Raises:
            PersistenceError: if the backend fails (nothing is inserted on SQL backends).
        """

    @abstractmethod
    async def load_file_records(self, file_ids: Sequence[str]) -> list[UploadedFileRecord]:
        """Returns the file records among `file_ids` that exist, in one round trip per chunk."""

    @abstractmethod
    async def copy_to_file(self, target: Path) -> bool:
        """Writes a consistent native copy of the whole store to `target`.

        Returns False where the backend has no native file copy (the caller then
        falls back to the export format).
        """
