"""search_messages with any text: never raises, never matches by accident of syntax.

The corpus is built from a small vocabulary that includes the operators of FTS5 and
tsquery as plain words (and, or, not, near) and words that extend others (alphabet,
betamax), so an operator or a prefix read as syntax changes the result.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from persistence import ChatSession
from tests.reliability.conftest import Figures, Scale
from tests.reliability.hostile import SYNTAX, any_text
from tests.reliability.support import Backends

pytestmark = [pytest.mark.sqlite, pytest.mark.postgresql]

# No k, s or i: no case folding (Kelvin sign, long s, dotless i) can reach these words.
VOCABULARY = ["alpha", "alphabet", "beta", "betamax", "gamma", "delta", "and", "or", "not"]
VOCABULARY += ["near", "zeta9", "omega", "1", "42"]
_CLEAN_WORD = re.compile(r"[A-Za-z0-9]+")


@pytest.fixture(scope="module")
def corpus(backends: Backends) -> Iterator[dict[str, set[str]]]:
    """Saves the corpus on both backends; yields message id -> its lower-cased words."""
    rng = random.Random(7)
    session = ChatSession.create("search", session_id="corpus")
    words: dict[str, set[str]] = {}
    for _ in range(45):
        chosen = rng.sample(VOCABULARY, rng.randint(1, 5))
        content = " ".join(w.upper() if rng.random() < 0.3 else w for w in chosen)
        words[session.add_message("user", content).message_id] = {w.lower() for w in chosen}

    async def save() -> None:
        for storage in backends.storages:
            await storage.save_session(session)

    backends.run(save())
    yield words


def _query_words(query: str) -> list[str] | None:
    """The words a person typed, when each is plain ASCII letters and digits; else None."""
    words = re.findall(r"\w+", query.replace("\x00", " "))
    if len(words) > 32 or not all(_CLEAN_WORD.fullmatch(w) for w in words):
        return None
    return [w.lower() for w in words]


def _search_both(backends: Backends, query: str, limit: int = 50) -> dict[str, set[str]]:
    async def search() -> dict[str, set[str]]:
        found = {}
        for storage in backends.storages:
            results = await storage.search_messages(query, limit=limit)
            found[storage.backend_name] = {m.message_id for m in results}
        return found

    result: dict[str, set[str]] = backends.run(search())
    return result


queries = st.lists(
    st.one_of(
        st.sampled_from(VOCABULARY).map(lambda w: w.upper()),
        st.sampled_from(VOCABULARY),
        st.sampled_from(SYNTAX),
        any_text,
    ),
    max_size=10,
).flatmap(lambda parts: st.sampled_from(["", " "]).map(lambda sep: sep.join(parts)))


def test_any_query_never_raises_and_matches_exactly_the_messages_with_its_words(
    backends: Backends, corpus: dict[str, set[str]], scale: Scale, figures: Figures
) -> None:
    tried = exact = 0

    @settings(
        max_examples=scale.n(100, 3000),
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(queries)
    def check(query: str) -> None:
        nonlocal tried, exact
        tried += 1
        found = _search_both(backends, query)
        words = _query_words(query)
        if words is not None:
            exact += 1
            expected = (
                {mid for mid, held in corpus.items() if set(words) <= held} if words else set()
            )
            assert found == {"sqlite": expected, "postgresql": expected}, (query, words)
        else:
            # Words with other characters: whatever matches holds every ASCII part.
            parts = {p.lower() for w in re.findall(r"\w+", query) for p in _CLEAN_WORD.findall(w)}
            for backend, ids in found.items():
                for mid in ids:
                    assert parts <= corpus[mid], (backend, query, mid)

    check()
    figures["queries_tried"] = tried
    figures["checked_exactly"] = exact
    figures["raised"] = 0
    figures["matched_by_syntax"] = 0


@pytest.mark.parametrize(
    ("query", "words"),
    [
        ("alpha OR beta", ["alpha", "or", "beta"]),
        ("alpha NOT beta", ["alpha", "not", "beta"]),
        ("alpha*", ["alpha"]),
        ("alph*", ["alph"]),
        ("alpha:*", ["alpha"]),
        ("-beta", ["beta"]),
        ('"alpha beta"', ["alpha", "beta"]),
        ("NEAR(alpha beta)", ["near", "alpha", "beta"]),
        ("alpha & !beta", ["alpha", "beta"]),
        ("alpha <-> beta", ["alpha", "beta"]),
        ("(alpha | beta)", ["alpha", "beta"]),
        ("alpha\x00beta", ["alpha", "beta"]),
        ("'; DROP TABLE chat_messages; --", []),
        ('"', []),
        ("", []),
        ("\ud800alpha", ["alpha"]),
    ],
)
def test_operator_and_prefix_syntax_is_read_as_plain_words(
    backends: Backends, corpus: dict[str, set[str]], query: str, words: list[str]
) -> None:
    expected = {mid for mid, held in corpus.items() if set(words) <= held} if words else set()
    assert _search_both(backends, query) == {"sqlite": expected, "postgresql": expected}


def test_a_megabyte_query_never_raises_and_keeps_its_meaning(
    backends: Backends, corpus: dict[str, set[str]]
) -> None:
    rng = random.Random(3)
    garbage = "".join(rng.choice(SYNTAX) for _ in range(200_000))
    for backend, ids in _search_both(backends, garbage).items():
        assert all(corpus[mid] for mid in ids), backend
    expected = {mid for mid, held in corpus.items() if "alpha" in held}
    found = _search_both(backends, "alpha " * 200_000)
    assert found == {"sqlite": expected, "postgresql": expected}
