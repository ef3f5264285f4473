# ruff: noqa: RUF001  # look-alike characters (full-width, dotless i) are the point here
"""For any text, each of its words and each prefix of them finds it, on every backend."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from persistence import ChatSession
from persistence.search import normalise, search_document, words
from tests.search import oracle
from tests.search.conftest import Stores

pytestmark = [pytest.mark.sqlite, pytest.mark.postgresql]

# Letters of many scripts, marks, digits, separators, compatibility forms and symbols.
_PIECES = st.sampled_from(
    [
        *"aAzZ09_-./@:#'\"*()&|!<>\\",
        *"éÉüÜñçøłßſǅﬁﬂ",
        *"σςΣάΐ",
        *"йЁжЖ",
        *"日本語中文東京のテキストカタｶﾀ々ー",
        *"ภาษาไทย",
        *"नमस्तेहिंदी",
        *"한국어",
        *"مرحبا",
        "\u0301",
        "\u0308",
        "\u0327",
        "\u3099",
        "Ｆ",
        "１",
        "½",
        "①",
        "™",
        "㎏",
        "🙂",
        "\u200d",
        " ",
        "\n",
        "\t",
    ]
)
# Characters Python's Unicode database knows: the `regex` module may know newer ones
# (letters to it, unassigned to unicodedata), which the oracle cannot judge.
_ASSIGNED = st.characters(codec="utf-8", exclude_categories=["Cn", "Cs"])
texts = st.lists(st.one_of(_PIECES, _ASSIGNED), min_size=1, max_size=40).map("".join)
_SESSIONS = itertools.count()

PROPERTY_SETTINGS = settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def _store(stores: Stores, content: str) -> tuple[str, str]:
    session = ChatSession.create("p", session_id=f"property-{next(_SESSIONS)}")
    message = session.add_message("user", content)
    stores.save(session)
    return session.session_id, message.message_id


@PROPERTY_SETTINGS
@given(texts, st.data())
def test_a_word_of_any_text_and_any_prefix_of_it_find_the_message(
    stores: Stores, text: str, data: st.DataObject
) -> None:
    assume("\x00" not in text and not any("\ud800" <= c <= "\udfff" for c in text))
    held = oracle.words(text)
    assume(held)
    word = data.draw(st.sampled_from(held), label="word")
    cut = data.draw(st.integers(1, len(word)), label="prefix length")
    start = data.draw(st.integers(0, cut - 1), label="start") if oracle.spaceless(word) else 0
    if not oracle.spaceless(word[start:cut]):
        # Only a piece holding a letter of a script without spaces may match mid-word.
        start = 0
    session_id, message_id = _store(stores, text)

    for query in (word, word[start:cut], word.upper()):
        found = stores.search(query, session_id=session_id)
        assert found == {name: [message_id] for name in found}, (text, query)


@PROPERTY_SETTINGS
@given(texts, texts)
def test_any_query_finds_the_message_exactly_when_the_rule_says(
    stores: Stores, text: str, query: str
) -> None:
    assume("\x00" not in text and not any("\ud800" <= c <= "\udfff" for c in text))
    session_id, message_id = _store(stores, text)
    expected = [message_id] if oracle.matches(query, text) else []

    found = stores.search(query, session_id=session_id)

    assert found == {name: expected for name in found}, (text, query)


@settings(max_examples=500, deadline=None, database=None)
@given(st.text(_ASSIGNED, max_size=60))
def test_the_rule_module_agrees_with_the_oracle(text: str) -> None:
    assert normalise(normalise(text)) == normalise(text)
    assert words(text) == list(dict.fromkeys(oracle.words(text)))
    document = search_document(text).split()
    assert set(oracle.words(text)) <= set(document)
