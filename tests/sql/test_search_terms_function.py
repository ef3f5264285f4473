"""Revisions 0006 and 0008: PostgreSQL's search terms take fast paths that must change
nothing.

The head's `persistence_search_terms` is compared, document by document, with revision
0003's function (installed beside it under another name) over documents that reach
every branch: duplicates, empty tokens, tokens at and past the 200-character cut
(in ASCII and in multibyte text, alone and cut to one shared term), and documents past
a megabyte. Going down and up again keeps every stored term.
"""

from __future__ import annotations

import importlib
import random

import pytest

from persistence.search import search_document
from tests.search.test_migration import _execute
from tests.search.test_parity import CORPUS
from tests.sql.test_migrations import alembic

pytestmark = pytest.mark.postgresql

OLD_RULE = importlib.import_module(
    "persistence.sql.migrations.versions.0003_search_documents"
).POSTGRESQL_TERMS_FUNCTION.replace("persistence_search_terms", "terms_by_0003", 1)


def _documents() -> list[str]:
    rng = random.Random(14)
    words = [f"w{n}" for n in range(50)]
    documents = [search_document(content) for _, content in CORPUS]
    documents += [
        "",
        " ",
        "a",
        "a b a c b a",
        "  leading and trailing  ",
        "double  space",
        "\u00a7ab \u00a7bc \u00a7ab",
        " ".join(rng.choice(words) for _ in range(300)),
    ]
    for length in (199, 200, 201, 250, 5000):
        documents += [
            "x" * length,
            f"short {'y' * length} words",
            f"{'é' * length} and {'日' * length}",
            f"{'z' * length} {'z' * length}",
            # Two tokens that differ only past the cut become one term.
            f"{'k' * length}1 {'k' * length}2 k",
        ]
    # Past a megabyte: small terms (the fast path may not take it, the sum decides),
    # and distinct long terms (the overflow term).
    documents.append(" ".join(f"t{n % 1000}" for n in range(200_000)))
    documents.append(" ".join(f"{n:06d}" + "q" * 190 for n in range(6000)))
    return documents


@pytest.mark.parametrize("fresh_url", ["postgresql"], indirect=True)
async def test_the_fast_path_gives_every_document_the_terms_0003_gave(fresh_url: str) -> None:
    alembic(fresh_url, "upgrade", "head")
    await _execute(fresh_url, (OLD_RULE, {}))
    documents = _documents()

    (differing,) = await _execute(
        fresh_url,
        (
            "SELECT ordinality FROM unnest(CAST(:documents AS text[])) WITH ORDINALITY AS d"
            " WHERE persistence_search_terms(d) IS DISTINCT FROM terms_by_0003(d)",
            {"documents": documents},
        ),
    )
    assert differing == []
    # Both branches past a megabyte were taken: repeated small terms, and the overflow.
    (past_a_megabyte,) = await _execute(
        fresh_url,
        (
            "SELECT length(persistence_search_terms(d)), persistence_search_terms(d) = :overflow"
            " FROM unnest(CAST(:documents AS text[])) WITH ORDINALITY AS r(d, n) ORDER BY n",
            {"documents": documents[-2:], "overflow": "'\u00a7\u00a7'"},
        ),
    )
    assert past_a_megabyte == [(1000, False), (1, True)]


@pytest.mark.parametrize("fresh_url", ["postgresql"], indirect=True)
async def test_down_to_0005_and_up_again_keeps_every_stored_term(fresh_url: str) -> None:
    alembic(fresh_url, "upgrade", "0005")
    await _execute(
        fresh_url,
        (
            "INSERT INTO chat_sessions (session_id, model, created_at, updated_at,"
            " message_count, metadata, status, revision, incarnation, next_position)"
            " VALUES ('s', 'm', now(), now(), 0, '{}', 'active', 1, 'i', 0)",
            {},
        ),
        (
            "INSERT INTO chat_messages (message_id, session_id, position, role, content,"
            " created_at, metadata, search_text) SELECT 'm' || n, 's', n, 'user', d, now(),"
            " '{}', d FROM unnest(CAST(:documents AS text[])) WITH ORDINALITY AS r(d, n)",
            {"documents": _documents()},
        ),
    )
    select = ("SELECT id, search_terms::text FROM chat_messages ORDER BY id", {})
    (at_0005,) = await _execute(fresh_url, select)
    source = "SELECT prosrc, proisstrict FROM pg_proc WHERE proname = 'persistence_search_terms'"

    alembic(fresh_url, "upgrade", "head")
    # Since revision 0009 the terms have a table of their own.
    select_at_head = (
        "SELECT m.id, t.terms::text FROM chat_messages AS m"
        " JOIN chat_message_terms AS t ON t.id = m.id ORDER BY m.id",
        {},
    )
    (at_head,) = await _execute(fresh_url, select_at_head)
    ((body, strict),) = (await _execute(fresh_url, (source, {})))[0]
    assert "varchar(200)[]" in body and "!~" not in body and strict
    # New rows at head get the same terms as the rows written at 0005: a changed
    # document (a trailing space, which makes no term) has its terms written again.
    await _execute(fresh_url, ("UPDATE chat_messages SET search_text = search_text || ' '", {}))
    (rewritten,) = await _execute(fresh_url, select_at_head)

    alembic(fresh_url, "downgrade", "0007")
    ((body, strict),) = (await _execute(fresh_url, (source, {})))[0]
    assert "!~" in body and "varchar(200)[]" not in body and strict
    await _execute(fresh_url, ("UPDATE chat_messages SET search_text = search_text || ''", {}))
    (rewritten_at_0007,) = await _execute(fresh_url, select)

    alembic(fresh_url, "downgrade", "0005")
    (after_downgrade,) = await _execute(fresh_url, select)
    ((body, strict),) = (await _execute(fresh_url, (source, {})))[0]
    assert "!~" not in body and "array_agg" in body and strict

    assert at_head == rewritten == rewritten_at_0007 == after_downgrade == at_0005
    assert len(at_0005) == len(_documents())
