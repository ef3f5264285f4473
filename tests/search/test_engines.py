"""What each SQL engine does with a search: plans, limits, locales, big messages."""

from __future__ import annotations

import random
import uuid
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import text

from persistence import ChatSession, InvalidDataError, PostgreSQLSessionStorage, SessionStorage
from persistence.search import MAX_GRAM_TERMS, MAX_QUERY_BYTES, QueryWord, parse_query
from persistence.sql import search as search_module
from persistence.sql.backend import SqlSessionStorage
from persistence.sql.runner import traced
from persistence.sql.search import PROBE_ROWS
from persistence.sql.search_statements import (
    INLINE_WORDS,
    Shape,
    index_statement,
    scan_statement,
    word_parameters,
)
from tests import servers
from tests.search.test_parity import OVERFLOW_TEXT


async def _fill(
    storage: SessionStorage, count: int, rare_every: int = 0, rare: str = "zeppelin"
) -> ChatSession:
    """Messages "common words in message N", every `rare_every`-th followed by `rare`."""
    session = ChatSession.create("m")
    for n in range(count):
        tail = f" {rare}" if rare_every and n % rare_every == 0 else ""
        session.add_message("user", f"common words in message {n}{tail}")
    async with storage.unit_of_work() as uow:
        await uow.sessions.add(session)
        await uow.commit()
    # A bulk insert leaves the documents (SQLite) or terms (PostgreSQL) to the first
    # search that needs them (persistence.sql.indexing).
    assert isinstance(storage, SqlSessionStorage)
    await storage.index_for_search()
    return session


def _with_pending_read(storage: SessionStorage, statements: list[str]) -> list[str]:
    """SQLite's searches end with a read of the pending messages (indexing.defers);
    PostgreSQL's index statement says itself whether any terms are pending."""
    return [*statements, "pending"] if storage.backend_name == "sqlite" else statements


def _statements(sql: list[str]) -> list[str]:
    """Each statement a search sent: the index, a read of the newest rows, or the read
    of the pending messages or terms (none here: the fill indexed them)."""
    return [
        "pending"
        if "search_text IS NULL" in s
        else "pending terms"
        if s.startswith("SELECT EXISTS (SELECT 1 FROM chat_terms_pending)")
        else "index"
        if "persistence_terms_matching" in s or "MATCH" in s
        else "read"
        for s in sql
    ]


async def test_a_common_word_reads_only_the_newest_rows(sql_storage: SessionStorage) -> None:
    await _fill(sql_storage, 3 * PROBE_ROWS)
    sent: list[str] = []
    with traced(sent.append):
        found = await sql_storage.search_messages("common", limit=50)

    assert [m.content for m in found] == [
        f"common words in message {n}" for n in range(3 * PROBE_ROWS - 1, 3 * PROBE_ROWS - 51, -1)
    ]
    # The matches among the newest rows: no index, no sort of all matches.
    assert _statements(sent) == _with_pending_read(sql_storage, ["read"])


async def test_a_rare_word_goes_to_the_index_after_one_probe(sql_storage: SessionStorage) -> None:
    await _fill(sql_storage, 3 * PROBE_ROWS, rare_every=100)
    sent: list[str] = []
    with traced(sent.append):
        found = await sql_storage.search_messages("zeppelin", limit=50)

    assert [m.content for m in found] == [
        f"common words in message {n} zeppelin" for n in (300, 200, 100, 0)
    ]
    assert _statements(sent) == _with_pending_read(sql_storage, ["read", "index"])


async def test_the_index_looks_for_the_rarest_word_of_the_query(
    sql_storage: SessionStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    await _fill(sql_storage, 3 * PROBE_ROWS, rare_every=100)
    chosen: list[str] = []
    choose = search_module.index_parameters

    def spy(
        dialect: str, words: list[QueryWord], word: QueryWord
    ) -> tuple[object, dict[str, object]]:
        chosen.append(word.text)
        return choose(dialect, words, word)

    monkeypatch.setattr(search_module, "index_parameters", spy)
    found = await sql_storage.search_messages("message zeppelin words", limit=50)

    assert len(found) == 4
    # Shorter than "message" but the rarest: the index reads its few entries only.
    assert chosen == ["zeppelin"]


@pytest.mark.parametrize(
    ("query", "hits"),
    [
        # The index finds "zeppelin"; four words are rechecked, each bound on its own.
        ("zeppelin common words in message", [300, 200, 100, 0]),
        # Six words to test, five to recheck: more than INLINE_WORDS, bound as arrays.
        ("zeppelin common words in message 100", [100]),
        ("zeppelin common words in message 101", []),
    ],
)
async def test_queries_of_many_words_find_what_the_rule_says_through_the_index(
    sql_storage: SessionStorage, query: str, hits: list[int]
) -> None:
    await _fill(sql_storage, 3 * PROBE_ROWS, rare_every=100)
    sent: list[str] = []
    with traced(sent.append):
        found = await sql_storage.search_messages(query, limit=50)

    assert [m.content for m in found] == [f"common words in message {n} zeppelin" for n in hits]
    assert "index" in _statements(sent)


@pytest.mark.parametrize("words", [2, INLINE_WORDS + 2])
async def test_many_words_of_scripts_without_spaces_find_what_the_rule_says(
    sql_storage: SessionStorage, words: int
) -> None:
    cities = ["東京", "北京", "上海", "大阪", "京都", "奈良"][:words]
    await _fill(sql_storage, 3 * PROBE_ROWS, rare_every=100, rare="、".join(cities))

    found = await sql_storage.search_messages(" ".join(reversed(cities)), limit=50)
    missing = await sql_storage.search_messages(" ".join([*cities, "名古屋"]), limit=50)

    assert [m.content.split()[4] for m in found] == ["300", "200", "100", "0"]
    assert missing == []


async def _plan(storage: SessionStorage, sql: str, params: dict[str, object]) -> str:
    assert isinstance(storage, SqlSessionStorage)
    async with storage.engine.connect() as connection:
        if connection.dialect.name == "sqlite":
            rows = await connection.execute(text("EXPLAIN QUERY PLAN " + sql), params)
            return " | ".join(str(row[-1]) for row in rows)
        await connection.execute(text("ANALYZE chat_messages, chat_message_terms"))
        rows = await connection.execute(text("EXPLAIN " + sql), params)
        return " | ".join(row[0] for row in rows)


def _compiled(storage: SessionStorage, statement: object) -> str:
    assert isinstance(storage, SqlSessionStorage)
    return str(statement.compile(storage.engine.dialect).compiled.statement)  # type: ignore[attr-defined]


async def test_the_plans_read_newest_first_and_the_index(sql_storage: SessionStorage) -> None:
    await _fill(sql_storage, 2000, rare_every=500)
    dialect = "postgresql" if isinstance(sql_storage, PostgreSQLSessionStorage) else "sqlite"
    arity, words = word_parameters(dialect, ["zeppelin"], [])
    recheck, rechecked = word_parameters(dialect, [], [], "recheck_")
    shape = Shape(session=False, role=False)
    scan = await _plan(
        sql_storage,
        _compiled(sql_storage, scan_statement(shape, arity)),
        {"below": 2**62, "skip": PROBE_ROWS - 1, "limit": 50, **words},
    )
    match = "'zeppelin':* | '§§'" if dialect == "postgresql" else '"zeppelin"*'
    index = await _plan(
        sql_storage,
        _compiled(sql_storage, index_statement(shape, arity, recheck)),
        {"below": 2**62, "skip": PROBE_ROWS - 1, "edge": None, "limit": 50, "match": match}
        | {"overflow": "'§§'", **words, **rechecked},
    )

    if dialect == "sqlite":
        assert "USING INTEGER PRIMARY KEY (rowid>? AND rowid<?)" in scan, scan
        assert "VIRTUAL TABLE INDEX" in index and "TEMP B-TREE" not in index, index
    else:
        assert "Index Scan Backward using pk_chat_messages" in scan, scan
        # The matches come from the function, which plans its query with sequential
        # scans off, so it reads the GIN index.
        assert "Function Scan on persistence_terms_matching" in index, index
        async with sql_storage.engine.begin() as connection:
            (settings,) = (
                await connection.execute(
                    text(
                        "SELECT proconfig FROM pg_proc WHERE proname = 'persistence_terms_matching'"
                    )
                )
            ).one()
            assert settings == ["enable_seqscan=off"]
            await connection.execute(text("SET LOCAL enable_seqscan = off"))
            rows = await connection.execute(
                text(
                    "EXPLAIN SELECT id FROM chat_message_terms WHERE terms @@ CAST(:m AS tsquery)"
                ),
                {"m": match},
            )
            assert "ix_chat_message_terms_terms" in " | ".join(row[0] for row in rows)


@pytest.fixture
async def c_locale_storage(postgresql_admin_url: str) -> AsyncIterator[PostgreSQLSessionStorage]:
    name = f"persistence_test_c_{uuid.uuid4().hex[:10]}"
    await servers._admin(
        postgresql_admin_url,
        f"CREATE DATABASE \"{name}\" TEMPLATE template0 ENCODING 'UTF8'"
        " LC_COLLATE 'C' LC_CTYPE 'C'",
    )
    url = servers.with_database(servers.plain_postgresql_url(postgresql_admin_url), name)
    try:
        async with PostgreSQLSessionStorage(url, min_pool_size=1, max_pool_size=2) as storage:
            yield storage
    finally:
        await servers._admin(postgresql_admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.mark.postgresql
async def test_a_c_locale_database_finds_accented_greek_and_hindi_words(
    c_locale_storage: PostgreSQLSessionStorage,
) -> None:
    async with c_locale_storage.engine.connect() as connection:
        ctype = (await connection.execute(text("SHOW lc_ctype"))).scalar_one()
    assert ctype == "C"
    session = ChatSession.create("m")
    session.add_message("user", "École über σοφία नमस्ते 日本語のテキスト")
    await c_locale_storage.save_session(session)

    for query in ("école", "ÜBER", "σοφια", "नमस्ते", "テキスト", "eco"):
        found = await c_locale_storage.search_messages(query)
        assert [m.message_id for m in found] == [session.messages[0].message_id], query


@pytest.mark.postgresql
async def test_terms_past_one_megabyte_are_indexed_as_overflow_and_still_found(
    postgresql_storage: PostgreSQLSessionStorage,
) -> None:
    session = ChatSession.create("m")
    big = session.add_message("user", OVERFLOW_TEXT + " tail")
    session.add_message("user", "small 尾巴")
    await postgresql_storage.save_session(session)
    async with postgresql_storage.engine.connect() as connection:
        terms = (
            await connection.execute(
                text(
                    "SELECT t.terms::text FROM chat_message_terms AS t"
                    " JOIN chat_messages AS m ON m.id = t.id WHERE m.message_id = :id"
                ),
                {"id": big.message_id},
            )
        ).scalar_one()
    assert terms == "'§§'"

    for query in ("tail", OVERFLOW_TEXT[7:9], OVERFLOW_TEXT[100:140], "ta"):
        found = await postgresql_storage.search_messages(query)
        assert [m.message_id for m in found] == [big.message_id], query[:10]
    assert await postgresql_storage.search_messages("tails") == []
    assert len(await postgresql_storage.search_messages("尾巴")) == 1


async def test_a_megabyte_of_distinct_words_is_stored_and_searchable_to_its_end(
    sql_storage: SessionStorage,
) -> None:
    words = [f"w{n:x}" for n in range(158_000)]
    content = " ".join(words)
    assert 1_000_000 <= len(content) <= 1 << 20
    session = ChatSession.create("m")
    message = session.add_message("user", content)
    await sql_storage.save_session(session)

    for query in (words[-1], words[80_000], "w1", words[-1] + " " + words[0]):
        found = await sql_storage.search_messages(query)
        assert [m.message_id for m in found] == [message.message_id], query


async def _behind_newer_rows(storage: SessionStorage, *contents: str) -> list[str]:
    """Stores `contents`, then more newer messages than the first probe reads, so a
    search of them goes to the index; returns their message ids."""
    old = ChatSession.create("m")
    ids = [old.add_message("user", content).message_id for content in contents]
    await storage.save_session(old)
    newer = ChatSession.create("m")
    for _ in range(PROBE_ROWS + 2):
        newer.add_message("user", "x")
    await storage.save_session(newer)
    return ids


async def test_a_word_past_fts5s_token_cut_is_found_by_the_longest_query_word(
    sql_storage: SessionStorage,
) -> None:
    """Found by attack: FTS5 cuts tokens, stored and queried, to 32,768 bytes, and the
    index's word was not rechecked on SQLite (it is on PostgreSQL past its own cut): a
    query word longer than that matched every word with its first 32,768 bytes, and
    only once a first search had indexed the messages. Such a query word is now refused
    (MAX_QUERY_BYTES); a stored word past the cut is found by its beginning."""
    stem = "a" * 32_768
    (ending_c,) = await _behind_newer_rows(sql_storage, stem + "c")

    for _ in range(2):  # pending rows are tested in Python; then through the index
        for query in (stem + "b", stem + "c"):
            with pytest.raises(InvalidDataError, match="a search takes at most"):
                await sql_storage.search_messages(query)
        found = await sql_storage.search_messages(stem[:MAX_QUERY_BYTES])
        assert [m.message_id for m in found] == [ending_c]
        assert await sql_storage.search_messages(stem[: MAX_QUERY_BYTES - 1] + "c") == []


async def test_a_long_word_of_a_script_without_spaces_is_found_by_its_pieces(
    sql_storage: SessionStorage,
) -> None:
    """Found by attack: each two-character piece of such a word was an index term, and
    past about 117,000 distinct pieces PostgreSQL refused the query ("value is too big in
    tsquery"); SQLite took 4 s. Such a query word is now refused (MAX_QUERY_BYTES); the
    index looks up at most MAX_GRAM_TERMS pieces of the longest it takes, and the
    recheck decides the word."""
    shuffled = random.Random(0)
    word = "".join(chr(shuffled.randrange(0x4E00, 0x9FA5)) for _ in range(120_000))
    assert len({word[i : i + 2] for i in range(len(word) - 1)}) > 117_000
    whole, half = await _behind_newer_rows(sql_storage, word, word[:60_000])
    longest = MAX_QUERY_BYTES // 3  # 3 bytes of UTF-8 each
    assert longest - 1 > MAX_GRAM_TERMS

    for _ in range(2):
        with pytest.raises(InvalidDataError, match="a search takes at most"):
            await sql_storage.search_messages(word)
        found = await sql_storage.search_messages(word[-longest:])
        assert [m.message_id for m in found] == [whole]
        found = await sql_storage.search_messages(word[1000 : 1000 + longest])
        assert [m.message_id for m in found] == [half, whole]
    half_and_half = word[1000 : 1000 + longest // 2] + word[3000 : 3000 + longest // 2]
    assert await sql_storage.search_messages(half_and_half) == []


def test_every_query_reduces_to_terms_no_engine_reads_as_syntax() -> None:
    parsed = parse_query('NEAR(a b) "x" y* -z col:w (p | q) & !r')
    assert parsed is not None
    assert all(term.isalnum() for term in parsed.prefix_terms)
