"""The export file: one JSON document, written and read as a stream.

```
{"format": "persistence-export", "version": 1, "exported_at": "...", "backend": "sqlite",
 "sessions": [{...session fields..., "messages": [{...}, ...]}, ...],
 "file_records": [{...}, ...],
 "counts": {"sessions": 2, "messages": 7, "files": 1}}
```

`format` and `version` come first, so a reader refuses a foreign or newer file before
it looks at a single record; `counts` comes last, because a live store is exported as
it is read and only the writer's own tally is exact. Reading uses ijson's C parser
(yajl2_c): it yields one record at a time from a binary stream, so a file larger than
memory is validated and imported without ever being held whole.

Numbers are read as floats by the parser itself, the fast way, which refuses an
integer beyond 2**63 - 1 in magnitude (-2**63 included). A read that fails starts
again reading numbers as text (ints exact, the rest Decimal, turned into the same
float): a file holding such an integer is read exactly, a corrupt one fails again.
"""

from __future__ import annotations

import json
import re
import sqlite3
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from itertools import islice
from pathlib import Path
from typing import IO, Any, TypeVar

import ijson
from pydantic import ValidationError

from persistence.errors import InvalidDataError
from persistence.models import ChatMessage, ChatSession, UploadedFileRecord

FORMAT_NAME = "persistence-export"
FORMAT_VERSION = 1
_HEADER_KEYS = ("format", "version", "exported_at", "backend")
_RECORD_KEYS = ("sessions", "file_records")
_KNOWN_KEYS = frozenset({*_HEADER_KEYS, *_RECORD_KEYS, "counts"})
_SCALAR_EVENTS = frozenset({"null", "boolean", "integer", "double", "number", "string"})
# A JSON escape of a UTF-16 surrogate; a false positive only costs the slower parser.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_SCAN_CHUNK = 1 << 20
_OPENING = {"start_map": 1, "start_array": 1, "end_map": -1, "end_array": -1}

_Item = TypeVar("_Item")


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

    def __init__(self, stream: IO[str], *, backend: str, exported_at: datetime) -> None:
        self._stream = stream
        self.counts = DocumentCounts()
        header = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "exported_at": _timestamp(exported_at),
            "backend": backend,
        }
        stream.write(json.dumps(header, ensure_ascii=False)[:-1] + ',\n"sessions": [')
        self._first = True

    def _record(self, document: dict[str, Any]) -> None:
        self._stream.write("\n" if self._first else ",\n")
        self._stream.write(json.dumps(document, ensure_ascii=False, allow_nan=False))
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


def _parse_error(exc: Exception) -> InvalidDataError:
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return InvalidDataError(f"not valid JSON (truncated or corrupt file): {first_line}")


def _build(events: Iterator[tuple[str, Any]], event: str, value: Any) -> Any:
    """Builds the JSON value that starts with (`event`, `value`) from the event stream."""
    if event in _SCALAR_EVENTS:
        return value
    builder = ijson.ObjectBuilder()
    builder.event(event, value)
    depth = 1
    while depth:
        event, value = next(events)
        builder.event(event, value)
        depth += _OPENING.get(event, 0)
    return builder.value


def _parser_for(stream: IO[bytes]) -> Any:
    """Picks the ijson backend for this file, then rewinds it.

    yajl (the fast C backend) turns an escaped lone surrogate such as \\ud800 into
    "?", which would alter data silently. Only a file holding surrogate escapes is
    read with the pure-Python backend, which keeps them so validation refuses them;
    our own exports never contain any (they are written as UTF-8, not escaped).

    Raises:
        InvalidDataError: if the file is empty.
    """
    start = stream.tell()
    tail = b""
    found, empty = False, True
    while chunk := stream.read(_SCAN_CHUNK):
        empty = False
        if _SURROGATE_ESCAPE.search(tail + chunk):
            found = True
            break
        tail = chunk[-8:]
    stream.seek(start)
    if empty:
        raise InvalidDataError("the file is empty")
    return ijson.get_backend("python") if found else ijson


def _structure(events: Iterator[tuple[str, Any]]) -> Iterator[tuple[str, Any]]:
    """Yields ("key", value) for top-level fields and (key, None) where a record array is.

    The records themselves are skipped here, never built: `_records` builds them
    in ijson's C code, which is several times faster than building them from events.
    """
    first = next(events, None)
    if first is None:
        raise InvalidDataError("not valid JSON (truncated file)")
    if first[0] != "start_map":
        raise InvalidDataError("not an export file: the document is not a JSON object")
    arrays: set[str] = set()
    for event, value in events:
        if event == "end_map":
            break
        key = value
        event, value = next(events)
        if key in _RECORD_KEYS:
            if event != "start_array":
                raise InvalidDataError(f"{key}: not a JSON array")
            if key in arrays:
                raise InvalidDataError(f"{key!r} appears twice")
            arrays.add(key)
            yield key, None
            depth = 1
            for event, _ in events:
                depth += _OPENING.get(event, 0)
                if depth == 0:
                    break
        else:
            yield key, _build(events, event, value)
    for _ in events:
        raise InvalidDataError("content after the end of the document")


def _records(parser: Any, stream: IO[bytes], key: str, start: int, exact: bool) -> Iterator[Any]:
    """The items of the top-level array `key`, each built whole by the parser."""
    stream.seek(start)
    if not exact:
        return iter(parser.items(stream, f"{key}.item", use_float=True))
    return map(_floats, parser.items(stream, f"{key}.item", use_float=False))


def _floats(value: Any) -> Any:
    """`value` with each Decimal in it replaced, in place, by the float it denotes."""
    if isinstance(value, Decimal):
        return float(value)
    pending = [value]
    while pending:
        container = pending.pop()
        if isinstance(container, dict):
            entries: Iterable[tuple[Any, Any]] = container.items()
        elif isinstance(container, list):
            entries = enumerate(container)
        else:
            continue
        for key, item in entries:
            if isinstance(item, Decimal):
                container[key] = float(item)
            elif isinstance(item, dict | list):
                pending.append(item)
    return value


def _read_exactly_if_need_be(read: Callable[[bool], Iterator[_Item]]) -> Iterator[_Item]:
    """Yields what `read(False)` yields; if it fails, what `read(True)` yields after
    the items already yielded (both read the same file, so hold the same items).

    Raises:
        ijson.JSONError: if `read(True)` fails too: the file is not valid JSON.
    """
    done = 0
    try:
        for item in read(False):
            yield item
            done += 1
        return
    except ijson.JSONError:
        pass
    yield from islice(read(True), done, None)


@contextmanager
def _json_errors() -> Iterator[None]:
    """Turns the parser's errors into InvalidDataError.

    Raises:
        InvalidDataError: if the stream is not one complete JSON document.
    """
    try:
        yield
    except ijson.JSONError as exc:
        raise _parse_error(exc) from exc
    except StopIteration as exc:
        raise InvalidDataError("not valid JSON (truncated file)") from exc


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
    try:
        return UploadedFileRecord.model_validate(value)
    except ValidationError as exc:
        raise InvalidDataError(f"{label}: {_describe(exc)}") from None


class _SeenIds:
    """Ids met so far, in a scratch SQLite file: memory stays flat however big the file."""

    def __init__(self, directory: Path) -> None:
        self._db = sqlite3.connect(directory / "ids.db", isolation_level=None)
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
        raise InvalidDataError(f"not an export file: format is {name!r}, not {FORMAT_NAME!r}")
    version = header.get("version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise InvalidDataError(f"version: {version!r} is not a format version")
    if version > FORMAT_VERSION:
        raise InvalidDataError(
            f"version: the file has format version {version}, written by a newer"
            f" persistence; this one reads version {FORMAT_VERSION}"
        )
    if version != FORMAT_VERSION:
        raise InvalidDataError(f"version: unknown format version {version}")


def _exported_at(value: Any) -> datetime:
    try:
        parsed = datetime.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        parsed = None
    if parsed is None or parsed.tzinfo is None:
        raise InvalidDataError(f"exported_at: {value!r} is not a timezone-aware ISO timestamp")
    return parsed


class _Validation:
    def __init__(self, seen: _SeenIds) -> None:
        self.seen = seen
        self.header: dict[str, Any] = {}
        self.counts = DocumentCounts()
        self.declared: Any = None

    def _unique(self, kind: str, identifier: str, where: str) -> None:
        if not self.seen.add(kind, identifier):
            raise InvalidDataError(f"{where}: duplicate {kind} {identifier!r} in the file")

    def item(self, key: str, value: Any) -> None:
        if key == "session_id":
            raise InvalidDataError(
                "this is a single-session export (top-level 'session_id', from `persistence"
                " export ID`); import takes a file written by `persistence export-all`"
            )
        if key not in _KNOWN_KEYS:
            raise InvalidDataError(f"unexpected top-level key {key!r}")
        if key in _RECORD_KEYS:
            if "version" not in self.header or "format" not in self.header:
                raise InvalidDataError("format and version must come before the records")
        elif key == "counts":
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
                f"counts: the file declares {self.declared!r} but holds"
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
    start = stream.tell()
    parser = _parser_for(stream)

    def read(exact: bool) -> Iterator[tuple[bool, str, Any]]:
        """(False, key, value) for each top-level field, then (True, key, record)."""
        stream.seek(start)
        events = iter(parser.basic_parse(stream, use_float=not exact))
        present = []
        for key, value in _structure(events):
            yield False, key, _floats(value) if exact else value
            if key in _RECORD_KEYS:
                present.append(key)
        for key in present:
            for value in _records(parser, stream, key, start, exact):
                yield True, key, value

    with tempfile.TemporaryDirectory(prefix="persistence-import-") as scratch:
        seen = _SeenIds(Path(scratch))
        try:
            validation = _Validation(seen)
            with _json_errors():
                for is_record, key, value in _read_exactly_if_need_be(read):
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
    start = stream.tell()
    parser = _parser_for(stream)

    def read(exact: bool) -> Iterator[tuple[str, Any]]:
        for key in _RECORD_KEYS:
            for value in _records(parser, stream, key, start, exact):
                yield key, value

    counts = dict.fromkeys(_RECORD_KEYS, 0)
    with _json_errors():
        for key, value in _read_exactly_if_need_be(read):
            index = counts[key]
            counts[key] += 1
            if key == "sessions":
                yield session_from_document(value, index)
            else:
                yield file_record_from_document(value, index)
