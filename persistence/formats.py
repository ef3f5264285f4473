"""Renders a session as a JSON document, a markdown transcript or a plain-text transcript,
and writes an export to a file atomically.

Transcripts write each message's content as given, except for the few lines that
would otherwise change the transcript's structure (start a new section or swallow
the sections after it); those are escaped, so every message stays in its section.
Transcripts are for reading, on a terminal or in a file: control characters that a
terminal would act on (ESC sequences for colours or the window title, BEL, other C0
and C1 controls) are written visibly, as `\x1b`. The JSON document keeps
every character exactly.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, get_args

from persistence.errors import InvalidDataError
from persistence.models import ChatMessage, ChatSession, Role
from persistence.store_files import refuse_database_file

ExportFormat = Literal["json", "text", "markdown"]
EXPORT_FORMATS: tuple[str, ...] = get_args(ExportFormat)

_ROLE_TITLES: dict[Role, str] = {
    "user": "👤 User",
    "assistant": "🤖 Assistant",
    "system": "⚙️ System",
    "tool": "🔧 Tool",
}
TEXT_RULE = "=" * 80

# Markdown lines that would open a heading (ATX or setext) or an HTML block that runs
# past the end of the message: escaped with a backslash, which renders nothing.
_MD_HEADING = re.compile(r"^( {0,3}(?:>[ \t]?|[-*+][ \t]+|\d{1,9}[.)][ \t]+)*)(#{1,6}(?:[ \t]|$))")
_MD_SETEXT = re.compile(r"^( {0,3})([=-]+[ \t]*)$")
_MD_HTML_BLOCK = re.compile(
    r"^( {0,3})(<(?:script|pre|style|textarea)(?:[\s>]|$)|<!--|<\?|<![A-Za-z]|<!\[CDATA\[)",
    re.IGNORECASE,
)
_MD_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})(.*)$")
# A plain-text line that looks like a message header: indented so that it cannot be one.
_TEXT_HEADER = re.compile(r"^\[(?:\d{4}-\d{2}-\d{2} )?\d{2}:\d{2}:\d{2}\] ")
_LINE_BREAK = re.compile(r"(\r\n|\n|\r)")
# The explicit bidirectional formatting characters (embeddings, overrides, isolates):
# they reorder what a terminal shows (found by attack: an id `user-\u202etxt.exe`
# showed as `user-exe.txt`). The marks (LRM, RLM, ALM) reorder nothing past their
# neighbours, and right-to-left text holds them: they stay.
_BIDI = "\u202a-\u202e\u2066-\u2069"
# What a terminal acts on rather than prints; tabs and line breaks (LF, CR, CRLF) stay.
# And lone surrogates (a file name's undecodable bytes: found by attack, a summary
# naming one failed the command after its work, where stdout encodes strictly).
_CONTROL = re.compile(f"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f{_BIDI}\ud800-\udfff]")
# What json.dumps(ensure_ascii=False) leaves raw that a terminal acts on: DEL, the C1
# controls (found by attack: U+009B, the 8-bit CSI), the bidirectional controls, and
# the line and paragraph separators (JSON allows them raw, JavaScript did not).
_RAW_IN_JSON = re.compile(f"[\x7f-\x9f{_BIDI}\u2028\u2029]")


def _escaped(match: re.Match[str]) -> str:
    code = ord(match.group())
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def visible(text: str) -> str:
    """Returns `text` with terminal control characters written as `\\x1b`-style escapes
    (`\\u202e` beyond U+00FF).

    ESC (colours, `ESC]0;title BEL`), BEL, backspace, the other C0 and C1 controls,
    DEL, and the bidirectional controls; tabs and line breaks (LF, CR, CRLF) are kept.
    """
    return _CONTROL.sub(_escaped, text)


def json_text(value: Any, *, indent: int | None = 2) -> str:
    """`value` as JSON that shows every character a terminal would act on as a `\\u`
    escape: the same document to a JSON reader, nothing for a terminal to obey."""
    return escape_raw_json(json.dumps(value, ensure_ascii=False, indent=indent, default=str))


def escape_raw_json(text: str) -> str:
    """JSON `text` (from json.dumps(ensure_ascii=False)) with every character a terminal
    would act on written as a `\\u` escape: the same document to a JSON reader."""
    if text.isascii():
        return text.replace("\x7f", "\\u007f")
    return _RAW_IN_JSON.sub(lambda match: f"\\u{ord(match.group()):04x}", text)


def _split_lines(content: str) -> tuple[list[str], list[str]]:
    """Splits on line breaks, keeping each break so that the content is rebuilt as given."""
    pieces = _LINE_BREAK.split(content)
    return pieces[0::2], pieces[1::2]


def _join_lines(lines: list[str], breaks: list[str]) -> str:
    out = [lines[0]]
    for line, brk in zip(lines[1:], breaks, strict=False):
        out += [brk, line]
    out += ["\n" + line for line in lines[len(breaks) + 1 :]]
    return "".join(out)


def _iso(value: datetime) -> str:
    return value.isoformat(timespec="milliseconds")


def message_document(message: ChatMessage) -> dict[str, Any]:
    """Returns a message as a JSON-ready dict (datetimes ISO 8601 with offset)."""
    return {
        "message_id": message.message_id,
        "session_id": message.session_id,
        "role": message.role,
        "content": message.content,
        "created_at": _iso(message.created_at),
        "metadata": message.metadata,
    }


def session_document(session: ChatSession) -> dict[str, Any]:
    """Returns a session and its messages in order as a JSON-ready dict.

    `ChatSession.model_validate(session_document(session))` gives the session back.
    """
    return {
        "session_id": session.session_id,
        "model": session.model,
        "status": session.status,
        "created_at": _iso(session.created_at),
        "updated_at": _iso(session.updated_at),
        "message_count": session.message_count,
        "metadata": session.metadata,
        "messages": [message_document(message) for message in session.messages],
    }


def render_json(session: ChatSession) -> str:
    """Renders the session as an indented JSON document."""
    return json_text(session_document(session)) + "\n"


_ONE_LINE = str.maketrans(
    {"\r": "\\r", "\n": "\\n", "\t": "\\t", "\u2028": "\\u2028", "\u2029": "\\u2029"}
)
# What shows as nothing, or as a plain space, in an id or a model name, so that two
# names would show alike (found by attack: `victim`, `vic\u200btim` and `vict\u2060im`
# listed as three rows reading `victim`): Unicode's format characters (category Cf:
# zero-width spaces and joiners, the marks, the tags), the other default-ignorable
# code points (variation selectors, Hangul fillers) and the spaces other than U+0020.
# In message content they stay: emoji sequences and Persian words hold joiners.
_INVISIBLE = re.compile(
    "[\u00a0\u00ad\u034f\u061c\u115f\u1160\u1680\u17b4\u17b5\u180b-\u180f"
    "\u0600-\u0605\u06dd\u070f\u0890\u0891\u08e2"
    "\u2000-\u200f\u202f\u205f-\u206f\u3000\u3164\ufe00-\ufe0f\ufeff\uffa0"
    "\ufff0-\ufffb\U000110bd\U000110cd\U00013430-\U0001343f\U0001bca0-\U0001bca3"
    "\U0001d173-\U0001d17a\U000e0000-\U000e0fff]"
)


def one_line(value: str) -> str:
    """`value` as visible() writes it, its line breaks too (`\\n`, `\\r`, `\\u2028`,
    `\\u2029`): a header value or a listing's field (an id, a model name) must not start
    a line of its own. Found by attack: an id holding U+2028 made a forged row for
    readers that split lines as str.splitlines() does (the other breaks it knows,
    U+0085 and U+001C-U+001E, are controls that visible() escapes). A tab (`\\t`), and
    what would show as nothing or as a space, are escaped too (`\\u200b`), so that two
    names cannot show alike by it (found by attack: `a<TAB>b` showed as `a` and spaces
    and `b`)."""
    return without_invisible(visible(value.translate(_ONE_LINE)))


def shown_role(role: str) -> str:
    """A message's role as a transcript's header writes it: upper case, one line. A role
    is one of four words in every store; found by attack, one set by hand past the
    CHECK constraint (`us\rer`, `x\x1b[31m`) was written raw to the terminal."""
    return one_line(role.upper())


def without_invisible(text: str) -> str:
    """`text` with what shows as nothing or as a space (but U+0020) written as escapes
    (`\\u200b`): two names cannot show alike by it."""
    return _INVISIBLE.sub(_escaped, text)


def wall_time(value: datetime, timespec: str = "seconds") -> str:
    """YYYY-MM-DD HH:MM:SS (or to `timespec`) of the value, without its offset.

    isoformat pads the year to four digits; strftime does not on glibc (year 999).
    """
    return value.replace(tzinfo=None).isoformat(" ", timespec)


def _clock(value: datetime, day: datetime) -> str:
    """HH:MM:SS, with the date in front when the message is not from the session's day."""
    if value.date() == day.date():
        return value.time().isoformat("seconds")
    return wall_time(value)


def _markdown_body(content: str) -> str:
    lines, breaks = _split_lines(visible(content))
    out: list[str] = []
    fence: tuple[str, int] | None = None
    for line in lines:
        match = _MD_FENCE.match(line)
        if fence is not None:
            out.append(line)
            if (
                match
                and match.group(1)[0] == fence[0]
                and len(match.group(1)) >= fence[1]
                and not match.group(2).strip()
            ):
                fence = None
            continue
        if match and not (match.group(1)[0] == "`" and "`" in match.group(2)):
            fence = (match.group(1)[0], len(match.group(1)))
            out.append(line)
            continue
        for pattern in (_MD_HEADING, _MD_SETEXT, _MD_HTML_BLOCK):
            escaped = pattern.match(line)
            if escaped:
                line = f"{escaped.group(1)}\\{line[len(escaped.group(1)) :]}"
                break
        out.append(line)
    if fence is not None:
        # An unclosed code fence would swallow every later section.
        out.append(fence[0] * fence[1])
    return _join_lines(out, breaks)


def render_markdown(session: ChatSession) -> str:
    """Renders the session as a markdown transcript, times in UTC."""
    parts = [
        f"# Chat Session: {one_line(session.session_id)}",
        "",
        f"**Model:** {one_line(session.model)}",
        f"**Created:** {wall_time(session.created_at)}",
        f"**Messages:** {len(session.messages)}",
        "",
        "---",
    ]
    for message in session.messages:
        title = _ROLE_TITLES.get(message.role) or shown_role(message.role)
        parts += [
            "",
            f"### {title} ({_clock(message.created_at, session.created_at)})",
            "",
            _markdown_body(message.content),
        ]
    return "\n".join(parts) + "\n"


def text_body(content: str) -> str:
    """A message's content for a plain-text transcript: as visible() writes it, and
    a line that looks like a message header (`[10:00:02] ASSISTANT:`) indented."""
    lines, breaks = _split_lines(visible(content))
    escaped = [f"  {line}" if _TEXT_HEADER.match(line) else line for line in lines]
    return _join_lines(escaped, breaks)


def render_text(session: ChatSession) -> str:
    """Renders the session as a plain-text transcript, times in UTC."""
    parts = [
        f"Chat Session: {one_line(session.session_id)}",
        f"Model: {one_line(session.model)}",
        f"Created: {wall_time(session.created_at)}",
        f"Messages: {len(session.messages)}",
        "",
        TEXT_RULE,
    ]
    for message in session.messages:
        clock = _clock(message.created_at, session.created_at)
        parts += ["", f"[{clock}] {shown_role(message.role)}:", text_body(message.content)]
    return "\n".join(parts) + "\n"


def check_format(format: str) -> None:
    """Raises InvalidDataError unless `format` is one of EXPORT_FORMATS."""
    if format not in EXPORT_FORMATS:
        raise InvalidDataError(f"format: {format!r} is not one of {', '.join(EXPORT_FORMATS)}")


def render(session: ChatSession, format: str = "json") -> str:
    """Renders the session in one of EXPORT_FORMATS.

    Raises:
        InvalidDataError: for an unknown format.
    """
    check_format(format)
    if format == "markdown":
        return render_markdown(session)
    if format == "text":
        return render_text(session)
    return render_json(session)


def write_atomically(path: Path, text: str) -> None:
    """Writes `text` to `path` through a temp file in the same directory and a rename.

    Raises:
        OSError: if the directory cannot be written.
    """
    try:
        fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, str(path)) from exc
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        # Checked again at the end: a database made there meanwhile is not replaced.
        refuse_database_file(path)
        os.replace(temp, path)
    except OSError as exc:
        Path(temp).unlink(missing_ok=True)
        # Named after the caller's path, not the temp file it never asked for.
        raise OSError(exc.errno, exc.strerror, str(path)) from exc
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
