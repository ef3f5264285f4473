"""Documents every insert leaves pending on SQLite (persistence.sql.indexing): never
missed, written by the first search that may write or by a later save, never
corrupting the index.

The same scenarios run on PostgreSQL, which writes documents with the rows and leaves
only a bulk insert's index terms pending (tests/search/test_pending_terms.py)."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from sqlalchemy import text

from persistence import (
    ChatSession,
    PersistenceError,
    SessionStorage,
    SQLiteSessionStorage,
)
from persistence.sql.indexing import BATCH, SAVE_BATCH, SAVES_INDEX_AT
from persistence.sql.runner import run_in_thread, traced
from persistence.sql.search import PENDING_BATCH
from persistence.sql.sql_storage import SqlSessionStorage
from tests.search.conftest import same_store


def _sql(storage: SessionStorage) -> SqlSessionStorage:
    assert isinstance(storage, SqlSessionStorage)
    return storage


async def _scalar(storage: SessionStorage, sql: str) -> int:
    async with _sql(storage).engine.connect() as connection:
        return int((await connection.execute(text(sql))).scalar_one())


# Messages of a bulk insert in these tests (any number: every insert leaves them).
BULK = 40


def _if_deferred(storage: SessionStorage, count: int) -> int:
    """`count` where inserts leave documents pending (SQLite), else 0."""
    return count if isinstance(storage, SQLiteSessionStorage) else 0


async def _pending(storage: SessionStorage) -> int:
    return await _scalar(storage, "SELECT count(*) FROM chat_messages WHERE search_text IS NULL")


# PostgreSQL (revision 0009): terms that are not the ones their row's document makes,
# terms of no row, and rows with a document that have neither terms nor a pending range.
TERMS_CHECKS = {
    "wrong": "SELECT count(*) FROM chat_messages AS m JOIN chat_message_terms AS t"
    " ON t.id = m.id WHERE t.terms IS DISTINCT FROM persistence_search_terms(m.search_text)",
    "orphaned": "SELECT count(*) FROM chat_message_terms AS t"
    " WHERE NOT EXISTS (SELECT 1 FROM chat_messages AS m WHERE m.id = t.id)",
    "missing": "SELECT count(*) FROM chat_messages AS m WHERE m.search_text IS NOT NULL"
    " AND NOT EXISTS (SELECT 1 FROM chat_message_terms AS t WHERE t.id = m.id)"
    " AND NOT EXISTS (SELECT 1 FROM chat_terms_pending AS p"
    " WHERE m.id BETWEEN p.first_id AND p.last_id)",
}


async def _check_index(storage: SessionStorage) -> None:
    """SQLite: FTS5 compares its index with the documents (a NULL one indexes nothing);
    PostgreSQL: every row's terms are the ones its document makes, or pending."""
    async with _sql(storage).engine.begin() as connection:
        if connection.dialect.name == "sqlite":
            await connection.execute(
                text(
                    "INSERT INTO chat_messages_fts(chat_messages_fts, rank)"
                    " VALUES ('integrity-check', 1)"
                )
            )
        else:
            for name, sql in TERMS_CHECKS.items():
                assert (await connection.execute(text(sql))).scalar_one() == 0, name


@asynccontextmanager
async def _same_store(storage: SessionStorage, *, reading: bool) -> AsyncIterator[SessionStorage]:
    """Another storage object (its own connections) on the store `storage` opened."""
    other = same_store(storage)
    await (other.open_for_reading() if reading else other.initialize())
    try:
        yield other
    finally:
        await other.close()


async def _bulk(storage: SessionStorage, contents: list[str], session_id: str = "bulk") -> None:
    session = ChatSession.create("m", session_id=session_id)
    for content in contents:
        session.add_message("user", content)
    await _in_a_unit_of_work(storage, session)


async def _in_a_unit_of_work(storage: SessionStorage, session: ChatSession) -> None:
    """Saves `session` through a unit of work, whose inserts leave pending documents
    that no later save counts as its own (indexing.py)."""
    async with storage.unit_of_work() as uow:
        await uow.sessions.add(session)
        await uow.commit()


def _numbered(count: int, word: str = "common") -> list[str]:
    return [f"{word} message number{n}" for n in range(count)]


async def test_a_bulk_insert_leaves_its_documents_to_the_first_search(
    sql_storage: SessionStorage,
) -> None:
    await _bulk(sql_storage, _numbered(BULK))
    assert await _pending(sql_storage) == _if_deferred(sql_storage, BULK)

    # It tests them all, enough to be worth writing their documents.
    assert BULK >= SAVES_INDEX_AT
    found = await sql_storage.search_messages("number7")

    assert [m.content for m in found] == ["common message number7"]
    assert await _pending(sql_storage) == 0
    await _check_index(sql_storage)


async def test_an_append_leaves_its_document_pending_and_a_search_finds_it(
    sql_storage: SessionStorage,
) -> None:
    session = ChatSession.create("m")
    session.add_message("user", "the first zeppelin")
    await sql_storage.save_session(session)
    session.add_message("assistant", "a second zeppelin")
    await sql_storage.save_session(session)
    assert await _pending(sql_storage) == _if_deferred(sql_storage, 2)

    found = await sql_storage.search_messages("zeppelin")

    assert [m.content for m in found] == ["a second zeppelin", "the first zeppelin"]
    # Two cost less to test than to write: the search leaves them to the saves.
    assert await _pending(sql_storage) == _if_deferred(sql_storage, 2)
    await _check_index(sql_storage)


async def test_a_search_that_tested_long_pending_messages_writes_their_documents(
    sql_storage: SessionStorage,
) -> None:
    # Found by attack: 15 pending messages of 1 MiB (one short of the count that makes
    # a search write them) made every search take 2 s, none ever written. Two of
    # 100,000 characters now weigh as much as 50 short ones.
    session = ChatSession.create("m")
    session.add_message("user", "l'été " * 16_000 + "zeppelin")
    session.add_message("user", "déjà " * 20_000)
    await sql_storage.save_session(session)
    assert await _pending(sql_storage) == _if_deferred(sql_storage, 2)

    found = await sql_storage.search_messages("zeppelin")

    assert len(found) == 1
    assert await _pending(sql_storage) == 0
    await _check_index(sql_storage)


async def test_saves_write_the_oldest_pending_documents_once_they_left_enough(
    sql_storage: SessionStorage,
) -> None:
    # A bulk insert's documents wait; the saves after it count only their own.
    await _bulk(sql_storage, _numbered(BATCH, "bulk"))
    session = ChatSession.create("m", session_id="appends")
    await sql_storage.save_session(session)
    for n in range(SAVES_INDEX_AT):
        session.add_message("user", f"append number{n}")
        await sql_storage.save_session(session)
    assert await _pending(sql_storage) == _if_deferred(sql_storage, BATCH + SAVES_INDEX_AT)
    sent: list[str] = []

    session.add_message("user", "one more")
    with traced(sent.append):
        await sql_storage.save_session(session)

    # In the save's own transaction: its insert, then the oldest pending documents.
    writes = [sql for sql in sent if sql.startswith("UPDATE chat_messages SET search_text")]
    assert len(writes) == _if_deferred(sql_storage, 1)
    left = BATCH + SAVES_INDEX_AT + 1 - SAVE_BATCH
    assert await _pending(sql_storage) == _if_deferred(sql_storage, left)
    oldest = await _scalar(
        sql_storage,
        "SELECT coalesce(min(position), 0) FROM chat_messages"
        " WHERE search_text IS NULL AND session_id = 'bulk'",
    )
    assert oldest == _if_deferred(sql_storage, SAVE_BATCH)
    # The count starts again: the next saves leave theirs pending.
    session.add_message("user", "and another")
    await sql_storage.save_session(session)
    assert await _pending(sql_storage) == _if_deferred(sql_storage, left + 1)
    await _check_index(sql_storage)
    newest = f"append number{SAVES_INDEX_AT - 1}"
    found = await sql_storage.search_messages(newest)
    assert found[0].content == newest


async def test_a_search_that_only_reads_tests_pending_messages_one_by_one(
    sql_storage: SessionStorage,
) -> None:
    # More than one batch of the pending read, the matches spread over all of them.
    count = 2 * PENDING_BATCH + 7
    await _bulk(sql_storage, _numbered(count))
    await _bulk(sql_storage, _numbered(BULK, "other"), session_id="second")

    async with _same_store(sql_storage, reading=True) as reader:
        newest = await reader.search_messages("common", limit=3)
        rare = await reader.search_messages("number1000 common")
        every = await reader.search_messages("common number1", limit=1000)
        in_session = await reader.search_messages("message", session_id="second", limit=5)
        by_role = await reader.search_messages("message", role="assistant")

    assert [m.content for m in newest] == [f"common message number{n}" for n in (1006, 1005, 1004)]
    assert [m.content for m in rare] == ["common message number1000"]
    expected = [n for n in range(count - 1, -1, -1) if str(n).startswith("1")]
    assert [m.content for m in every] == [f"common message number{n}" for n in expected]
    assert [m.content for m in in_session] == [
        f"other message number{n}" for n in range(BULK - 1, BULK - 6, -1)
    ]
    assert by_role == []
    # A store opened for reading never writes.
    assert await _pending(sql_storage) == _if_deferred(sql_storage, count + BULK)


async def test_many_pending_messages_are_indexed_before_the_search(
    sql_storage: SessionStorage,
) -> None:
    count = BATCH * 2 + 1
    await _bulk(sql_storage, _numbered(count))
    sent: list[str] = []

    with traced(sent.append):
        found = await sql_storage.search_messages("number1000")

    assert [m.content for m in found] == ["common message number1000"]
    writes = [sql for sql in sent if sql.startswith("UPDATE chat_messages SET search_text")]
    assert len(writes) == _if_deferred(sql_storage, 3)  # a batch per transaction
    assert await _pending(sql_storage) == 0
    await _check_index(sql_storage)


async def test_a_search_answers_when_its_indexing_cannot_be_written(
    sqlite_storage: SQLiteSessionStorage, caplog: pytest.LogCaptureFixture
) -> None:
    """Found by attack: on a full disk every search of a store with many pending
    messages failed ("index messages failed: the disk is full"), its matches found.
    SQLite's max_page_count makes the store full without filling the disk."""
    count = BATCH * 2 + 1
    await _bulk(sqlite_storage, _numbered(count))
    connection = sqlite_storage._opened_connection()

    def cap(raw: sqlite3.Connection, pages: int | None) -> None:
        if pages is None:
            pages = raw.execute("PRAGMA page_count").fetchone()[0]
        raw.execute(f"PRAGMA max_page_count = {pages}")

    await run_in_thread(connection, cap, None)
    found = await sqlite_storage.search_messages("number1000")

    assert [m.content for m in found] == ["common message number1000"]
    assert "pending messages not indexed" in caplog.text and "full" in caplog.text
    assert await _pending(sqlite_storage) == count
    await run_in_thread(connection, cap, 1 << 30)
    assert len(await sqlite_storage.search_messages("number1000")) == 1
    assert await _pending(sqlite_storage) == 0
    await _check_index(sqlite_storage)


async def test_pending_and_indexed_matches_merge_newest_first(sql_storage: SessionStorage) -> None:
    session = ChatSession.create("m", session_id="mixed")
    session.add_message("user", "needle indexed early")
    await sql_storage.save_session(session)
    await sql_storage.index_for_search()
    for content in _numbered(BULK, "filler"):
        session.add_message("user", content)
    session.add_message("user", "needle pending")
    session.add_message("user", "to be edited")
    await _in_a_unit_of_work(sql_storage, session)
    # An edit writes its message's document.
    session.edit_message(session.messages[-1].message_id, content="needle indexed late")
    await sql_storage.save_session(session)
    assert await _pending(sql_storage) == _if_deferred(sql_storage, BULK + 1)

    async with _same_store(sql_storage, reading=True) as reader:
        for session_id in (None, "mixed"):
            found = await reader.search_messages("needle", session_id=session_id)
            assert [m.content for m in found] == [
                "needle indexed late",
                "needle pending",
                "needle indexed early",
            ]
            two = await reader.search_messages("needle", session_id=session_id, limit=2)
            assert [m.content for m in two] == ["needle indexed late", "needle pending"]


async def test_an_edited_pending_message_is_found_by_its_new_words_only(
    sql_storage: SessionStorage,
) -> None:
    session = ChatSession.create("m")
    for content in _numbered(BULK):
        session.add_message("user", content)
    await _in_a_unit_of_work(sql_storage, session)
    edited = session.messages[3].message_id
    session.edit_message(edited, content="rewritten zeppelin")
    await sql_storage.save_session(session)

    assert await _pending(sql_storage) == _if_deferred(sql_storage, BULK - 1)
    assert [m.message_id for m in await sql_storage.search_messages("zeppelin")] == [edited]
    old_words = await sql_storage.search_messages("number3")
    assert old_words and edited not in [m.message_id for m in old_words]
    await _check_index(sql_storage)


async def test_removed_pending_messages_leave_the_index_intact(
    sql_storage: SessionStorage,
) -> None:
    session = ChatSession.create("m", session_id="removed")
    for content in _numbered(BULK * 2):
        session.add_message("user", content)
    await sql_storage.save_session(session)
    session.rewind(session.messages[BULK - 1].message_id)
    session.pop_message()
    await sql_storage.save_session(session)
    await _check_index(sql_storage)

    found = await sql_storage.search_messages("common", limit=100)
    assert len(found) == BULK - 1
    await _check_index(sql_storage)

    await _bulk(sql_storage, _numbered(BULK, "gone"), session_id="deleted")
    assert await sql_storage.delete_session("deleted")
    await _check_index(sql_storage)
    assert await sql_storage.search_messages("gone") == []


async def test_two_stores_indexing_at_once_agree(sql_storage: SessionStorage) -> None:
    await _bulk(sql_storage, _numbered(BATCH * 3))

    async with _same_store(sql_storage, reading=False) as other:
        first, second = await asyncio.gather(
            sql_storage.search_messages("number777"), other.search_messages("number777")
        )

    assert [m.content for m in first] == [m.content for m in second]
    assert [m.content for m in first] == ["common message number777"]
    assert await _pending(sql_storage) == 0
    await _check_index(sql_storage)


@pytest.mark.sqlite
async def test_a_search_inside_a_unit_of_work_finds_pending_messages(
    sqlite_storage: SQLiteSessionStorage,
) -> None:
    await _bulk(sqlite_storage, _numbered(BULK))

    async with sqlite_storage.unit_of_work() as uow:
        # This task holds the write lock: the search reads, and leaves the indexing.
        found = await sqlite_storage.search_messages("number5")
        await uow.commit()

    assert [m.content for m in found] == ["common message number5"]
    assert await _pending(sqlite_storage) == BULK


@pytest.mark.sqlite
@pytest.mark.parametrize("count", [BULK, PENDING_BATCH + 1])
async def test_a_search_never_waits_for_another_writer(
    sqlite_storage: SQLiteSessionStorage, count: int
) -> None:
    await _bulk(sqlite_storage, _numbered(count))
    writer = sqlite3.connect(sqlite_storage.database_path, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")  # held until the search has answered
    try:
        # Were the search to wait for the write lock, it would wait for this block.
        found = await asyncio.wait_for(sqlite_storage.search_messages(f"number{count - 1}"), 60)
    finally:
        writer.execute("ROLLBACK")
        writer.close()

    assert [m.content for m in found] == [f"common message number{count - 1}"]
    assert await _pending(sqlite_storage) == count
    assert len(await sqlite_storage.search_messages(f"number{count - 1}")) == 1
    assert await _pending(sqlite_storage) == 0


async def test_index_for_search_writes_every_pending_document(
    sql_storage: SessionStorage,
) -> None:
    count = BATCH + 3
    await _bulk(sql_storage, _numbered(count))
    async with _same_store(sql_storage, reading=True) as reader:
        with pytest.raises(PersistenceError, match="opened for reading"):
            await reader.index_for_search()

    # SQLite writes their documents; PostgreSQL their terms (the documents it wrote).
    assert await sql_storage.index_for_search() == count
    assert await _pending(sql_storage) == 0
    assert await sql_storage.index_for_search() == 0
    await _check_index(sql_storage)
