# ruff: noqa: RUF001  # look-alike characters (full-width, compatibility forms) are the point
"""persistence/search.py: the rule's pieces, without a database."""

from __future__ import annotations

import sys
import time

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from persistence.errors import InvalidDataError
from persistence.search import (
    GRAM_MARK,
    MAX_GRAM_TERMS,
    MAX_INDEXED_WORDS,
    MAX_QUERY_BYTES,
    MAX_QUERY_WORDS,
    MAX_SEARCHABLE_CHARS,
    QueryWord,
    normalise,
    parse_query,
    search_document,
    words,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("alice@example.com", ["alice", "example", "com"]),
        ("3.14", ["3", "14"]),
        ("/usr/local/bin", ["usr", "local", "bin"]),
        ("foo.bar.numbatword()", ["foo", "bar", "numbatword"]),
        ("<script>alert(1)</script>", ["script", "alert", "1"]),
        ("snake_case", ["snake", "case"]),
        ("नमस्ते दुनिया", ["नमस्ते", "दुनिया"]),
        ("École ÜBER nai\u0308ve", ["ecole", "uber", "naive"]),
        ("Ｆｕｌｌ１２", ["full12"]),
        ("ΣΟΦΊΑ σοφία", ["σοφια"]),
        ("Straße ﬁx", ["strasse", "fix"]),
        ("Йогурт ёж", ["иогурт", "еж"]),
        ("Øresund Łódź", ["øresund", "łodz"]),
        ("日本語のテキスト、東京", ["日本語のテキスト", "東京"]),
        ("が", ["が"]),
        ("a a A", ["a"]),
        ("", []),
        ("\x00\ud800 🙂", []),
    ],
)
def test_words_are_runs_of_letters_marks_and_digits_after_folding(
    text: str, expected: list[str]
) -> None:
    assert words(text) == expected


def test_normalising_twice_changes_nothing_for_any_character() -> None:
    changed = [
        hex(code)
        for code in range(sys.maxunicode + 1)
        if not 0xD800 <= code <= 0xDFFF and normalise(normalise(chr(code))) != normalise(chr(code))
    ]
    assert changed == []


def test_the_search_document_holds_words_then_marked_pieces() -> None:
    assert search_document("The capital, the CAPITAL") == "the capital"
    pieces = ["東京", "京タ", "タワ", "ワー", "ー"]
    assert search_document("東京タワー x") == " ".join(
        ["東京タワー", "x", *(GRAM_MARK + piece for piece in pieces)]
    )
    past = "a " * (MAX_SEARCHABLE_CHARS // 2) + "late"
    assert "late" not in search_document(past).split()


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet=st.characters(max_codepoint=127), max_size=300))
def test_an_ascii_document_is_the_words_of_the_rule(content: str) -> None:
    # search_document's own ASCII path (a byte table) against words(), the rule.
    assert search_document(content) == " ".join(words(content))


def test_a_query_keeps_the_words_no_other_implies_longest_first() -> None:
    parsed = parse_query("cap capital 日本 日本語 c 語")
    assert parsed is not None
    assert parsed.words == (
        QueryWord("capital", anywhere=False),
        QueryWord("日本語", anywhere=True),
    )
    assert parsed.prefix_terms == ("capital",)
    assert parsed.gram_terms == (f"{GRAM_MARK}日本", f"{GRAM_MARK}本語")


def test_short_words_of_scripts_without_spaces_are_prefix_terms_of_pieces() -> None:
    parsed = parse_query("キ")
    assert parsed is not None
    assert parsed.prefix_terms == (f"{GRAM_MARK}キ",)
    assert parsed.gram_terms == ()


@pytest.mark.parametrize("query", ["", "   ", "@@@", "\x00", "\ud800", "-", '"', "*"])
def test_a_query_without_words_is_none(query: str) -> None:
    assert parse_query(query) is None


def test_only_the_longest_words_become_index_terms() -> None:
    query = " ".join(f"w{n:03d}" + "x" * (n % 7) for n in range(MAX_QUERY_WORDS))
    parsed = parse_query(query)
    assert parsed is not None
    assert len(parsed.words) == MAX_QUERY_WORDS
    assert len(parsed.prefix_terms) == MAX_INDEXED_WORDS
    assert min(map(len, parsed.prefix_terms)) >= max(len(w.text) for w in parsed.words[32:])


def test_a_query_of_more_distinct_words_than_a_search_takes_is_refused() -> None:
    """Found by attack: each word is tested on every candidate, so a pasted vocabulary
    of 3,000 words took seconds. Words another word implies do not count."""
    words = [f"word{n:03d}" for n in range(MAX_QUERY_WORDS)]
    implied = [word[:-1] for word in words]  # each begins a word of the query
    parsed = parse_query(" ".join(words + implied))
    assert parsed is not None and len(parsed.words) == MAX_QUERY_WORDS
    with pytest.raises(InvalidDataError, match="65 distinct words; a search takes at most 64"):
        parse_query(" ".join([*words, "another"]))


def test_a_query_whose_words_pass_the_bytes_a_search_takes_is_refused() -> None:
    """Found by attack: a word of 300,000 Han characters against a message of one 1 MiB
    word took 23 s on SQLite and over 6 minutes on PostgreSQL. The bound counts the
    normalised words' UTF-8, those another word implies left out."""
    han = "漢" * (MAX_QUERY_BYTES // 3)  # 3 bytes each
    parsed = parse_query(f"{han} {han[:-1]} {han[1:]} {'ﬁ' * (MAX_QUERY_BYTES % 3 // 2)}")
    assert parsed is not None
    assert sum(len(word.text.encode()) for word in parsed.words) == MAX_QUERY_BYTES
    with pytest.raises(InvalidDataError, match=r"a word of 513 bytes \(UTF-8, normalised\)"):
        parse_query("x" * (MAX_QUERY_BYTES + 1))
    with pytest.raises(InvalidDataError, match="a word of 900000 bytes"):
        parse_query("漢" * 300_000)
    many = " ".join(f"{n:02d}" + "y" * 14 for n in range(MAX_QUERY_BYTES // 16))
    assert parse_query(many) is not None
    with pytest.raises(
        InvalidDataError, match=f"33 words of 528 bytes in all.*at most {MAX_QUERY_BYTES} bytes"
    ):
        parse_query(f"{many} z{'y' * 15}")
    # Counted after normalising: U+337F (3 bytes) is 株式会社 (12), so 43 of them hold 516.
    with pytest.raises(InvalidDataError, match="a word of 516 bytes"):
        parse_query("\u337f" * 43)


# Texts whose words often meet: a few ASCII words, look-alikes and other scripts.
_PIECES = st.sampled_from(
    [
        "cat",
        "Cat",
        "catalog",
        "dog",
        "1",
        "_",
        " ",
        ".",
        "-",
        "Ｃａｔ",
        "ca\u0301t",
        "日本",
        "ß",
        "x" * 5,
    ]
)
_TEXTS = st.lists(st.one_of(_PIECES, st.characters(codec="utf-8")), max_size=12).map("".join)


@settings(max_examples=400, deadline=None)
@given(_TEXTS, _TEXTS)
def test_matching_a_content_is_matching_its_document(content: str, query: str) -> None:
    parsed = parse_query(query)
    assume(parsed is not None)
    assert parsed is not None
    expected = parsed.matches(search_document(content))
    assert parsed.matches_content(content) is expected


def test_matching_a_long_ascii_content_looks_only_as_far_as_its_document() -> None:
    content = "a" * MAX_SEARCHABLE_CHARS + " zebra"
    parsed = parse_query("zebra")
    assert parsed is not None
    assert parsed.matches(search_document(content)) is False
    assert parsed.matches_content(content) is False
    assert parsed.matches_content("Zebra crossing") is True
    assert parsed.matches_content("a zebr") is False
    assert parsed.matches_content("2zebra zebrafish") is True
    assert parsed.matches_content("2zebra") is False
    assert parsed.matches_content("snake_zebra") is True


def test_matching_a_long_ascii_content_reads_it_about_once() -> None:
    """Found by measuring: after each occurrence that followed a letter the search went
    on one character on, so a word of 512 letters took 5.9 s on a pending message of
    2^20 letters (an 8-letter word 0.5 s)."""
    parsed = parse_query("A" * MAX_QUERY_BYTES)
    assert parsed is not None
    content = "b" + "a" * (MAX_SEARCHABLE_CHARS - 1)
    start = time.perf_counter()
    assert parsed.matches_content(content) is False
    assert time.perf_counter() - start < 0.5  # 0.01 s here
    assert parsed.matches_content(content[: MAX_SEARCHABLE_CHARS // 2] + " " + "a" * 512)
    assert parsed.matches_content(("a" * 511 + "_") * 4 + "1" + "a" * 600) is False


def test_a_str_subclass_is_read_as_its_text() -> None:
    """Found by attack: a subclass's own isascii() or lower() decided its words."""

    class Sneaky(str):
        __slots__ = ()

        def isascii(self) -> bool:
            return False

        def lower(self) -> str:
            return "nothing"

        def casefold(self) -> str:
            return "nothing"

    assert words(Sneaky("Abc DÉF")) == words("Abc DÉF") == ["abc", "def"]
    assert parse_query(Sneaky("Abc")) == parse_query("Abc")


def test_a_long_spaceless_word_gives_at_most_max_gram_terms() -> None:
    word = "".join(chr(0x4E00 + n) for n in range(MAX_QUERY_BYTES // 3))
    parsed = parse_query(word)
    assert parsed is not None
    assert parsed.gram_terms == tuple(GRAM_MARK + word[i : i + 2] for i in range(MAX_GRAM_TERMS))
    assert parsed.matches(search_document("前" + word + "後"))
    assert not parsed.matches(search_document(word[:-1]))
