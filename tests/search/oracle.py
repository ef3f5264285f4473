"""The search rule of shared/API.md, written again from its text for the tests.

Deliberately independent of persistence/search.py: character by character, with
unicodedata for categories and the `regex` module only to name a character's script.
"""

from __future__ import annotations

import functools
import unicodedata

import regex  # type: ignore[import-untyped]  # ships no type stubs

SEARCHABLE = 1 << 20
_ACCENTED_SCRIPTS = ("Latin", "Greek", "Cyrillic")
_SPACELESS_SCRIPTS = ("Han", "Hiragana", "Katakana", "Thai")


@functools.cache
def _script_of(char: str, scripts: tuple[str, ...]) -> bool:
    return any(regex.fullmatch(rf"\p{{Script={name}}}", char) for name in scripts)


def fold(text: str) -> str:
    """NFKC, case folding, then no combining marks on Latin, Greek or Cyrillic letters."""
    folded = unicodedata.normalize("NFKC", text).casefold()
    kept: list[str] = []
    base_accented = False
    for char in unicodedata.normalize("NFD", folded):
        if unicodedata.category(char)[0] == "M":
            if base_accented:
                continue
        else:
            base_accented = _script_of(char, _ACCENTED_SCRIPTS)
        kept.append(char)
    return unicodedata.normalize("NFKC", "".join(kept))


def words(text: str) -> list[str]:
    """Runs of letters, marks and digits of the folded text."""
    found: list[str] = []
    current: list[str] = []
    for char in fold(text) + " ":
        if unicodedata.category(char)[0] in "LMN":
            current.append(char)
        elif current:
            found.append("".join(current))
            current = []
    return found


def spaceless(word: str) -> bool:
    return any(_script_of(char, _SPACELESS_SCRIPTS) for char in word)


def searchable_words(content: str) -> frozenset[str]:
    return frozenset(words(content[:SEARCHABLE]))


def matches(query: str, content: str) -> bool:
    """Every query word begins a word of the message (or, spaceless, occurs in one)."""
    return matches_words(words(query), searchable_words(content))


def matches_words(wanted: list[str], held: frozenset[str]) -> bool:
    if not wanted:
        return False
    for word in wanted:
        if spaceless(word):
            if not any(word in other for other in held):
                return False
        elif not any(other.startswith(word) for other in held):
            return False
    return True
