# ruff: noqa: RUF001  # look-alike characters (full-width, dotless i) are the point here
"""One corpus, every backend, every query: the hits equal the rule's, in stored order.

The expected hits come from tests/search/oracle.py, the rule written again from
shared/API.md; the corpus holds what issue 12 found missed or split differently
(numbers, emails, paths, versions, code, HTML, CJK, Thai, Devanagari, accents,
decomposed and full-width forms, a 300,000-character message).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from persistence import ChatSession
from tests.search import oracle
from tests.search.conftest import Stores, opened_stores

pytestmark = [pytest.mark.sqlite, pytest.mark.postgresql]

LONG_WORD = "x" * 150 + "supercalifragilistic" * 5
HAN = random.Random(12)
# Distinct ideographs enough that PostgreSQL's terms pass 1 MB (indexed as overflow).
OVERFLOW_TEXT = "".join(chr(HAN.randrange(0x4E00, 0x9FFF)) for _ in range(300_000))

CORPUS: list[tuple[str, str]] = [
    ("user", "Pi is 3.14 and e is 2.718; call -5 or +1 (555) 010-9999"),
    ("assistant", "Write to alice@example.com or Bob.Smith@Example.ORG"),
    ("user", "ls /usr/local/bin && cat C:\\Windows\\System32\\drivers\\etc\\hosts"),
    ("assistant", "Upgrade from 1.2.3 to v2.0.0-rc.1 (see CHANGELOG.md)"),
    ("tool", "foo.bar.numbatword(); snake_case_name = camelCaseName + 1"),
    ("assistant", '<script>alert(1)</script><p class="note">Hello&nbsp;world</p>'),
    ("user", "日本語のテキストを検索します。東京2024年"),
    ("assistant", "中文搜索测试，北京欢迎你"),
    ("user", "ภาษาไทยไม่มีการเว้นวรรคระหว่างคำ"),
    ("assistant", "नमस्ते दुनिया, यह हिंदी है"),
    ("user", "École, über, naïve, façade, Ångström, ñandú, Øresund, Łódź"),
    ("assistant", "nai\u0308ve cafe\u0301 decomposed forms"),
    ("user", "Ｆｕｌｌ－ｗｉｄｔｈ ＡＢＣ １２３ ｶﾀｶﾅ"),
    ("assistant", "σοφία ΣΟΦΙΑ Ελληνικά и Йогурт, ёжик, Москва"),
    ("user", "The capital of France is Paris; capitalism; CAPITULATE"),
    ("tool", "Straße STRASSE ﬁx ﬂow Ⅻ ① ½ ㎏ ™"),
    ("user", "한국어 검색 테스트 안녕하세요"),
    ("assistant", "مرحبا بالعالم العربية"),
    ("user", "emoji 🙂 glued🙂word and ZWJ 👩‍💻 coder"),
    ("assistant", f"long {LONG_WORD} token"),
    ("user", "filler " * 43_000 + "needleattheend"),
    ("assistant", "x" * (oracle.SEARCHABLE - 3) + " beyondthelimit"),
    ("tool", OVERFLOW_TEXT + " overflowmarker 尾巴"),
    ("user", 'NEAR AND OR NOT "quoted" (paren) col:value -minus *star'),
    ("assistant", "İstanbul ıi I i KELVIN K sign"),
    ("user", ""),
]

QUERIES = [
    "3.14",
    "14",
    "3",
    "718",
    "-5",
    "555",
    "alice",
    "example.com",
    "alice@example.com",
    "bob.smith",
    "usr",
    "/usr/local/bin",
    "bin",
    "windows system32",
    "1.2.3",
    "v2",
    "rc",
    "changelog",
    "numbatword",
    "foo.bar.numbatword()",
    "snake",
    "case",
    "camelcasename",
    "alert",
    "<script>",
    "nbsp",
    "日本語",
    "本語",
    "テキスト",
    "キ",
    "日本語のテキスト",
    "検索",
    "2024年",
    "2024",
    "東京2024",
    "北京",
    "中文搜",
    "ไทย",
    "ภาษา",
    "วรรค",
    "नमस्ते",
    "नम",
    "हिंदी",
    "école",
    "ecole",
    "ECOLE",
    "über",
    "uber",
    "naïve",
    "nai\u0308ve",
    "naive",
    "cafe",
    "café",
    "facade",
    "angstrom",
    "nandu",
    "øresund",
    "oresund",
    "lodz",
    "łódź",
    "Ｆｕｌｌ",
    "full width",
    "abc",
    "123",
    "カタカナ",
    "ｶﾀ",
    "σοφια",
    "ΣΟΦΊΑ",
    "ελληνικα",
    "иогурт",
    "йогурт",
    "ежик",
    "москва",
    "capit",
    "capital",
    "cap",
    "CAPITULATE",
    "capitalism paris",
    "strasse",
    "straße",
    "fix",
    "flow",
    "xii",
    "kg",
    "tm",
    "½",
    "한국",
    "안녕",
    "مرحبا",
    "🙂",
    "glued",
    "word",
    "coder",
    "x" * 150,
    LONG_WORD[:220],
    LONG_WORD,
    LONG_WORD + "s",
    "x" * 201 + "nope",
    "needleattheend",
    "needle",
    "beyondthelimit",
    "overflowmarker",
    "尾巴",
    OVERFLOW_TEXT[1000:1002],
    OVERFLOW_TEXT[5000:5010],
    OVERFLOW_TEXT[:3] + "尾巴",
    "NEAR",
    "near and",
    '"quoted"',
    "col:value",
    "-minus",
    "*star",
    "istanbul",
    "İstanbul",
    "kelvin k",
    "",
    "   ",
    "@@@",
    "\x00",
    "\ud800",
    "nothing matches this",
    "filler needleattheend",
]


@dataclass(frozen=True)
class Corpus:
    ids: list[str]  # stored order
    roles: dict[str, str]
    sessions: dict[str, str]
    words: dict[str, frozenset[str]]

    def expected(
        self, query: str, limit: int = 50, session_id: str | None = None, role: str | None = None
    ) -> list[str]:
        wanted = oracle.words(query)
        hits = [
            message_id
            for message_id in reversed(self.ids)
            if oracle.matches_words(wanted, self.words[message_id])
            and (session_id is None or self.sessions[message_id] == session_id)
            and (role is None or self.roles[message_id] == role)
        ]
        return hits[:limit]


# How the corpus is written and searched: documents written before any search
# (index_for_search); left pending by the saves (persistence.sql.indexing), then written
# by the first search; or still pending, searched by stores opened for reading, which
# test the pending messages one by one.
WRITES = ["documents-indexed", "pending-first-search-indexes", "pending-read-only"]


@pytest.fixture(scope="module", params=WRITES)
def stores(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    postgresql_admin_url: str,
) -> Iterator[Stores]:
    """Stores of their own for each way of writing the corpus."""
    with opened_stores(tmp_path_factory, postgresql_admin_url) as opened:
        opened.writes = request.param
        yield opened


@pytest.fixture(scope="module")
def corpus(stores: Stores) -> Iterator[Corpus]:
    first = ChatSession.create("parity", session_id="parity-1")
    second = ChatSession.create("parity", session_id="parity-2")
    for index, (role, content) in enumerate(CORPUS):
        (first if index % 3 else second).add_message(role, content)
    stores.save(first, second, unit_of_work=True)
    messages = len(first.messages) + len(second.messages)
    if stores.writes == "documents-indexed":
        stores.index_for_search()
    # Only SQLite leaves documents pending (persistence.sql.indexing.defers).
    pending = 0 if stores.writes == "documents-indexed" else messages
    assert stores.pending() == {"sqlite": pending, "postgresql": 0}
    if stores.writes == "pending-read-only":
        stores.read_only()
    messages = [*first.messages, *second.messages]
    yield Corpus(
        ids=[m.message_id for m in messages],
        roles={m.message_id: m.role for m in messages},
        sessions={m.message_id: m.session_id for m in messages},
        words={m.message_id: oracle.searchable_words(m.content) for m in messages},
    )


@pytest.mark.parametrize("query", QUERIES, ids=lambda q: repr(q)[:40])
def test_every_backend_finds_exactly_what_the_rule_says(
    stores: Stores, corpus: Corpus, query: str
) -> None:
    expected = corpus.expected(query)

    found = stores.search(query)

    assert found == {name: expected for name in found}


@pytest.mark.parametrize("query", ["capit", "naive", "日本語", "3", "x"])
@pytest.mark.parametrize("role", ["user", "assistant", "tool", "system"])
def test_role_filter_agrees_with_the_rule(
    stores: Stores, corpus: Corpus, query: str, role: str
) -> None:
    expected = corpus.expected(query, role=role)

    found = stores.search(query, role=role)

    assert found == {name: expected for name in found}


@pytest.mark.parametrize("query", ["capit", "e", "日本語", "x", "needleattheend"])
@pytest.mark.parametrize("session_id", ["parity-1", "parity-2", "missing"])
@pytest.mark.parametrize("limit", [1, 3, 50])
def test_session_filter_and_limit_agree_with_the_rule(
    stores: Stores, corpus: Corpus, query: str, session_id: str, limit: int
) -> None:
    expected = corpus.expected(query, limit=limit, session_id=session_id)

    found = stores.search(query, session_id=session_id, limit=limit)

    assert found == {name: expected for name in found}


@pytest.mark.parametrize("query", ["capit", "e", "日本語", "x", "3", "beyondthelimit"])
@pytest.mark.parametrize("session_id", [None, "parity-1"])
@pytest.mark.parametrize(("batch_size", "limit"), [(1, None), (2, 5), (7, None), (500, 3)])
def test_batches_of_a_search_agree_with_the_rule(
    stores: Stores,
    corpus: Corpus,
    query: str,
    session_id: str | None,
    batch_size: int,
    limit: int | None,
) -> None:
    expected = corpus.expected(query, limit=limit or len(corpus.ids), session_id=session_id)

    found = stores.pages(query, batch_size, session_id=session_id, limit=limit)

    for name, batches in found.items():
        assert [m for batch in batches for m in batch] == expected, name
        assert all(0 < len(batch) <= batch_size for batch in batches), name


def test_the_corpus_exercises_what_the_issue_found_missed(corpus: Corpus) -> None:
    # The oracle agrees with the examples of shared/API.md and issue 12, so the
    # comparisons above test the rule, not an accident of the oracle.
    by_query = {query: len(corpus.expected(query)) for query in QUERIES}
    for query in ("3.14", "14", "alice", "example.com", "usr", "bin", "1.2.3", "-5"):
        assert by_query[query] >= 1, query
    for query in ("numbatword", "alert", "नमस्ते", "日本語", "capit", "needleattheend"):
        assert by_query[query] >= 1, query
    for query in ("école", "über", "σοφία", "nai\u0308ve", "Ｆｕｌｌ", "overflowmarker"):
        assert by_query.get(query, len(corpus.expected(query))) >= 1, query
    assert by_query["beyondthelimit"] == 0
    assert by_query[""] == by_query["@@@"] == 0


def test_searches_index_what_is_pending_unless_they_only_read(
    stores: Stores, corpus: Corpus
) -> None:
    stores.search("capit")

    left = len(corpus.ids) if stores.writes == "pending-read-only" else 0
    assert stores.pending() == {"sqlite": left, "postgresql": 0}
