"""Database URLs as operators type them: where the user info ends, passwords masked.

The user info of `scheme://user:password@host/db?query` is everything between `://`
and the LAST `@`, so a password typed with a raw `@`, `/`, `?` or `#` (which drivers
misread) is still masked whole; a mask hides a little too much rather than too little.
Query parameters whose name holds "password" (`?password=`, `sslpassword=`,
`tlsCertificateKeyFilePassword=`) are masked too. SQLite URLs carry no secret.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MASK = "***"
# A URL scheme (RFC 3986): what comes before `://`.
SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*")
# Where a URL starts in free text; the URL itself is split below, not by a pattern.
_URL_START = re.compile(SCHEME.pattern + "://")
# Characters that end a URL in free text (messages quote URLs or end them with a space).
_URL_END = frozenset(" \t\r\n'\"`<>")
# Characters that end or split a URL's parts: they must be percent-encoded in user info.
RESERVED_IN_USERINFO = {"@": "%40", "/": "%2F", "?": "%3F", "#": "%23"}
_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")


@dataclass(frozen=True)
class UrlParts:
    """A URL cut where the password rules need it (text kept exactly as written)."""

    scheme: str
    userinfo: str | None  # between `://` and the last `@`; None without an `@`
    rest: str  # host(s), path, query

    @property
    def user(self) -> str | None:
        return None if self.userinfo is None else self.userinfo.partition(":")[0]

    @property
    def password(self) -> str | None:
        if self.userinfo is None or ":" not in self.userinfo:
            return None
        return self.userinfo.partition(":")[2]


def split_url(url: str) -> UrlParts | None:
    """Cuts `url` into scheme, user info and the rest; None if it is not `scheme://...`."""
    head, separator, tail = url.partition("://")
    if not separator or not SCHEME.fullmatch(head):
        return None
    userinfo, at, rest = tail.rpartition("@")
    if not at:
        return UrlParts(head, None, tail)
    return UrlParts(head, userinfo, rest)


def userinfo_problem(url: str) -> str | None:
    """Why the user name or password of `url` is not safely percent-encoded, or None.

    Never repeats the password: names the character and how to write it.
    """
    parts = split_url(url)
    if parts is None or parts.userinfo is None or parts.scheme.lower().startswith("sqlite"):
        return None
    for character, encoded in RESERVED_IN_USERINFO.items():
        if character in parts.userinfo:
            return (
                f"the user name or password holds a raw {character!r}: percent-encode it"
                f" as {encoded} (@ %40, / %2F, ? %3F, # %23, % %25; in Python"
                " urllib.parse.quote(password, safe=''))"
            )
    if _PERCENT.search(parts.userinfo):
        return (
            "the user name or password holds a '%' that does not start a percent-encoding:"
            " write it as %25"
        )
    return None


def _mask_query(rest: str) -> str:
    path, question, query = rest.partition("?")
    if not question:
        return rest
    masked: list[str] = []
    hiding = False
    for pair in query.split("&"):
        key, equals, _ = pair.partition("=")
        if equals:
            hiding = "password" in key.lower() or key.lower() in ("pass", "pwd")
            masked.append(f"{key}={MASK}" if hiding else pair)
        elif not hiding:
            masked.append(pair)
        # A piece without `=` right after a password is the rest of a raw `&` in it.
    return f"{path}?{'&'.join(masked)}"


def mask_url(url: str, *, hide_user: bool = False) -> str:
    """Returns the URL with its password (and `password=` parameters) replaced by `***`.

    With `hide_user`, the whole user info is replaced.
    """
    parts = split_url(url)
    if parts is None or parts.scheme.lower().startswith("sqlite"):
        return url
    rest = _mask_query(parts.rest)
    if parts.userinfo is None:
        return f"{parts.scheme}://{rest}"
    if hide_user:
        userinfo = MASK
    elif parts.password is not None:
        userinfo = f"{parts.user}:{MASK}"
    else:
        userinfo = parts.userinfo
    return f"{parts.scheme}://{userinfo}@{rest}"


def mask_secrets(text: str, *, hide_user: bool = False) -> str:
    """Masks the password of every URL in `text` (a URL ends at a space or a quote)."""
    pieces: list[str] = []
    position = 0
    while (found := _URL_START.search(text, position)) is not None:
        end = found.end()
        while end < len(text) and text[end] not in _URL_END:
            end += 1
        pieces += [
            text[position : found.start()],
            mask_url(text[found.start() : end], hide_user=hide_user),
        ]
        position = end
    pieces.append(text[position:])
    return "".join(pieces)
