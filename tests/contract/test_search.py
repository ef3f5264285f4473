"""Full-text search with each backend's own engine: plain words, no syntax errors."""

from __future__ import annotations

import pytest

from persistence import ChatSession, SessionStorage

HOSTILE = [
    "",
    "   ",
    '"',
    '"unbalanced',
    "*",
    "foo*",
    "-",
    "-foo",
    "NEAR",
    "NEAR(foo bar)",
    "foo NEAR/2 bar",
    ":",
    "content:foo",
    "(",
    ")",
    "(foo OR bar",
    "AND",
    "OR NOT",
    "foo & | ! bar",
    "'; DROP TABLE chat_messages; --",
    "\\",
    "^foo",
    "{foo}",
    "\x00",
    "foo\x00bar",
    "\ud800",
    "🙂",
    "x" * 10_000,
    " ".join(["word"] * 500),
]


@pytest.fixture
async def searchable(storage: SessionStorage) -> ChatSession:
    session = ChatSession.create("m")
    session.add_message("user", "The quick brown fox jumps over the lazy dog")
    session.add_message("assistant", "A QUICK reply about databases")
    session.add_message("user", "nothing to see here")
    session.add_message("tool", "Ünïcödé wörds and emoji 🙂 work too")
    await storage.save_session(session)
    return session


async def test_search_matches_words_case_insensitively(
    storage: SessionStorage, searchable: ChatSession
) -> None:
    found = await storage.search_messages("quick")

    assert {m.content for m in found} == {
        "The quick brown fox jumps over the lazy dog",
        "A QUICK reply about databases",
    }


async def test_search_requires_every_word(storage: SessionStorage, searchable: ChatSession) -> None:
    found = await storage.search_messages("quick fox")

    assert [m.content for m in found] == ["The quick brown fox jumps over the lazy dog"]


async def test_search_returns_newest_first_and_honours_the_limit(
    storage: SessionStorage, searchable: ChatSession
) -> None:
    found = await storage.search_messages("QUICK", limit=1)

    assert [m.content for m in found] == ["A QUICK reply about databases"]
    assert found[0] == searchable.messages[1]


async def test_search_handles_unicode_words(
    storage: SessionStorage, searchable: ChatSession
) -> None:
    found = await storage.search_messages("wörds")

    assert [m.message_id for m in found] == [searchable.messages[3].message_id]


@pytest.mark.parametrize("query", HOSTILE, ids=lambda q: repr(q)[:30])
async def test_search_never_raises_on_user_text(
    storage: SessionStorage, searchable: ChatSession, query: str
) -> None:
    found = await storage.search_messages(query)

    assert isinstance(found, list)


async def test_syntax_words_do_not_match_by_accident(
    storage: SessionStorage, searchable: ChatSession
) -> None:
    assert await storage.search_messages("NEAR(quick lazy)") == []
    assert await storage.search_messages("quick OR nothing") == []
    assert await storage.search_messages("-quick") != []
