"""search_messages on every backend: the one rule, its filters, no syntax errors."""

from __future__ import annotations

from typing import Any

import pytest

from persistence import ChatSession, InvalidDataError, SessionStorage
from persistence.search import MAX_QUERY_BYTES

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
    "x" * MAX_QUERY_BYTES,  # the longest word a search takes
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
    assert await storage.search_messages("qu*") != []
    assert await storage.search_messages("qu* zzz") == []


@pytest.mark.parametrize(
    ("query", "content"),
    [
        ("capit", "The capital of France"),
        ("3.14", "pi is 3.14159"),
        ("14", "pi is 3.14"),
        ("alice", "mail alice@example.com"),
        ("example.com", "mail alice@example.com"),
        ("bin", "ls /usr/local/bin"),
        ("1.2.3", "upgrade to 1.2.3 now"),
        ("numbatword", "foo.bar.numbatword()"),
        ("alert", "<script>alert(1)</script>"),
        ("नमस्ते", "नमस्ते दुनिया"),
        ("日本語", "日本語のテキスト"),
        ("テキスト", "日本語のテキスト"),
        ("ecole", "École"),
        ("naïve", "nai\u0308ve"),
        ("full", "\uff26\uff55\uff4c\uff4c"),
        ("σοφια", "ΣΟΦΊΑ"),
        ("strasse", "Straße"),
    ],
)
async def test_search_finds_what_a_person_typed(
    storage: SessionStorage, query: str, content: str
) -> None:
    session = ChatSession.create("m")
    message = session.add_message("user", content)
    session.add_message("user", "something else entirely")
    await storage.save_session(session)

    found = await storage.search_messages(query)

    assert [m.message_id for m in found] == [message.message_id]


@pytest.mark.parametrize(
    ("query", "content"),
    [
        ("apital", "The capital of France"),
        ("2024", "東京2024年"),
        ("capitals", "The capital of France"),
        ("foo_bar", "foo bar"),
    ],
)
async def test_a_word_must_begin_a_word_of_the_message(
    storage: SessionStorage, query: str, content: str
) -> None:
    session = ChatSession.create("m")
    session.add_message("user", content)
    await storage.save_session(session)

    # foo_bar is two words, foo and bar: both begin words, so it is found.
    expected = 1 if query == "foo_bar" else 0
    assert len(await storage.search_messages(query)) == expected


async def test_search_within_one_session(storage: SessionStorage) -> None:
    first, second = ChatSession.create("m"), ChatSession.create("m")
    mine = [first.add_message("user", f"report draft {n}") for n in range(3)]
    second.add_message("user", "report final")
    await storage.save_session(first)
    await storage.save_session(second)

    found = await storage.search_messages("report", session_id=first.session_id)
    none = await storage.search_messages("report", session_id="no-such-session")

    assert [m.message_id for m in found] == [m.message_id for m in reversed(mine)]
    assert none == []


async def test_search_within_a_long_session_with_gaps_reads_on_past_every_window(
    storage: SessionStorage,
) -> None:
    """Matches spread over a history longer than a search's first windows, with the
    positions of removed messages unused, and another session's matches beside it."""
    session, other = ChatSession.create("m"), ChatSession.create("m")
    for n in range(1000):
        session.add_message("user", f"turn {n}" + (" needle" if n % 97 == 0 else ""))
    session.rewind(session.messages[599].message_id)  # positions 600-999 stay unused
    for n in range(1000, 1700):
        session.add_message("user", f"turn {n}" + (" needle" if n % 97 == 0 else ""))
    for n in range(300):
        other.add_message("user", f"needle elsewhere {n}")
    await storage.save_session(session)
    await storage.save_session(other)
    newest_first = list(reversed(session.messages))
    matching = [m.message_id for m in newest_first if "needle" in m.content]
    assert len(matching) == 14

    for limit in (1, 5, 14, 50):
        found = await storage.search_messages("needle", limit, session_id=session.session_id)
        assert [m.message_id for m in found] == matching[:limit]
    common = await storage.search_messages("turn", 300, session_id=session.session_id)
    assert [m.message_id for m in common] == [m.message_id for m in newest_first[:300]]


async def test_search_by_role(storage: SessionStorage) -> None:
    session = ChatSession.create("m")
    asked = session.add_message("user", "how do I deploy?")
    answered = session.add_message("assistant", "deploy with the script")
    session.add_message("tool", "deploy log")
    await storage.save_session(session)

    users = await storage.search_messages("deploy", role="user")
    assistants = await storage.search_messages(
        "deploy", role="assistant", session_id=session.session_id
    )

    assert [m.message_id for m in users] == [asked.message_id]
    assert [m.message_id for m in assistants] == [answered.message_id]
    assert await storage.search_messages("deploy", role="system") == []


async def test_an_unknown_role_or_negative_limit_is_refused(storage: SessionStorage) -> None:
    with pytest.raises(InvalidDataError, match="role"):
        await storage.search_messages("x", role="robot")
    with pytest.raises(InvalidDataError, match="limit"):
        await storage.search_messages("x", limit=-1)


async def test_newest_first_across_sessions_and_the_limit(storage: SessionStorage) -> None:
    older, newer = ChatSession.create("m"), ChatSession.create("m")
    kept = []
    for n in range(4):
        kept.append(older.add_message("user", f"topic {n}"))
    await storage.save_session(older)
    for n in range(4):
        kept.append(newer.add_message("user", f"topic {n + 4}"))
    await storage.save_session(newer)

    found = await storage.search_messages("topic", limit=5)

    assert [m.message_id for m in found] == [m.message_id for m in reversed(kept)][:5]


async def test_newest_first_is_the_order_stored_not_the_order_made(
    storage: SessionStorage,
) -> None:
    # Found by review: MongoDB sorted by the time add_message ran, so a session saved
    # after another, its messages made first, came out behind the other's.
    made_first, made_second = ChatSession.create("m"), ChatSession.create("m")
    early = made_first.add_message("user", "topic early")
    late = made_second.add_message("user", "topic late")
    await storage.save_session(made_second)
    await storage.save_session(made_first)

    found = await storage.search_messages("topic", limit=1)
    both = await storage.search_messages("topic")

    assert [m.message_id for m in found] == [early.message_id]
    assert [m.message_id for m in both] == [early.message_id, late.message_id]


@pytest.mark.parametrize("query", [None, 123, b"hello", ["hello"]])
async def test_a_query_that_is_not_a_string_is_refused(storage: SessionStorage, query: Any) -> None:
    with pytest.raises(InvalidDataError, match="query: must be a string"):
        await storage.search_messages(query)


async def test_a_query_of_more_words_than_a_search_takes_is_refused_alike(
    storage: SessionStorage,
) -> None:
    session = ChatSession.create("m")
    words = [f"term{n:02d}" for n in range(64)]
    session.add_message("user", " ".join(words))
    await storage.save_session(session)

    assert len(await storage.search_messages(" ".join(words))) == 1
    with pytest.raises(InvalidDataError, match="65 distinct words"):
        await storage.search_messages(" ".join([*words, "extra"]))


async def test_a_query_of_longer_words_than_a_search_takes_is_refused_alike(
    storage: SessionStorage,
) -> None:
    """Found by attack: a word of 300,000 Han characters against a message of one 1 MiB
    word took 23 s on SQLite and over 6 minutes on PostgreSQL."""
    han = "東京" * (MAX_QUERY_BYTES // 6)  # 170 characters, 510 bytes
    latin = "z" * MAX_QUERY_BYTES
    session = ChatSession.create("m")
    session.add_message("user", f"日本{han}語 and ok")
    session.add_message("user", f"{latin}z")
    await storage.save_session(session)

    # At the bound: found (past PostgreSQL's 200-character terms, inside a longer word).
    found = await storage.search_messages(f"{han} OK")
    assert [m.message_id for m in found] == [session.messages[0].message_id]
    found = await storage.search_messages(latin.upper())
    assert [m.message_id for m in found] == [session.messages[1].message_id]
    for query in (f"{han} and", f"{latin}z", "漢" * 300_000):
        with pytest.raises(InvalidDataError, match=f"a search takes at most {MAX_QUERY_BYTES}"):
            await storage.search_messages(query)


async def test_letters_newer_than_pythons_unicode_are_found_as_typed(
    storage: SessionStorage,
) -> None:
    """`regex` classifies with a newer Unicode than Python's unicodedata normalises with
    (README, "Search"): such letters are words, found as typed on every backend."""
    garay = "\U00010d50\U00010d51\U00010d52"  # capitals, Unicode 16.0
    han = "\U00031350\U00031351\U00031352"  # CJK Extension H, Unicode 15.0
    kawi = "\U00011f04\U00011f05"  # Unicode 15.0
    session = ChatSession.create("m")
    session.add_message("user", f"{garay} x{han}y {kawi}")
    await storage.save_session(session)

    for query in (garay, garay[:2], han[1:], kawi, f"{kawi[0]} X"):
        found = await storage.search_messages(query)
        assert [m.message_id for m in found] == [session.messages[0].message_id], query
    assert await storage.search_messages(garay[1:]) == []


async def test_a_session_id_no_backend_can_store_finds_nothing_alike(
    storage: SessionStorage,
) -> None:
    # Found by attack: PostgreSQL raised a driver error for a NUL, SQLite answered [].
    session = ChatSession.create("m")
    session.add_message("user", "hello there")
    await storage.save_session(session)

    for unstorable in ("\x00", "a\x00b", "\ud800", "x" * 256):
        assert await storage.search_messages("hello", session_id=unstorable) == []
    with pytest.raises(InvalidDataError, match="session_id: must be a string"):
        await storage.search_messages("hello", session_id=123)  # type: ignore[arg-type]
    assert len(await storage.search_messages("hello", session_id=session.session_id)) == 1
