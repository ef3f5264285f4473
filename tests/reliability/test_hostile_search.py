"""search_messages with any text: never matches by accident of syntax, and raises only
for a query of more than MAX_QUERY_WORDS distinct words, or words of more than
MAX_QUERY_BYTES bytes.

The corpus is built from a small vocabulary that includes the operators of FTS5 and
tsquery as plain words (and, or, not, near) and words that extend others (alphabet,
betamax), so an operator or a prefix read as syntax changes the result. Every query's
expected hits come from the rule's oracle (tests/search/oracle.py).
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from persistence import ChatSession, InvalidDataError
from persistence.search import MAX_QUERY_BYTES, MAX_QUERY_WORDS, parse_query, words
from tests.reliability.conftest import Figures, Scale
from tests.reliability.hostile import SYNTAX, any_text
from tests.reliability.support import Backends
from tests.search import oracle

pytestmark = [pytest.mark.sqlite, pytest.mark.postgresql]

# No k, s or i: no case folding (Kelvin sign, long s, dotless i) can reach these words.
VOCABULARY = ["alpha", "alphabet", "beta", "betamax", "gamma", "delta", "and", "or", "not"]
VOCABULARY += ["near", "zeta9", "omega", "1", "42"]


@pytest.fixture(scope="module")
def corpus(backends: Backends) -> Iterator[dict[str, frozenset[str]]]:
    """Saves the corpus on both backends; yields message id -> its words (the oracle's)."""
    rng = random.Random(7)
    session = ChatSession.create("search", session_id="corpus")
    words: dict[str, frozenset[str]] = {}
    for _ in range(45):
        chosen = rng.sample(VOCABULARY, rng.randint(1, 5))
        content = " ".join(w.upper() if rng.random() < 0.3 else w for w in chosen)
        words[session.add_message("user", content).message_id] = oracle.searchable_words(content)

    async def save() -> None:
        for storage in backends.storages:
            await storage.save_session(session)

    backends.run(save())
    yield words


def _expected(corpus: dict[str, frozenset[str]], query: str) -> set[str]:
    wanted = oracle.words(query)
    return {mid for mid, held in corpus.items() if oracle.matches_words(wanted, held)}


def _search_both(backends: Backends, query: str, limit: int = 50) -> dict[str, set[str]]:
    async def search() -> dict[str, set[str]]:
        found = {}
        for storage in backends.storages:
            results = await storage.search_messages(query, limit=limit)
            found[storage.backend_name] = {m.message_id for m in results}
        return found

    result: dict[str, set[str]] = backends.run(search())
    return result


# parse_query's two refusals: too many distinct words, or words too long in all.
_REFUSED = f"distinct words|a search takes at most {MAX_QUERY_BYTES} bytes"

queries = st.lists(
    st.one_of(
        st.sampled_from(VOCABULARY).map(lambda w: w.upper()),
        st.sampled_from(VOCABULARY),
        st.sampled_from(SYNTAX),
        any_text,
    ),
    max_size=10,
).flatmap(lambda parts: st.sampled_from(["", " "]).map(lambda sep: sep.join(parts)))


def test_any_query_matches_exactly_the_messages_with_its_words(
    backends: Backends, corpus: dict[str, frozenset[str]], scale: Scale, figures: Figures
) -> None:
    tried = refused = 0

    @settings(
        max_examples=scale.n(100, 3000),
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(queries)
    def check(query: str) -> None:
        nonlocal tried, refused
        tried += 1
        try:
            parse_query(query)
        except InvalidDataError:
            # Too many words, or too long: refused alike, the only refusals.
            for storage in backends.storages:
                with pytest.raises(InvalidDataError, match=_REFUSED):
                    backends.run(storage.search_messages(query))
            refused += 1
            return
        expected = _expected(corpus, query)
        assert _search_both(backends, query) == {"sqlite": expected, "postgresql": expected}, query

    check()
    figures["queries_tried"] = tried
    figures["checked_exactly"] = tried - refused
    figures["refused_for_too_many_or_too_long_words"] = refused
    figures["matched_by_syntax"] = 0


@pytest.mark.parametrize(
    ("query", "words"),
    [
        ("alpha OR beta", ["alpha", "or", "beta"]),
        ("alpha NOT beta", ["alpha", "not", "beta"]),
        ("alpha*", ["alpha"]),
        ("alph*", ["alph"]),
        ("alph", ["alph"]),
        ("bet gam", ["bet", "gam"]),
        ("ALPHA_BETA", ["alpha", "beta"]),
        ("alpha:*", ["alpha"]),
        ("-beta", ["beta"]),
        ('"alpha beta"', ["alpha", "beta"]),
        ("NEAR(alpha beta)", ["near", "alpha", "beta"]),
        ("alpha & !beta", ["alpha", "beta"]),
        ("alpha <-> beta", ["alpha", "beta"]),
        ("(alpha | beta)", ["alpha", "beta"]),
        ("alpha\x00beta", ["alpha", "beta"]),
        ("'; DROP TABLE chat_messages; --", ["drop", "table", "chat", "messages"]),
        ('"', []),
        ("", []),
        ("\ud800alpha", ["alpha"]),
    ],
)
def test_operator_and_prefix_syntax_is_read_as_plain_words(
    backends: Backends, corpus: dict[str, frozenset[str]], query: str, words: list[str]
) -> None:
    assert oracle.words(query) == words
    # A query word begins a word of the message: `alph` finds alpha and alphabet.
    expected = {
        mid
        for mid, held in corpus.items()
        if words and all(any(h.startswith(w) for h in held) for w in words)
    }
    assert _search_both(backends, query) == {"sqlite": expected, "postgresql": expected}


def test_a_megabyte_query_keeps_its_meaning_or_is_refused_alike(
    backends: Backends, corpus: dict[str, frozenset[str]]
) -> None:
    """Refused alike on both backends: more than MAX_QUERY_WORDS distinct words, or
    words of more than MAX_QUERY_BYTES bytes."""
    rng = random.Random(3)
    garbage = "".join(rng.choice(SYNTAX) for _ in range(200_000))
    parsed = [word for word in words(garbage) if word]
    assert len(parsed) > MAX_QUERY_WORDS  # the syntax holds more words than that
    refusals = []
    for storage in backends.storages:
        with pytest.raises(InvalidDataError, match="distinct words") as refused:
            backends.run(storage.search_messages(garbage))
        refusals.append(str(refused.value))
    assert refusals[0] == refusals[1]
    few = "".join(rng.choice(SYNTAX[:4]) for _ in range(200_000))
    expected = _expected(corpus, few)
    assert _search_both(backends, few) == {"sqlite": expected, "postgresql": expected}
    expected = _expected(corpus, "alpha")
    found = _search_both(backends, "alpha " * 200_000)
    assert found == {"sqlite": expected, "postgresql": expected}
    refusals = []
    for storage in backends.storages:
        with pytest.raises(InvalidDataError, match=_REFUSED) as refused:
            backends.run(storage.search_messages("alpha" * 200_000))
        refusals.append(str(refused.value))
    assert refusals[0] == refusals[1]
