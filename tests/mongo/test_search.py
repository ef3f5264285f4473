"""How a typed query becomes an index filter and per-message tests, without a server."""

from __future__ import annotations

import re

import pytest
from bson import ObjectId

from persistence.errors import InvalidDataError
from persistence.models import ChatSession
from persistence.mongo.mapping import document_from_message
from persistence.mongo.repositories import (
    _LAST,
    MAX_PATTERN_BYTES,
    search_key,
    search_pipeline,
    session_filter,
)
from persistence.search import MAX_QUERY_BYTES, parse_query, search_document

HOSTILE = ['"unbalanced', "a -b", "NEAR(a b)", "x:y", "\\", "$where", '(* ")', "\x00null\x00"]
HOSTILE += ["\ud800lone", "🙂", "a.b*c?d+e[f]g{h}i|j^k$l"]


def _parsed(query: str):  # type: ignore[no-untyped-def]
    parsed = parse_query(query)
    assert parsed is not None
    return parsed


def test_a_message_document_carries_its_search_tokens() -> None:
    message = ChatSession.create("m").add_message("user", "Café 日本 cafe")
    document = document_from_message(message)
    assert document["search_tokens"] == search_document("Café 日本 cafe").split()
    assert document["search_tokens"][:2] == ["cafe", "日本"]


@pytest.mark.parametrize("query", HOSTILE)
def test_any_typed_text_reduces_to_tokens_and_escaped_patterns(query: str) -> None:
    parsed = parse_query(query)
    if parsed is None:
        return
    pipeline = search_pipeline(parsed, 10, None)
    tests = pipeline[2]["$match"]["$and"]
    for test, word in zip(tests, parsed.words, strict=True):
        condition = test["messages.search_tokens"]
        if word.anywhere:
            # Escaped: the server's PCRE reads the word as itself.
            assert re.fullmatch(condition["$regex"], word.text)
        else:
            assert condition == {"$elemMatch": {"$gte": word.text, "$lt": word.text + _LAST}}
    assert not any(key.startswith("$where") for key in str(session_filter(parsed, None)))


def test_every_pattern_a_search_takes_fits_the_servers_bound() -> None:
    """Found by review: 6,000 Han characters (18,000 bytes) made a pattern the server
    refused. parse_query now refuses words of more than MAX_QUERY_BYTES, on every
    backend, and a word's pattern is the word itself."""
    assert MAX_QUERY_BYTES <= MAX_PATTERN_BYTES
    for longest in ("日" * (MAX_QUERY_BYTES // 3), "\U00020000" * (MAX_QUERY_BYTES // 4)):
        (condition,) = search_pipeline(_parsed(longest), 10, None)[2]["$match"]["$and"]
        pattern = condition["messages.search_tokens"]["$regex"]
        assert pattern == longest and len(pattern.encode()) <= MAX_PATTERN_BYTES
    with pytest.raises(InvalidDataError, match="a search takes at most"):
        parse_query("日" * 6_000)


def test_index_terms_are_prefix_ranges_and_exact_grams() -> None:
    parsed = _parsed("Capit 日本語")
    found = session_filter(parsed, "s-1")
    assert found["_id"] == "s-1"
    assert found["$and"] == [
        {"messages.search_tokens": {"$elemMatch": {"$gte": "capit", "$lt": "capit" + _LAST}}},
        {"messages.search_tokens": "§日本"},
        {"messages.search_tokens": "§本語"},
    ]


def test_pipeline_tests_every_word_filters_the_role_and_keeps_tokens_out() -> None:
    pipeline = search_pipeline(_parsed("alpha テキスト"), 7, "user")
    match = pipeline[2]["$match"]["$and"]
    assert {"messages.role": "user"} in match
    assert {"messages.search_tokens": {"$regex": "テキスト"}} in match
    assert {"$unwind": {"path": "$messages", "includeArrayIndex": "position"}} in pipeline
    assert pipeline[3] == {"$sort": {"messages.seq": -1, "position": -1}}
    assert search_pipeline(_parsed("alpha"), 7, None, in_session=True)[3] == {
        "$sort": {"position": -1}
    }
    assert pipeline[4] == {"$limit": 7}
    assert pipeline[-1] == {"$project": {"messages.search_tokens": 0}}
    assert pipeline[0] == {"$project": {"messages": 1, "incarnation": 1}}


def test_a_later_batch_starts_below_the_last_match_of_the_one_before() -> None:
    below = ObjectId()
    everywhere = search_pipeline(_parsed("alpha"), 7, None, below=below)
    in_session = search_pipeline(_parsed("alpha"), 7, None, in_session=True, below=12)

    assert {"messages.seq": {"$lt": below}} in everywhere[2]["$match"]["$and"]
    assert {"position": {"$lt": 12}} in in_session[2]["$match"]["$and"]
    row = {"_id": "s", "incarnation": "i", "position": 3, "messages": {"seq": below}}
    assert search_key(row, in_session=False) == below
    assert search_key(row, in_session=True) == 3


def test_a_prefix_range_holds_exactly_the_words_that_begin_with_it() -> None:
    words = ["cap", "capit", "capital", "capitulate", "capj", "cao", "cap\U0010fffd"]
    selected = [w for w in words if "capit" <= w < "capit" + _LAST]
    assert selected == ["capit", "capital", "capitulate"]
