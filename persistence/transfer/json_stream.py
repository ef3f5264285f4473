"""Reading one large JSON document as a stream, with ijson.

Reading uses ijson's C parser (yajl2_c): it yields one record at a time from a binary
stream, so a file larger than memory is validated and read without ever being held
whole. A file holding an escaped lone surrogate is read by the pure-Python parser
instead (`parser_for`).

Numbers are read as floats by the parser itself, the fast way, which refuses an
integer beyond 2**63 - 1 in magnitude (-2**63 included). A read that fails starts
again reading numbers as text (ints exact, the rest Decimal, turned into the same
float: `read_exactly_if_need_be`): a file holding such an integer is read exactly, a
corrupt one fails again. That second pass reads with the pure-Python parser
(`pass_parser`): found by attack, yajl's C code, asked for an integer past Python's
4,300-digit limit, raised a SystemError at 5,000 digits and crashed the process at
1,000,000.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Collection, Iterable, Iterator
from contextlib import contextmanager
from decimal import Decimal
from itertools import chain, islice
from typing import IO, Any, TypeVar

import ijson

from persistence.errors import InvalidDataError
from persistence.validation import MAX_METADATA_DEPTH, shown

SCALAR_EVENTS = frozenset({"null", "boolean", "integer", "double", "number", "string"})
# A JSON escape of a UTF-16 surrogate; a false positive only costs the slower parser.
SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
SCAN_CHUNK = 1 << 20
# How much the parsers read at a time. yajl lexes a string cut by a read again from its
# start with each read, so one string costs (its size / this) squared: found by attack,
# with ijson's 64 KiB a 32 MB message took 13 s to import and a 300 MB one over 10
# minutes; with 1 MiB, parsing a 32 / 128 MB string takes 0.19 / 2.4 s. Items are built
# a read ahead: this bounds what that holds.
READ_SIZE = 1 << 20
DEPTH_CHANGE = {"start_map": 1, "start_array": 1, "end_map": -1, "end_array": -1}
# How deep a record of an export may nest inside its array: a message's metadata sits
# four levels down (the session, its messages, the message, the metadata), and keeps
# at most MAX_METADATA_DEPTH levels. Found by attack: the C parser, building a record
# nested 32,000 levels deep (a 64 KB file), took 2.5 GB; 200,000 levels exhausted the
# machine's memory.
MAX_RECORD_DEPTH = MAX_METADATA_DEPTH + 8
# The parser's messages quote the input: a 5,000-digit number was one error line.
_SHOWN_ERROR = 200
PYTHON_PARSER = ijson.get_backend("python")

_Item = TypeVar("_Item")


# The pure-Python parser's words for a number it cannot convert: past Python's 4,300
# digits for an int, or past Decimal's exponents (`1e99999999999999999999`).
_UNCONVERTED = re.compile(r"Unexpected symbol '(-?[0-9][0-9.eE+-]*)' at (\d+)")
_JSON_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")


def parse_error(exc: Exception) -> InvalidDataError:
    unconverted = _UNCONVERTED.fullmatch(str(exc).strip())
    if unconverted and _JSON_NUMBER.fullmatch(symbol := unconverted.group(1)):
        # Valid JSON (found by attack: it was called a corrupt file).
        # The parser counts characters, not bytes (found by attack on "byte").
        return InvalidDataError(
            f"the number at character {unconverted.group(2)} ({shown(symbol)},"
            f" {len(symbol):,} characters) is out of the range any store keeps"
        )
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if len(first_line) > _SHOWN_ERROR:
        first_line = first_line[:_SHOWN_ERROR] + "..."
    return InvalidDataError(f"not valid JSON (truncated or corrupt file): {first_line}")


def pass_parser(parser: Any, exact: bool) -> Any:
    """The parser of a pass: `parser` for the fast one, the pure-Python one for the
    exact one (see the module's docstring)."""
    return PYTHON_PARSER if exact else parser


class _KeysOnce(dict[str, Any]):
    """A JSON object of the header: a key given twice makes the file ambiguous (found
    by attack: the last of two values in `counts` was taken)."""

    def __setitem__(self, key: str, value: Any) -> None:
        if key in self:
            raise InvalidDataError(f"the key {shown(key)} appears twice in one object")
        super().__setitem__(key, value)


def build_value(events: Iterator[tuple[str, Any]], event: str, value: Any, key: str) -> Any:
    """Builds the JSON value of the top-level `key` that starts with (`event`, `value`)
    from the event stream.

    Raises:
        InvalidDataError: if it nests deeper than a record may (found by attack: 20,000
            levels, a 39 KB file, took 1 GB in the record passes that read it after),
            or an object of it holds a key twice.
    """
    if event in SCALAR_EVENTS:
        return value
    builder = ijson.ObjectBuilder(map_type=_KeysOnce)
    builder.event(event, value)
    depth = 1
    while depth:
        event, value = next(events)
        builder.event(event, value)
        depth += DEPTH_CHANGE.get(event, 0)
        if depth > MAX_RECORD_DEPTH:
            raise InvalidDataError(f"{shown(key)}: nests deeper than {MAX_RECORD_DEPTH} levels")
    return builder.value


UTF8_BOM = b"\xef\xbb\xbf"


def document_start(stream: IO[bytes]) -> int:
    """Where the JSON document begins in `stream`, which is left there: past a UTF-8
    byte order mark, which an editor may put first and JSON readers may ignore
    (RFC 8259, 8.1). The parser would take it for corruption."""
    start = stream.tell()
    if stream.read(len(UTF8_BOM)) == UTF8_BOM:
        return stream.tell()
    stream.seek(start)
    return start


_WHITESPACE = b" \t\r\n"
_VALUE_STARTS = frozenset(bytes([c]) for c in b'["-0123456789tfn')


def check_head(head: bytes) -> None:
    """Refuses a document whose first bytes (after a byte order mark) are not a JSON
    object's opening: found by attack, an endless input (/dev/zero) was otherwise read
    to its end, which never comes, before anything was said. So is one whose first
    SCAN_CHUNK bytes are all whitespace (found by attack: `yes '' | ... import -`
    spooled 3.6 GB in 8 s); no export begins so.

    Raises:
        InvalidDataError: if `head` holds something other than whitespace before "{",
            or is SCAN_CHUNK bytes of whitespace.
    """
    if head.startswith(UTF8_BOM):
        head = head[len(UTF8_BOM) :]
    first = head.lstrip(_WHITESPACE)[:1]
    if not first and len(head) >= SCAN_CHUNK - len(UTF8_BOM):
        raise InvalidDataError(
            f"not an export file: its first {len(head):,} bytes are blank, not a JSON object"
        )
    if not first or first == b"{":
        return
    if first in _VALUE_STARTS:
        raise InvalidDataError("not an export file: the document is not a JSON object")
    raise InvalidDataError(
        f"not valid JSON (corrupt file): it begins with {first!r}, not with a JSON object"
    )


def parser_for(stream: IO[bytes]) -> Any:
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
    while chunk := stream.read(SCAN_CHUNK):
        if empty:
            check_head(chunk)
        empty = False
        if SURROGATE_ESCAPE.search(tail + chunk):
            found = True
            break
        tail = chunk[-8:]
    stream.seek(start)
    if empty:
        raise InvalidDataError("the file is empty")
    return ijson.get_backend("python") if found else ijson


def top_level(
    events: Iterator[tuple[str, Any]], record_keys: Collection[str]
) -> Iterator[tuple[str, Any]]:
    """Yields ("key", value) for top-level fields and (key, None) where a record array is.

    The records (the arrays under `record_keys`) are skipped here, never built:
    `record_items` builds them in ijson's C code, several times faster than building
    them from events.
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
        if key in record_keys:
            if event != "start_array":
                raise InvalidDataError(f"{key}: not a JSON array")
            if key in arrays:
                raise InvalidDataError(f"{key!r} appears twice")
            arrays.add(key)
            yield key, None
            depth = 1
            for event, _ in events:
                depth += DEPTH_CHANGE.get(event, 0)
                if depth == 0:
                    break
                if depth > MAX_RECORD_DEPTH:
                    raise InvalidDataError(
                        f"{key}: a record nests deeper than {MAX_RECORD_DEPTH - 1} levels"
                        f" (metadata keeps at most {MAX_METADATA_DEPTH})"
                    )
        else:
            yield key, build_value(events, event, value, key)
    for _ in events:
        raise InvalidDataError("content after the end of the document")


def record_items(
    parser: Any, stream: IO[bytes], key: str, start: int, exact: bool, *, checked: bool = False
) -> Iterator[Any]:
    """The items of the top-level array `key`, each built whole by the parser.

    Raises:
        InvalidDataError: with `checked`, if an object of an item holds a key twice
            (the parser would keep the last value, and the file is ambiguous).
    """
    stream.seek(start)
    repeated: list[tuple[str, dict[str, Any]]] = []
    mapping = _once(repeated) if checked else dict
    items = parser.items(
        stream, f"{key}.item", use_float=not exact, map_type=mapping, buf_size=READ_SIZE
    )
    for index, item in enumerate(map(exact_floats, items) if exact else items):
        if repeated:
            # The parsers build items a buffer ahead of this loop (found by attack: a key
            # twice in sessions[1500] was reported at sessions[1480]): the item holding
            # the object is this one or a later one.
            name, holder = repeated[0]
            later = enumerate(chain([item], items), start=index)
            at = next((i for i, candidate in later if _holds(candidate, holder)), index)
            raise InvalidDataError(f"{key}[{at}]: the key {name!r} appears twice in one object")
        yield item


def _holds(value: Any, target: dict[str, Any]) -> bool:
    """Whether `target` (by identity) is `value` or nested in it."""
    pending = [value]
    while pending:
        current = pending.pop()
        if current is target:
            return True
        if isinstance(current, dict):
            pending.extend(current.values())
        elif isinstance(current, list):
            pending.extend(current)
    return False


def _once(repeated: list[tuple[str, dict[str, Any]]]) -> type[dict[str, Any]]:
    """A dict type for the parser's objects that notes, in `repeated`, each key set twice
    (with the object).

    Noted, not raised: an exception raised inside the C parser's callback reaches the
    caller as a SystemError. It costs a Python call a key (about 0.15 s per 50,000
    messages with metadata), so only the validating pass uses it.
    """

    class Once(dict[str, Any]):
        __slots__ = ()

        def __setitem__(self, key: str, value: Any) -> None:
            if key in self:
                repeated.append((key, self))
            dict.__setitem__(self, key, value)

    return Once


def exact_floats(value: Any) -> Any:
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
                if isinstance(container, dict):
                    # The base class's: a parser's dict notes a key set twice (_once).
                    dict.__setitem__(container, key, float(item))
                else:
                    container[key] = float(item)
            elif isinstance(item, dict | list):
                pending.append(item)
    return value


def read_exactly_if_need_be(read: Callable[[bool], Iterator[_Item]]) -> Iterator[_Item]:
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
def json_errors() -> Iterator[None]:
    """Turns the parser's errors into InvalidDataError.

    Raises:
        InvalidDataError: if the stream is not one complete JSON document.
    """
    try:
        yield
    except ijson.JSONError as exc:
        raise parse_error(exc) from exc
    except json.JSONDecodeError as exc:
        # The pure-Python parser's, from json's own string scanner (found by attack: a
        # raw TAB in a string came out bare); its position counts from the string.
        what = exc.msg.removesuffix(" at").lower()
        # The hint only where it helps (found by attack: it came with a bad \escape).
        hint = " (control characters must be escaped, as \\t or \\u0009)"
        raise InvalidDataError(
            f"not valid JSON (corrupt file): {what} in a string"
            f"{hint if 'control character' in what else ''}"
        ) from exc
    except UnicodeDecodeError as exc:
        # Found by attack: bytes yajl passes through (an encoded surrogate, an overlong
        # form) failed their decoding with a bare UnicodeDecodeError.
        bad = exc.object[exc.start : exc.end]
        raise InvalidDataError(
            f"not valid JSON (corrupt file): a string is not UTF-8 ({exc.reason}: {bad!r})"
        ) from exc
    except StopIteration as exc:
        raise InvalidDataError("not valid JSON (truncated file)") from exc
