"""How a typed query becomes a text search and a per-message filter, without a server."""

from __future__ import annotations

import pytest
import regex  # type: ignore[import-untyped]  # the package ships no type stubs

from persistence.mongo.repositories import (
    search_pipeline,
    text_search,
    word_pattern,
)
from persistence.storage import MAX_QUERY_WORDS, search_words

# The server's regex engine is PCRE; the `regex` module (a dev dependency) reads the same
# \p{..} classes, lookbehinds and case folding, so the pattern's meaning is checked here.

HOSTILE = [
    '"unbalanced',
    "a -b",
    "NEAR(a b)",
    "x:y",
    "\\",
    "$where",
    '(* ")',
    "\x00null\x00",
    "\ud800lone",
    "   ",
    "",
    "🙂",
]


@pytest.mark.parametrize("query", HOSTILE)
def test_any_typed_text_reduces_to_plain_words(query: str) -> None:
    words = search_words(query)
    assert all(regex.fullmatch(r"\w+", word) for word in words)
    search = text_search(words)
    # Only the quotes we add: the text index reads nothing as negation or syntax.
    assert search.count('"') == 2 * len(words)
    assert "-" not in search


def test_words_are_quoted_so_the_text_index_ands_them() -> None:
    assert text_search(search_words("Hello, wörld! 42")) == '"Hello" "wörld" "42"'


def test_queries_are_capped() -> None:
    assert len(search_words(" ".join(f"w{i}" for i in range(100)))) == MAX_QUERY_WORDS


def _matches(word: str, content: str) -> bool:
    return regex.search(word_pattern(word), content, regex.IGNORECASE) is not None


@pytest.mark.parametrize(
    ("word", "content", "expected"),
    [
        ("cat", "the cat sat", True),
        ("cat", "The CAT sat", True),
        ("CAT", "a cat.", True),
        ("cat", "concatenate", False),
        ("cat", "cats", False),
        ("cat", "cat_food", False),
        ("cat", "(cat)", True),
        ("wörld", "Hello WÖRLD!", True),
        ("öl", "Köln", False),
        ("日本", "日本", True),
        ("42", "answer: 42.", True),
        ("42", "1420", False),
    ],
)
def test_word_pattern_matches_whole_words_case_insensitively(
    word: str, content: str, expected: bool
) -> None:
    assert _matches(word, content) is expected


def test_pipeline_keeps_messages_holding_every_word_newest_first() -> None:
    pipeline = search_pipeline(["alpha", "beta"], 7)
    match = next(stage["$match"] for stage in pipeline if "$match" in stage)
    assert match == {
        "$and": [
            {"messages.content": {"$regex": word_pattern("alpha"), "$options": "i"}},
            {"messages.content": {"$regex": word_pattern("beta"), "$options": "i"}},
        ]
    }
    assert {"$unwind": {"path": "$messages", "includeArrayIndex": "position"}} in pipeline
    assert pipeline[-2] == {
        "$sort": {"messages.created_at": -1, "messages.seq": -1, "position": -1}
    }
    assert pipeline[-1] == {"$limit": 7}
    # Only the history is carried through the stages after the text match.
    assert pipeline[0] == {"$project": {"messages": 1}}
