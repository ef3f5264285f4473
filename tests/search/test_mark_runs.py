"""Long runs of combining marks: normalised in linear time, found on every backend.

Found by attack: Python's normalisation sorts a run of marks by insertion, in time
quadratic in its length. A message of one letter and 80,000 marks (in the reverse of
Unicode's order) took 8.7 s to save on PostgreSQL and 18 s to search first on SQLite,
holding other writers meanwhile. The rule now breaks runs of more than 30 marks with
U+034F, as Unicode's stream-safe text format (UAX #15) does, before and after it
normalises; what it does to a message it does to a query of the same text.
"""

from __future__ import annotations

import random

import pytest
import regex  # type: ignore[import-untyped]  # ships no type stubs

from persistence import ChatSession, InvalidDataError, SessionStorage
from persistence.search import MAX_QUERY_BYTES, normalise, parse_query, search_document, words

_MARKS = regex.compile(r"[[\p{M}\uff9e\uff9f]--\u034f]+", flags=regex.V1)
# Marks of several combining classes, marks that decompose into two (U+0344, U+0F73),
# the joiner itself, and letters of scripts whose marks are kept or stripped.
_POOL = [
    *"\u0301\u0316\u0344\u0f73\u0308\u05b0\u093e\u0e31\u034f",
    *"aeΩя日가\u1100\u1161 ",
]


def _hostile(marks: int) -> str:
    return "x" + "\u0301" * marks + "\u0316" * marks


def _longest_run(text: str) -> int:
    return max((len(run) for run in _MARKS.findall(text)), default=0)


@pytest.mark.parametrize(
    "text",
    [
        _hostile(100_000),
        "日" + "\u0f73" * 100_000,
        "\u0301" * 31,
        # Letters that NFKC makes marks: one run inside it (found by attack).
        "x" + ("\u0301" * 30 + "\uff9e") * 4000,
        "x" + ("\u0316" * 29 + "\uff9f") * 4000,
    ],
)
def test_no_run_of_more_than_30_marks_reaches_the_normalisation(text: str) -> None:
    """The quadratic sort then sorts runs of at most 60 (a mark may become two)."""
    assert _longest_run(normalise(text)) <= 30
    document = search_document(text)
    assert _longest_run(document) <= 30
    if len("".join(words(text)).encode()) > MAX_QUERY_BYTES:  # a word of 100,000 marks
        with pytest.raises(InvalidDataError, match="a search takes at most"):
            parse_query(text)
        return
    found = parse_query(text)
    assert found is not None and [word.text for word in found.words] == words(text)


def test_normalising_is_stable_with_runs_broken() -> None:
    rng = random.Random(20261205)
    for _ in range(3000):
        text = "".join(rng.choice(_POOL) for _ in range(rng.choice([10, 45, 75, 140])))
        once = normalise(text)
        assert normalise(once) == once, [hex(ord(char)) for char in text]


def test_runs_of_30_marks_or_fewer_are_left_as_they_were() -> None:
    text = "e" + "\u0316" * 30 + " ω" + "\u0301" * 2
    assert "\u034f" not in normalise(text)


async def test_a_message_with_a_long_run_of_marks_is_found_by_its_words(
    storage: SessionStorage,
) -> None:
    session = ChatSession.create("marks")
    hostile = _hostile(400)
    session.add_message("user", f"hello {hostile} world")
    session.add_message("user", "unrelated")
    await storage.save_session(session)

    for query in ("hello", "world", hostile, f"hello {hostile}"):
        found = await storage.search_messages(query)
        assert [m.message_id for m in found] == [session.messages[0].message_id], query
