"""The one search rule: normalise, tokenise, build queries' terms.

Every backend compares a query with a message through the functions here, so the
rule is implemented once:

- Text and query are compared after NFKC, case folding, and removal of the combining
  marks (accents) carried by Latin, Greek and Cyrillic letters.
- Words are runs of Unicode letters, marks and digits (categories L, M, N); every
  other character separates words.
- A message matches when every query word begins some word of the message, except that
  a query word holding a letter of a script written without spaces (Han, Hiragana,
  Katakana, Thai) matches anywhere inside a word.
- The first MAX_SEARCHABLE_CHARS characters of a message are searchable.
- A query takes at most MAX_QUERY_WORDS distinct words, holding at most MAX_QUERY_BYTES
  bytes of UTF-8 in all (normalised); parse_query refuses more, for every backend.

At write time a message gets its *search document* (`search_document`): its distinct
normalised words in order of first appearance, then, for each word that holds a letter
of a script written without spaces, every substring of GRAM characters of it (marked
with GRAM_MARK, which no word can contain). The engines index the document's
space-separated tokens as they are, so a query word becomes a prefix term (`capit*`),
or for the scripts without spaces, gram terms. A gram term alone decides a query word
of at most GRAM characters; a longer one is rechecked exactly against the document.
"""

from __future__ import annotations

import re
import unicodedata
from collections import deque
from dataclasses import dataclass
from itertools import pairwise

import regex  # type: ignore[import-untyped]  # ships no type stubs

from persistence.errors import InvalidDataError

# A message's first 1 MiB of characters (at least 1 MiB of its UTF-8) is searchable.
MAX_SEARCHABLE_CHARS = 1 << 20
# Query words an index may look up (the longest, the most selective); every word is
# still tested against each candidate.
MAX_INDEXED_WORDS = 32
# Distinct words a query may have (after those implied by others): each is tested on
# every candidate message. Found by attack: a query pasting a 3,000-word vocabulary
# that 130 messages of 27 KB shared took 6.5 s on SQLite and 14 s on PostgreSQL.
MAX_QUERY_WORDS = 64
# UTF-8 bytes a query's words may hold in all (those MAX_QUERY_WORDS counts, normalised).
# PostgreSQL's strpos (Boyer-Moore-Horspool, compared backwards byte by byte), SQLite's
# instr (memcmp at every character) and MongoDB's regular expressions take time that
# grows with a message's length times a word's, where the message holds a long run of
# the word's letters. Found by attack: a word of 300,000 Han characters against a
# message of one 1 MiB word took 23 s on SQLite and over 6 minutes on PostgreSQL (the
# server went on after the client gave up). At this bound, against a message of 2^20
# four-byte letters, one word took at most 0.7 s on PostgreSQL and 0.02 s on SQLite;
# four words, all matching, up to 1.7 s on PostgreSQL, less than 64 one-letter words
# take there (2.4-2.9 s): the words' number, not their length, then decides.
MAX_QUERY_BYTES = 512
# Substrings of this length index the words of scripts written without spaces.
GRAM = 2
# Gram terms an index looks up for one word: a message holding them all is a candidate,
# and the word itself decides (found by attack: the 117,000 pieces of one long word
# overflowed PostgreSQL's tsquery; SQLite took 4 s to AND them).
MAX_GRAM_TERMS = 64
# Marks gram tokens: a separator (category Po), so never inside a word, and not ASCII,
# so SQLite FTS5's ascii tokenizer keeps it inside the token.
GRAM_MARK = "\u00a7"

_WORD = regex.compile(r"[\p{L}\p{M}\p{N}]+")
# The ASCII case, by far the commonest, through the faster standard engine.
_ASCII_WORD = re.compile(r"[a-z0-9]+")
_LGC_ACCENTS = regex.compile(r"([\p{Latin}\p{Greek}\p{Cyrillic}])\p{M}+")
_SPACELESS = regex.compile(r"[\p{Han}\p{Hiragana}\p{Katakana}\p{Thai}]")
# Unicode's stream-safe text format (UAX #15): no run of more than 30 combining marks;
# a longer run is broken by U+034F COMBINING GRAPHEME JOINER every 30. Python's
# normalisation sorts a run of marks by insertion, in time quadratic in its length:
# found by attack, a message of 80,000 marks took 8.7 s to save on PostgreSQL and its
# first search on SQLite 18 s, holding other writers' saves meanwhile. Counted with the
# marks: U+FF9E and U+FF9F, letters that NFKC makes marks (the only characters outside
# category M whose decomposition is marks alone; found by attack, runs of 30 marks
# between them made one long run inside NFKC).
_MARK_RUN = 30
_LONG_MARK_RUN = regex.compile(
    rf"[[\p{{M}}\uff9e\uff9f]--\u034f]{{{_MARK_RUN + 1},}}", flags=regex.V1
)
_GRAPHEME_JOINER = "\u034f"


def normalise(text: str) -> str:
    """Returns `text` as the rule compares it: NFKC, case-folded, Latin/Greek/Cyrillic
    letters without their combining marks.

    The result is stable: normalising it again changes nothing.
    """
    if text.__class__ is not str:
        # Found by attack: a str subclass's own isascii() or lower() decided its words.
        text = str.__str__(text)
    if text.isascii():
        return text.lower()
    folded = unicodedata.normalize("NFKC", _stream_safe(text)).casefold()
    stripped = _LGC_ACCENTS.sub(r"\1", unicodedata.normalize("NFD", folded))
    # Again: a mark may decompose into two (U+0344), so a run may have grown.
    return _stream_safe(unicodedata.normalize("NFKC", stripped))


def _stream_safe(text: str) -> str:
    """`text` with every run of more than _MARK_RUN marks broken by grapheme joiners."""
    if _LONG_MARK_RUN.search(text) is None:
        return text
    joined: str = _LONG_MARK_RUN.sub(_joined, text)
    return joined


def _joined(run: regex.Match) -> str:
    marks = run.group()
    return _GRAPHEME_JOINER.join(
        marks[start : start + _MARK_RUN] for start in range(0, len(marks), _MARK_RUN)
    )


def words(text: str) -> list[str]:
    """Returns the distinct normalised words of `text`, in order of first appearance."""
    normalised = normalise(text)
    pattern = _ASCII_WORD if normalised.isascii() else _WORD
    return list(dict.fromkeys(pattern.findall(normalised)))


def is_spaceless(word: str) -> bool:
    """True when `word` holds a letter of a script written without spaces."""
    return not word.isascii() and _SPACELESS.search(word) is not None


def grams(word: str) -> list[str]:
    """The substrings of GRAM characters starting at each position (shorter at the end)."""
    return [word[i : i + GRAM] for i in range(len(word))]


# The ASCII rule as a byte table: upper case to lower, every byte that is not [a-z0-9]
# (after that) to a space. Runs of [a-z0-9] are then what bytes.split() returns.
_ASCII_TOKENS = bytes(
    byte + 32 if 65 <= byte <= 90 else byte if 97 <= byte <= 122 or 48 <= byte <= 57 else 32
    for byte in range(256)
)


def search_document(content: str) -> str:
    """Returns the search document of a message's content, as stored and indexed.

    The one function every write of a message's content calls (inserts and edits);
    its result goes into the `search_text` column (SQL) or the message's
    `search_tokens` (MongoDB, split on spaces).
    """
    searchable = content[:MAX_SEARCHABLE_CHARS]
    if searchable.isascii():
        # words()'s ASCII case, a table lookup per byte in C: a bulk insert builds the
        # documents of its rows while the server stores the rows before them.
        tokens = searchable.encode("ascii").translate(_ASCII_TOKENS).split()
        return b" ".join(dict.fromkeys(tokens)).decode("ascii")
    found = words(searchable)
    if content.isascii():
        return " ".join(found)
    marked = dict.fromkeys(
        GRAM_MARK + gram for word in found if is_spaceless(word) for gram in grams(word)
    )
    return " ".join([*found, *marked])


@dataclass(frozen=True, slots=True)
class QueryWord:
    """One normalised query word and how it matches."""

    text: str
    # True: the word may match anywhere inside a message's word (scripts without
    # spaces); False: it must begin one.
    anywhere: bool

    def prefix_term(self) -> str | None:
        """The index term whose prefix matches decide this word alone, if there is one."""
        if not self.anywhere:
            return self.text
        return GRAM_MARK + self.text if len(self.text) <= GRAM else None

    def gram_terms(self) -> list[str]:
        """Exact gram terms every match holds (a word longer than GRAM), else none: its
        first MAX_GRAM_TERMS distinct ones."""
        if not self.anywhere or len(self.text) <= GRAM:
            return []
        terms = dict.fromkeys(
            GRAM_MARK + self.text[i : i + GRAM] for i in range(len(self.text) - 1)
        )
        return list(terms)[:MAX_GRAM_TERMS]


@dataclass(frozen=True, slots=True)
class SearchQuery:
    """A typed query as the engines take it.

    `words` decide: a message matches when each of them matches it (longest first).
    The index terms are what an index can look up for the first MAX_INDEXED_WORDS of
    them: a message holding them all is a candidate, which the words then decide.
    """

    words: tuple[QueryWord, ...]
    prefix_terms: tuple[str, ...]
    gram_terms: tuple[str, ...]

    def matches(self, document: str) -> bool:
        """True when a message of this search document matches: the rule as the SQL
        engines test it on the stored document (persistence.sql.search)."""
        spaced = " " + document
        return all(
            (word.text in document) if word.anywhere else (" " + word.text in spaced)
            for word in self.words
        )

    def matches_content(self, content: str) -> bool:
        """`matches(search_document(content))`, without the document where it can.

        An ASCII message's document is the runs of letters and digits (_ASCII_WORD) of
        its normalised text, so a word begins one of them exactly where the word occurs
        in that text after no letter or digit: a search that tests pending messages one
        by one decides those (nearly all) with `str.find`.
        """
        if not content.isascii():
            return self.matches(search_document(content))
        normalised = normalise(content[:MAX_SEARCHABLE_CHARS])
        return all(_begins_a_word(word.text, normalised) for word in self.words)


def _begins_a_word(word: str, text: str) -> bool:
    """True when `word` occurs in the ASCII `text` right after a non-alphanumeric (or
    at its start). A word of another script never does (an ASCII text lacks it).

    An occurrence after a letter or digit is inside a run of them, and so is every
    later one that starts in that run: the search goes on past the run's end, so it
    reads the text about once (found by measuring: going on one character at a time, a
    word of 512 letters took 5.9 s on `"b" + "a" * 2**20`, a pending message's test).
    """
    start = text.find(word)
    while start != -1:
        if start == 0 or not text[start - 1].isalnum():
            return True
        after = _ASCII_SEPARATOR.search(text, start)
        if after is None:
            return False
        start = text.find(word, after.end())
    return False


_ASCII_SEPARATOR = re.compile(r"[^a-z0-9]")


def _prefixes_of_others(texts: list[str]) -> set[str]:
    """The distinct `texts` that begin another of them: in sorted order, a text that
    begins any other begins the one right after it."""
    ordered = sorted(texts)
    return {text for text, after in pairwise(ordered) if after.startswith(text)}


def _inside_others(texts: list[str]) -> set[str]:
    """The distinct `texts` that occur inside another of them.

    Aho-Corasick: one trie of all the texts, each text then read through it once,
    so the work grows with their total length, not with the number of pairs.
    """
    # The trie: children by character, the index of the text a node ends (or -1).
    children: list[dict[str, int]] = [{}]
    ends = [-1]
    for index, text in enumerate(texts):
        node = 0
        for char in text:
            child = children[node].get(char)
            if child is None:
                child = len(children)
                children[node][char] = child
                children.append({})
                ends.append(-1)
            node = child
        ends[node] = index
    # fail: the node of the longest proper suffix in the trie; found: the nearest node
    # along the fail links (itself excluded) that ends a text, or -1.
    fail = [0] * len(children)
    found = [-1] * len(children)
    queue = deque(children[0].values())  # their fail links are the root's, 0
    while queue:
        node = queue.popleft()
        for char, child in children[node].items():
            queue.append(child)
            link = fail[node]
            while link and char not in children[link]:
                link = fail[link]
            target = children[link].get(char, 0)
            fail[child] = target
            found[child] = target if ends[target] >= 0 else found[target]
    # Every text ending at a node is marked with the texts along its `found` links,
    # so a walk stops at the first marked one: each node is marked once.
    marked = [False] * len(children)
    for index, text in enumerate(texts):
        node = 0
        for char in text:
            while node and char not in children[node]:
                node = fail[node]
            node = children[node].get(char, 0)
            hit = node if ends[node] >= 0 else found[node]
            if hit >= 0 and ends[hit] == index:  # the text itself, read to its end
                hit = found[hit]
            while hit >= 0 and not marked[hit]:
                marked[hit] = True
                hit = found[hit]
    return {texts[ends[node]] for node, is_marked in enumerate(marked) if is_marked}


def _implied(found: list[QueryWord]) -> set[str]:
    """The query words another query word implies: a match of the other is a match of
    them. A word that must begin a message's word is implied by a longer one that
    begins with it; a word that may match anywhere, by a longer one that holds it (which
    then holds its script without spaces, so may match anywhere too)."""
    beginning = [word.text for word in found if not word.anywhere]
    anywhere = [word.text for word in found if word.anywhere]
    return _prefixes_of_others(beginning) | _inside_others(anywhere)


def parse_query(query: str) -> SearchQuery | None:
    """Returns the query's words and terms, or None when it has no words.

    Any text (NUL, lone surrogates, operators of any engine) reduces to words of
    letters, marks and digits.

    Raises:
        InvalidDataError: the query has more than MAX_QUERY_WORDS distinct words, or
            they hold more than MAX_QUERY_BYTES bytes of UTF-8 (normalised).
    """
    found = [QueryWord(word, is_spaceless(word)) for word in words(query)]
    # A word past the bound is refused before _implied reads it (0.5 s for 300,000
    # characters): every query word is kept or implied by a kept word at least as long.
    longest = max((len(word.text.encode()) for word in found), default=0)
    if longest > MAX_QUERY_BYTES:
        raise _too_long(f"a word of {longest} bytes")
    implied = _implied(found)
    kept = sorted(
        (word for word in found if word.text not in implied),
        key=lambda word: (-len(word.text), word.text),
    )
    if not kept:
        return None
    if len(kept) > MAX_QUERY_WORDS:
        raise InvalidDataError(
            f"query: {len(kept)} distinct words; a search takes at most {MAX_QUERY_WORDS}"
            " (every word is tested on every message it could match)"
        )
    size = sum(len(word.text.encode()) for word in kept)
    if size > MAX_QUERY_BYTES:
        raise _too_long(f"{len(kept)} words of {size} bytes in all")
    indexed = kept[:MAX_INDEXED_WORDS]
    prefix_terms = [term for word in indexed if (term := word.prefix_term()) is not None]
    gram_terms = [term for word in indexed for term in word.gram_terms()]
    return SearchQuery(
        words=tuple(kept),
        prefix_terms=tuple(prefix_terms),
        gram_terms=tuple(dict.fromkeys(gram_terms)),
    )


def _too_long(what: str) -> InvalidDataError:
    return InvalidDataError(
        f"query: {what} (UTF-8, normalised); a search takes at most {MAX_QUERY_BYTES} bytes"
        " of words (each word is compared with a message in time that grows with the"
        " word's length times the message's)"
    )
