"""The export file: one JSON document, written and read as a stream.

```
{"format": "persistence-export", "version": 1, "exported_at": "...", "backend": "sqlite",
 "sessions": [{...session fields..., "messages": [{...}, ...]}, ...],
 "file_records": [{...}, ...],
 "counts": {"sessions": 2, "messages": 7, "files": 1}}
```

`format` and `version` come first, so a reader refuses a foreign or newer file before
it looks at a single record; `counts` comes last, because a live store is exported as
it is read and only the writer's own tally is exact. The file is read as a stream, one
record at a time (json_stream.py), so one larger than memory is validated and imported
without ever being held whole.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import IO, Any

from pydantic import ValidationError

from persistence.errors import InvalidDataError
from persistence.formats import escape_raw_json
from persistence.models import ChatMessage, ChatSession, UploadedFileRecord
from persistence.transfer.json_stream import (
    READ_SIZE,
    document_start,
    exact_floats,
    json_errors,
    parser_for,
    pass_parser,
    read_exactly_if_need_be,
    record_items,
    top_level,
)
from persistence.validation import shown

FORMAT_NAME = "persistence-export"
FORMAT_VERSION = 1
_HEADER_KEYS = ("format", "version", "exported_at", "backend")
_RECORD_KEYS = ("sessions", "file_records")
_KNOWN_KEYS = frozenset({*_HEADER_KEYS, *_RECORD_KEYS, "counts"})


def _timestamp(value: datetime) -> str:
    return value.isoformat(timespec="milliseconds")


def message_document(message: ChatMessage) -> dict[str, Any]:
    return {
        "message_id": message.message_id,
        "session_id": message.session_id,
        "role": message.role,
        "content": message.content,
        "created_at": _timestamp(message.created_at),
        "metadata": message.metadata,
    }


def session_document(session: ChatSession) -> dict[str, Any]:
    return {
        "session_id": session.session_id,
        "model": session.model,
        "created_at": _timestamp(session.created_at),
        "updated_at": _timestamp(session.updated_at),
        "message_count": session.message_count,
        "metadata": session.metadata,
        "status": session.status,
        "messages": [message_document(message) for message in session.messages],
    }


def file_record_document(record: UploadedFileRecord) -> dict[str, Any]:
    return {
        "file_id": record.file_id,
        "gemini_file_name": record.gemini_file_name,
        "gemini_file_uri": record.gemini_file_uri,
        "display_name": record.display_name,
        "size": record.size,
        "mime_type": record.mime_type,
        "uploaded_at": _timestamp(record.uploaded_at),
        "expires_at": _timestamp(record.expires_at),
        "metadata": record.metadata,
    }


@dataclass
class DocumentCounts:
    sessions: int = 0
    messages: int = 0
    files: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"sessions": self.sessions, "messages": self.messages, "files": self.files}


class DocumentWriter:
    """Writes one export document to a text stream, a batch of records at a time."""

    def __init__(
        self,
        stream: IO[str],
        *,
        backend: str,
        exported_at: datetime,
        escape_controls: bool = False,
    ) -> None:
        self._stream = stream
        # For a terminal: what it would act on (DEL, C1 and bidirectional controls) as
        # \u escapes (found by attack: `export-all -` printed them raw).
        self._escaped = escape_raw_json if escape_controls else _as_it_is
        self.counts = DocumentCounts()
        header = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "exported_at": _timestamp(exported_at),
            "backend": backend,
        }
        stream.write(
            self._escaped(json.dumps(header, ensure_ascii=False))[:-1] + ',\n"sessions": ['
        )
        self._first = True

    def _record(self, document: dict[str, Any]) -> None:
        self._stream.write("\n" if self._first else ",\n")
        self._stream.write(self._escaped(json.dumps(document, ensure_ascii=False, allow_nan=False)))
        self._first = False

    def write_sessions(self, sessions: Iterable[ChatSession]) -> None:
        for session in sessions:
            self._record(session_document(session))
            self.counts.sessions += 1
            self.counts.messages += len(session.messages)

    def start_file_records(self) -> None:
        self._stream.write('\n],\n"file_records": [')
        self._first = True

    def write_file_records(self, records: Iterable[UploadedFileRecord]) -> None:
        for record in records:
            self._record(file_record_document(record))
            self.counts.files += 1

    def finish(self) -> None:
        self._stream.write(f'\n],\n"counts": {json.dumps(self.counts.as_dict())}}}\n')


def _as_it_is(text: str) -> str:
    return text


def _describe(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors()[:3]:
        location = ".".join(str(part) for part in error["loc"])
        parts.append(f"{location}: {error['msg']}" if location else error["msg"])
    more = len(exc.errors()) - 3
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


def _label(kind: str, index: int, value: Any, key: str) -> str:
    identifier = value.get(key) if isinstance(value, dict) else None
    if not isinstance(identifier, str):
        return f"{kind}[{index}]"
    shown = identifier if len(identifier) <= 60 else identifier[:57] + "..."
    return f"{kind}[{index}] ({shown!r})"


def session_from_document(value: Any, index: int) -> ChatSession:
    """Validates one session of the file, its messages included.

    Raises:
        InvalidDataError: naming the session and the field.
    """
    label = _label("sessions", index, value, "session_id")
    if not isinstance(value, dict):
        raise InvalidDataError(f"{label}: not a JSON object")
    _refuse_missing(label, value, _SESSION_FIELDS)
    messages = value.get("messages")
    for position, message in enumerate(messages if isinstance(messages, list) else ()):
        if isinstance(message, dict):
            _refuse_missing(f"{label}: messages[{position}]", message, _MESSAGE_FIELDS)
    try:
        session = ChatSession.model_validate(value)
    except ValidationError as exc:
        raise InvalidDataError(f"{label}: {_describe(exc)}") from None
    for position, message in enumerate(session.messages):
        if message.session_id != session.session_id:
            raise InvalidDataError(
                f"{label}: messages[{position}] has session_id {message.session_id!r}"
            )
    if session.message_count != len(session.messages):
        raise InvalidDataError(
            f"{label}: message_count is {session.message_count}"
            f" but the session carries {len(session.messages)} messages"
        )
    return session


def file_record_from_document(value: Any, index: int) -> UploadedFileRecord:
    """Validates one file record of the file.

    Raises:
        InvalidDataError: naming the record and the field.
    """
    label = _label("file_records", index, value, "file_id")
    if not isinstance(value, dict):
        raise InvalidDataError(f"{label}: not a JSON object")
    _refuse_missing(label, value, _FILE_FIELDS)
    try:
        return UploadedFileRecord.model_validate(value)
    except ValidationError as exc:
        raise InvalidDataError(f"{label}: {_describe(exc)}") from None


# Each record's fields, in the models' order (for the message) and as a set (for the test).
_SESSION_FIELDS = tuple(ChatSession.model_fields)
_MESSAGE_FIELDS = tuple(ChatMessage.model_fields)
_FILE_FIELDS = tuple(UploadedFileRecord.model_fields)
_AS_SET = {fields: frozenset(fields) for fields in (_SESSION_FIELDS, _MESSAGE_FIELDS, _FILE_FIELDS)}


def _refuse_missing(label: str, value: dict[str, Any], fields: tuple[str, ...]) -> None:
    """Refuses a record that lacks a field: an export writes every one.

    Found by attack: the models' defaults filled them in, a new random message id or
    session id and the time of the import, so importing one file again added its
    messages and sessions again. The keys are compared as sets, in C: an import tests
    every message twice (validating, then reading).
    """
    if value.keys() >= _AS_SET[fields]:
        return
    missing = [name for name in fields if name not in value]
    raise InvalidDataError(
        f"{label}: {', '.join(missing)} missing (an export file holds every field)"
    )


class _SeenIds:
    """Ids met so far, in a private temporary SQLite database: memory stays flat however
    big the file.

    SQLite removes such a database's file from its directory as it creates it, so
    nothing is left behind by a process killed mid-way (found by attack: each import
    killed with SIGKILL left a `persistence-import-*` directory holding its ids).
    """

    def __init__(self) -> None:
        self._db = sqlite3.connect("", isolation_level=None)
        self._db.execute("PRAGMA journal_mode=OFF")
        self._db.execute("PRAGMA synchronous=OFF")
        self._db.execute("CREATE TABLE seen (kind TEXT, id TEXT, PRIMARY KEY (kind, id))")
        self._db.execute("BEGIN")

    def add(self, kind: str, identifier: str) -> bool:
        """Records the id; False if it was already there."""
        cursor = self._db.execute("INSERT OR IGNORE INTO seen VALUES (?, ?)", (kind, identifier))
        return cursor.rowcount == 1

    def close(self) -> None:
        self._db.close()


@dataclass
class DocumentSummary:
    """What a validated export file holds."""

    version: int
    exported_at: datetime
    backend: str | None
    counts: DocumentCounts = field(default_factory=DocumentCounts)


def _check_header(header: dict[str, Any]) -> None:
    name = header.get("format")
    if name != FORMAT_NAME:
        raise InvalidDataError(f"not an export file: format is {shown(name)}, not {FORMAT_NAME!r}")
    version = header.get("version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise InvalidDataError(f"version: {shown(version)} is not a format version")
    if version > FORMAT_VERSION:
        raise InvalidDataError(
            f"version: the file has format version {shown(version)}, written by a newer"
            f" persistence; this one reads version {FORMAT_VERSION}"
        )
    if version != FORMAT_VERSION:
        raise InvalidDataError(f"version: unknown format version {shown(version)}")


def _exported_at(value: Any) -> datetime:
    try:
        parsed = datetime.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        parsed = None
    if parsed is None or parsed.tzinfo is None:
        raise InvalidDataError(f"exported_at: {shown(value)} is not a timezone-aware ISO timestamp")
    return parsed


class _Validation:
    def __init__(self, seen: _SeenIds) -> None:
        self.seen = seen
        self.header: dict[str, Any] = {}
        self.counts = DocumentCounts()
        self.declared: Any = None

    def _unique(self, kind: str, identifier: str, where: str) -> None:
        if not self.seen.add(kind, identifier):
            raise InvalidDataError(f"{where}: duplicate {kind} {shown(identifier)} in the file")

    def item(self, key: str, value: Any) -> None:
        if key == "session_id":
            raise InvalidDataError(
                "this is a single-session export (top-level 'session_id', from `persistence"
                " export ID`); import takes a file written by `persistence export-all`"
            )
        if key not in _KNOWN_KEYS:
            raise InvalidDataError(f"unexpected top-level key {shown(key)}")
        if key in _RECORD_KEYS:
            if "version" not in self.header or "format" not in self.header:
                raise InvalidDataError("format and version must come before the records")
        elif key == "counts":
            if self.declared is not None:
                raise InvalidDataError("'counts' appears twice")
            self.declared = value
        else:
            if key in self.header:
                raise InvalidDataError(f"{key!r} appears twice")
            self.header[key] = value
            if "format" in self.header and "version" in self.header:
                _check_header(self.header)

    def record(self, key: str, value: Any) -> None:
        if key == "sessions":
            self._session(value)
        else:
            self._file_record(value)

    def _session(self, value: Any) -> None:
        session = session_from_document(value, self.counts.sessions)
        where = f"sessions[{self.counts.sessions}]"
        self._unique("session_id", session.session_id, where)
        for position, message in enumerate(session.messages):
            self._unique("message_id", message.message_id, f"{where}.messages[{position}]")
        self.counts.sessions += 1
        self.counts.messages += len(session.messages)

    def _file_record(self, value: Any) -> None:
        record = file_record_from_document(value, self.counts.files)
        self._unique("file_id", record.file_id, f"file_records[{self.counts.files}]")
        self.counts.files += 1

    def summary(self) -> DocumentSummary:
        for key in ("format", "version", "exported_at"):
            if key not in self.header:
                raise InvalidDataError(f"not an export file: {key!r} is missing")
        if self.declared is None:
            raise InvalidDataError("'counts' is missing (truncated file?)")
        if self.declared != self.counts.as_dict():
            raise InvalidDataError(
                f"counts: the file declares {shown(self.declared)} but holds"
                f" {self.counts.as_dict()!r} (truncated or edited file)"
            )
        backend = self.header.get("backend")
        return DocumentSummary(
            version=int(self.header["version"]),
            exported_at=_exported_at(self.header["exported_at"]),
            backend=backend if isinstance(backend, str) else None,
            counts=self.counts,
        )


def validate_document(stream: IO[bytes]) -> DocumentSummary:
    """Reads the whole document and checks every record; writes nothing anywhere.

    One pass checks the document's structure and header, then one pass per record
    array checks every record.

    Raises:
        InvalidDataError: for a truncated or malformed file, a foreign or newer
            format, a record that fails the domain validation, or a duplicate id.
    """
    start = document_start(stream)
    parser = parser_for(stream)

    def read(exact: bool) -> Iterator[tuple[bool, str, Any]]:
        """(False, key, value) for each top-level field, then (True, key, record)."""
        stream.seek(start)
        reader = pass_parser(parser, exact)
        events = iter(reader.basic_parse(stream, use_float=not exact, buf_size=READ_SIZE))
        present = []
        for key, value in top_level(events, _RECORD_KEYS):
            yield False, key, exact_floats(value) if exact else value
            if key in _RECORD_KEYS:
                present.append(key)
        for key in present:
            for value in record_items(reader, stream, key, start, exact, checked=True):
                yield True, key, value

    seen = _SeenIds()
    try:
        validation = _Validation(seen)
        with json_errors():
            for is_record, key, value in read_exactly_if_need_be(read):
                if is_record:
                    validation.record(key, value)
                else:
                    validation.item(key, value)
        return validation.summary()
    finally:
        seen.close()


def iter_records(stream: IO[bytes]) -> Iterator[ChatSession | UploadedFileRecord]:
    """Yields the sessions, then the file records, of a document already validated.

    Raises:
        InvalidDataError: if the file changed since it was validated.
    """
    start = document_start(stream)
    parser = parser_for(stream)

    def read(exact: bool) -> Iterator[tuple[str, Any]]:
        reader = pass_parser(parser, exact)
        for key in _RECORD_KEYS:
            for value in record_items(reader, stream, key, start, exact):
                yield key, value

    counts = dict.fromkeys(_RECORD_KEYS, 0)
    with json_errors():
        for key, value in read_exactly_if_need_be(read):
            index = counts[key]
            counts[key] += 1
            if key == "sessions":
                yield session_from_document(value, index)
            else:
                yield file_record_from_document(value, index)
