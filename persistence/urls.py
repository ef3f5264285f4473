"""Database URLs as operators type them: where the user info ends, passwords masked.

The user info of `scheme://user:password@host/db?query` is everything between `://`
and the LAST `@`, so a password typed with a raw `@`, `/`, `?` or `#` (which drivers
misread) is still masked whole; a mask hides a little too much rather than too little.
Query parameters whose name holds "password" (`?password=`, `sslpassword=`,
`tlsCertificateKeyFilePassword=`) are masked too, and so are the password parameters of
libpq's key=value connection strings (`host=db password=s3cret`). SQLite URLs carry no
secret.

A PostgreSQL URL may carry libpq's query parameters (`?sslmode=require`,
`application_name=`): `postgresql_query_problem` refuses the ones asyncpg cannot use,
and `asyncpg_url` rewrites the others into what SQLAlchemy passes asyncpg.
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from urllib.parse import quote, unquote, urlencode

MASK = "***"
# A URL scheme (RFC 3986): what comes before `://`.
SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*")
# What a scheme is made of after its first letter.
_SCHEME_CHARACTERS = frozenset(string.ascii_letters + string.digits + "+.-")
# Characters that end a URL in free text (messages quote URLs or end them with a space).
_URL_END = frozenset(" \t\r\n'\"`<>")
# Characters after which a `scheme://` starts another URL (inside user info it does not).
_URL_BEFORE = frozenset(" \t'\"`<>(),;=[")
# Characters that end or split a URL's parts: they must be percent-encoded in user info.
RESERVED_IN_USERINFO = {"@": "%40", "/": "%2F", "?": "%3F", "#": "%23"}
_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
# A URL's text up to a `scheme://` inside its password: `user:pass`, no `@` yet, the `:`
# not a port's (`host:5432/db, next://`).
_PASSWORD_SO_FAR = re.compile(r"[^@]*?:(?!\d*(?:[/?#,\s]|$))[^@]*")
# A password parameter of a libpq key=value connection string in free text, and its
# value: quoted ('s3 cret', with \' and \\ escapes; unterminated, to the end) or up to
# the next space. Its name starts a word: after `?` or `&` it is a URL's, masked with it.
_CONNINFO_SECRET = re.compile(
    r"(?:^|(?<=[\s'\"`(\[,;]))((?:[A-Za-z_]*password[A-Za-z_]*|pass|pwd)[ \t]*=[ \t]*)"
    r"(?:'(?:[^'\\]|\\[\s\S])*'?|\S+)",
    re.IGNORECASE | re.MULTILINE,
)


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


# A URL's scheme, as it stands at the start of a path once pathlib has made its "//"
# one "/" (`postgresql:/app:secret@db/app`); two characters at least, so that a
# Windows drive (`C:/`) is a path.
_SCHEME_AT_START = re.compile(r"([A-Za-z][A-Za-z0-9+.-]+):/")


def url_given_as_path(path: object) -> str | None:
    """What to call a URL given where a file path was expected ("a postgresql: URL
    (not shown: ...)"), else None: the caller refuses it with that.

    Found by attack: `--config postgresql://app:secret@db/app`, `restore URL` and
    `backup URL` named the "file" in their errors, password and all (pathlib turns
    "://" into ":/", which masking does not take for a URL), and `backup` made
    directories named with the password. A path starting `scheme:/` is refused
    instead, naming only the scheme.
    """
    found = _SCHEME_AT_START.match(str(path))
    if found is None:
        return None
    return f"a {found.group(1)}: URL (not shown: it may hold a password)"


def _authority(rest: str) -> str:
    """The hosts and ports of a URL's part after the user info (up to its path,
    query or fragment)."""
    return re.split(r"[/?#]", rest, maxsplit=1)[0]


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
            hiding = _secret_parameter(key)
            masked.append(f"{key}={MASK}" if hiding else pair)
        elif not hiding:
            masked.append(pair)
        # A piece without `=` right after a password is the rest of a raw `&` in it.
    return f"{path}?{'&'.join(masked)}"


def _secret_parameter(key: str) -> bool:
    """Whether a query parameter holds a password: its name as the driver decodes it
    (`pass%77ord` is `password`)."""
    name = unquote(key).lower()
    return "password" in name or name in ("pass", "pwd")


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
    """Masks the password of every URL, and of every libpq key=value connection string,
    in `text`.

    A URL's user info runs to the last `@` before the line or the next URL ends, so a
    password typed raw with a space, a quote or a backtick is hidden whole; after the
    `@`, the URL ends at a space or a quote.
    """
    return _CONNINFO_SECRET.sub(lambda found: found.group(1) + MASK, _mask_urls(text, hide_user))


def mask_typed_words(text: str, words: Iterable[str]) -> str:
    """Masks `text`, a message that may quote some of `words` (a command line's
    arguments) as they were typed, or as Python's repr writes them.

    Each such word is masked whole first (a URL as one URL, whatever its password
    holds: a `://`, a new line), then the rest as mask_secrets masks it.
    """
    for word in sorted(set(words), key=len, reverse=True):
        masked = _mask_word(word)
        if masked != word:
            text = text.replace(word, masked).replace(repr(word)[1:-1], repr(masked)[1:-1])
    return mask_secrets(text)


def _mask_word(word: str) -> str:
    """One word of a command line, its secrets masked: a URL, or `--option=URL`, as one
    URL; anything else as free text."""
    option, equals, value = word.partition("=")
    if equals and option.startswith("-") and split_url(value) is not None:
        return f"{option}={mask_url(value)}"
    return mask_url(word) if split_url(word) is not None else mask_secrets(word)


def _url_starts(text: str, start: int, end: int) -> Iterator[tuple[int, int]]:
    """Where each `scheme://` in text[start:end] begins, and where its `://` ends: what
    a search for SCHEME + "://" finds, in linear time. Found by attack: that search
    tried each letter of a long word as a scheme's first, so an error line quoting
    200,000 letters took 29 s to mask, and one of 5 MB did not end."""
    while (colon := text.find("://", start, end)) >= 0:
        begin = colon
        while begin > start and text[begin - 1] in _SCHEME_CHARACTERS:
            begin -= 1
        while begin < colon and not ("a" <= text[begin].lower() <= "z"):
            begin += 1  # a scheme's first character is a letter
        if begin < colon:
            yield begin, colon + 3
        start = colon + 3


def _mask_urls(text: str, hide_user: bool) -> str:
    pieces: list[str] = []
    position = 0
    while (found := next(_url_starts(text, position, len(text)), None)) is not None:
        begin, after = found
        limit = _region_end(text, begin, after)
        at = text.rfind("@", after, limit)
        end = after if at < 0 else at + 1
        while end < limit and text[end] not in _URL_END:
            end += 1
        pieces += [text[position:begin], mask_url(text[begin:end], hide_user=hide_user)]
        position = end
    pieces.append(text[position:])
    return "".join(pieces)


def _region_end(text: str, begin: int, start: int) -> int:
    """Where the URL that begins at `begin` (its `://` ending at `start`) ends at the
    latest: the end of the line, or the next URL that starts after a separator (not a
    `scheme://` inside a password).

    Found by attack: a raw password holding `,x://` or ` x://` (`postgresql://u:a,b://c@h`)
    was cut there, and printed. A URL whose text so far reads `user:pass` (no `@` yet,
    a `:` not a port's) goes on: a password cannot have ended there.
    """
    end = len(text)
    for character in "\r\n":
        if (line_end := text.find(character, start, end)) >= 0:
            end = line_end
    sqlite = text[begin:start].lower().startswith("sqlite")  # no password to go on with
    for later, _ in _url_starts(text, start, end):
        so_far = text[start:later]
        if text[later - 1] in _URL_BEFORE and (sqlite or not _PASSWORD_SO_FAR.fullmatch(so_far)):
            return later
    return end


def port_problem(url: str) -> str | None:
    """Why a port of `url` (each host's, for a list of hosts) is unusable, or None."""
    parts = split_url(url)
    if parts is None or parts.scheme.lower().startswith("sqlite"):
        return None
    hosts = _authority(parts.rest)
    for host in hosts.split(","):
        port = host.rpartition("]")[2] if host.startswith("[") else host
        if ":" not in port:
            continue
        number = port.rpartition(":")[2]
        if not number:
            continue
        if not number.isascii() or not number.isdigit():
            return f"port {number!r} is not a number"
        if not 1 <= int(number) <= 65535:
            return f"port {number} is not between 1 and 65535"
    return None


# libpq's sslmode values, which asyncpg's `ssl` also takes.
SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
# Parameters SQLAlchemy hands asyncpg.connect as they are (asyncpg's keyword names).
_ASYNCPG_KEYWORDS = frozenset(
    {
        "host",
        "port",
        "user",
        "password",
        "database",
        "passfile",
        "ssl",
        "target_session_attrs",
        "krbsrvname",
        "gsslib",
        "command_timeout",
        "statement_cache_size",
        "max_cached_statement_lifetime",
        "max_cacheable_statement_size",
        "prepared_statement_cache_size",
    }
)
# libpq's names of asyncpg keywords.
_RENAMED = {"sslmode": "ssl", "dbname": "database"}
# libpq parameters asyncpg reads only from a DSN: passed in `dsn=postgresql://?...`,
# which asyncpg parses under its keyword arguments (application_name and options
# become startup parameters).
_DSN_ONLY = (
    "application_name",
    "options",
    "sslrootcert",
    "sslcert",
    "sslkey",
    "sslcrl",
    "ssl_min_protocol_version",
    "ssl_max_protocol_version",
)
# What to write instead of a libpq parameter the library sets another way.
_INSTEAD = {
    "connect_timeout": "set the storage option connect_timeout",
    "timeout": "set the storage option connect_timeout",
    "statement_timeout": "set the storage option statement_timeout",
    "sslpassword": "decrypt the key file, or use an SSL key without a password",
    "dsn": "write the parameters in the URL itself",
}
_TARGET_SESSION_ATTRS = ("any", "primary", "standby", "prefer-standby", "read-write", "read-only")
KNOWN_POSTGRESQL_PARAMETERS = sorted({*_ASYNCPG_KEYWORDS, *_RENAMED, *_DSN_ONLY})


def _query_pairs(query: str) -> list[tuple[str, str]]:
    """A URL query's `name=value` pairs as libpq reads them: percent-decoded only.

    Found by attack: urllib's parse_qsl (and SQLAlchemy's, which uses it) turns `+`
    into a space, so `?application_name=a+b` and `?password=pa+ss` changed.
    """
    pairs = []
    for piece in query.split("&"):
        if piece:
            name, _, value = piece.partition("=")
            pairs.append((unquote(name), unquote(value)))
    return pairs


def _query(url: str) -> list[tuple[str, str]]:
    parts = split_url(url)
    query = "" if parts is None else parts.rest.partition("#")[0].partition("?")[2]
    return _query_pairs(query)


def postgresql_url_problem(url: str) -> str | None:
    """Why the PostgreSQL URL `url` cannot be used beyond its user info and ports: a
    list of hosts, or a query parameter asyncpg cannot use; None if neither. A socket
    directory given as the host is checked where it goes (`?host=`, `?port=`; found by
    attack: a list of them, or a port that is no number, reached SQLAlchemy)."""
    url = _socket_host_in_query(url)
    parts = split_url(url)
    listed = parts is not None and "," in _authority(parts.rest)
    # Or in the query (`?host=h1,h2&port=p1,p2`), which asyncpg reads as a list too.
    listed = listed or any(
        name in ("host", "hostaddr", "port") and "," in value for name, value in _query(url)
    )
    if listed:
        # Found by attack: libpq's `host1:5432,host2:5433` passed the configuration's
        # checks, and the storage then said "not a database URL", naming no source.
        return (
            "several hosts in one URL (host1,host2) are not supported: give one URL per"
            " server (read_replicas takes a list)"
        )
    return postgresql_query_problem(url)


def postgresql_query_problem(url: str) -> str | None:
    """Why a query parameter of the PostgreSQL URL `url` cannot be used, or None.

    Names the parameter; never repeats a password.
    """
    pairs = _query(url)
    names = [name for name, _ in pairs]
    if "ssl" in names and "sslmode" in names:
        return "query parameters ssl and sslmode say the same thing: give one"
    after_password = False
    for name, value in pairs:
        if names.count(name) > 1:
            return f"query parameter {name} is given more than once"
        if name in _INSTEAD:
            return f"query parameter {name} is not supported in the URL: {_INSTEAD[name]}"
        if name not in _ASYNCPG_KEYWORDS and name not in _RENAMED and name not in _DSN_ONLY:
            if after_password:
                # Maybe the rest of a password with a raw `&` in it: not repeated.
                return (
                    "an unknown query parameter follows a password parameter (not shown: a"
                    " raw `&` in a password splits it; write it %26)"
                )
            return (
                f"unknown query parameter {name!r}"
                f" (known: {', '.join(KNOWN_POSTGRESQL_PARAMETERS)})"
            )
        after_password = after_password or _secret_parameter(name)
        if name in ("ssl", "sslmode") and value not in SSL_MODES:
            return f"query parameter {name}={value!r} is not one of {', '.join(SSL_MODES)}"
        if name == "target_session_attrs" and value not in _TARGET_SESSION_ATTRS:
            return (
                f"query parameter target_session_attrs={value!r} is not one of"
                f" {', '.join(_TARGET_SESSION_ATTRS)}"
            )
        if name == "port" and (problem := port_problem(f"postgresql://h:{value}")):
            return f"query parameter {problem}"
    return None


def _socket_host_in_query(url: str) -> str:
    """`url` with a socket directory given as its host (`postgresql://u@%2Fvar%2Frun%2F
    postgresql/db`, as libpq reads it) moved to `?host=` (and its port to `?port=`),
    where asyncpg reads one; other URLs as they are. Found by attack: the directory
    was looked up as a host name."""
    parts = split_url(url)
    if parts is None:
        return url
    hostport = _authority(parts.rest)
    host, colon, port = hostport.partition(":")
    given = dict(_query(url))
    if not unquote(host).startswith("/") or "host" in given:
        return url
    rest, hash_, fragment = parts.rest[len(hostport) :].partition("#")
    path, _, query = rest.partition("?")
    # A `port=` in the query wins over the host's, as it does beside a host name.
    moved = [("host", unquote(host))] + ([("port", port)] if colon and "port" not in given else [])
    query = "&".join(filter(None, [urlencode(moved, quote_via=quote), query]))
    userinfo = "" if parts.userinfo is None else f"{parts.userinfo}@"
    return f"{parts.scheme}://{userinfo}{path or '/'}?{query}{hash_}{fragment}"


def asyncpg_url(url: str) -> str:
    """The PostgreSQL URL `url` with libpq's query parameters as asyncpg takes them
    (through SQLAlchemy): `sslmode` as `ssl`, `dbname` as `database`, and those asyncpg
    reads only from a DSN in `dsn=postgresql://?...`, every value percent-encoded (a `+`
    as %2B: SQLAlchemy would read a raw one as a space). Other URLs are returned as
    they are.
    """
    url = _socket_host_in_query(url)
    parts = split_url(url)
    if parts is None or "?" not in parts.rest:
        return url
    path, _, query = parts.rest.partition("?")
    query, hash_, fragment = query.partition("#")
    pairs = _query_pairs(query)
    if "+" not in query and not any(name in _RENAMED or name in _DSN_ONLY for name, _ in pairs):
        return url
    kept = [(_RENAMED.get(name, name), value) for name, value in pairs if name not in _DSN_ONLY]
    through_dsn = [(name, value) for name, value in pairs if name in _DSN_ONLY]
    if through_dsn:
        kept.append(("dsn", "postgresql://?" + urlencode(through_dsn, quote_via=quote)))
    userinfo = "" if parts.userinfo is None else f"{parts.userinfo}@"
    rebuilt = f"{parts.scheme}://{userinfo}{path}"
    if kept:
        rebuilt += "?" + urlencode(kept, quote_via=quote)
    return rebuilt + hash_ + fragment
