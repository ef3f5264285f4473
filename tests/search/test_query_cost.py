# ruff: noqa: RUF001  # look-alike characters (full-width, compatibility forms) are the point
"""parse_query: the same words as the pairwise rule, in time that grows with the query."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from persistence.errors import InvalidDataError
from persistence.search import QueryWord, is_spaceless, parse_query, words


def _implied_pairwise(word: QueryWord, found: list[QueryWord]) -> bool:
    """The rule as first written: every query word against every other."""
    for other in found:
        if other.text == word.text or len(other.text) <= len(word.text):
            continue
        if word.anywhere and word.text in other.text:
            return True
        if not word.anywhere and not other.anywhere and other.text.startswith(word.text):
            return True
    return False


def _kept_pairwise(query: str) -> tuple[QueryWord, ...]:
    found = [QueryWord(word, is_spaceless(word)) for word in words(query)]
    kept = [word for word in found if not _implied_pairwise(word, found)]
    return tuple(sorted(kept, key=lambda word: (-len(word.text), word.text)))


# Pieces whose words often begin or hold one another, in and out of scripts without spaces.
_PIECES = st.sampled_from(
    [
        "a",
        "ab",
        "abc",
        "b",
        "ba",
        "日",
        "日本",
        "本語",
        "日本語",
        "語a",
        "a日",
        "タワー",
        "ワ",
        "1",
        "Ａ",
    ]
)
_QUERIES = st.lists(st.one_of(_PIECES, st.sampled_from(" .-・、")), max_size=30).map("".join)


@settings(max_examples=1000, deadline=None)
@given(_QUERIES)
def test_a_query_keeps_the_words_the_pairwise_rule_keeps(query: str) -> None:
    parsed = parse_query(query)
    kept = _kept_pairwise(query)
    assert (parsed.words if parsed is not None else ()) == kept


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80))
def test_any_text_keeps_the_words_the_pairwise_rule_keeps(query: str) -> None:
    parsed = parse_query(query)
    assert (parsed.words if parsed is not None else ()) == _kept_pairwise(query)


def test_words_inside_and_at_the_start_of_others_are_dropped() -> None:
    parsed = parse_query("ab abc b 日本 本 語日本語 日本語x タワ ワー タワー")
    assert parsed is not None
    assert [word.text for word in parsed.words] == ["日本語x", "語日本語", "abc", "タワー", "b"]


def _fastest(query: str) -> float:
    """The fastest of seven refusals: past MAX_QUERY_WORDS a query is refused, once its
    words are found (in time that must not grow faster than they do). Seven, not three:
    under a loaded machine's full suite all three of the larger one were slowed once
    (a ratio of 69)."""
    timings = []
    for _ in range(7):
        start = time.perf_counter()
        with pytest.raises(InvalidDataError, match="distinct words"):
            parse_query(query)
        timings.append(time.perf_counter() - start)
    return min(timings)


@pytest.mark.parametrize(
    "word",
    [
        pytest.param(lambda n: f"w{n}", id="ascii"),
        pytest.param(lambda n: f"語{n}", id="spaceless"),
        pytest.param(lambda n: f"w{n} 語{n}x", id="both"),
    ],
)
def test_parsing_grows_linearly_with_the_number_of_distinct_words(
    word: Callable[[int], str],
) -> None:
    # Ten times the words: about ten times the work (a pairwise rule does a hundred).
    small = _fastest(" ".join(word(n) for n in range(2_000)))
    large = _fastest(" ".join(word(n) for n in range(20_000)))
    assert large / small < 30
