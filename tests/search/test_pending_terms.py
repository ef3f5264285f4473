"""PostgreSQL's search terms in a table of their own (revision 0009): a bulk insert
leaves them pending, searches never miss those rows, the first search on the primary
writes them, and edits, removals and writes from outside the library keep them exact."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime

import asyncpg
import pytest

from persistence import ChatSession, PostgreSQLSessionStorage, SessionStorage
from persistence.search import search_document
from persistence.sql.indexing import WRITE_PENDING_TERMS
from persistence.sql.runner import traced
from persistence.sql.search import PROBE_ROWS
from tests import servers
from tests.search.test_pending import _bulk, _check_index, _same_store, _scalar

pytestmark = pytest.mark.postgresql

# More than a probe reads, so that a rare word goes to the index.
BULK = 3 * PROBE_ROWS


def _url(storage: PostgreSQLSessionStorage) -> str:
    return servers.plain_postgresql_url(storage.url.render_as_string(hide_password=False))


async def _pending_ranges(storage: PostgreSQLSessionStorage) -> int:
    return await _scalar(storage, "SELECT count(*) FROM chat_terms_pending")


async def _terms(storage: PostgreSQLSessionStorage) -> int:
    return await _scalar(storage, "SELECT count(*) FROM chat_message_terms")


def _with_rare_word(count: int, every: int = 100) -> list[str]:
    return [f"common words {n}" + (" zeppelin" if n % every == 0 else "") for n in range(count)]


async def test_a_bulk_insert_leaves_its_terms_to_the_first_search_that_needs_them(
    postgresql_storage: PostgreSQLSessionStorage,
) -> None:
    await _bulk(postgresql_storage, _with_rare_word(BULK))
    assert await _terms(postgresql_storage) == 0
    assert await _pending_ranges(postgresql_storage) > 0
    await _check_index(postgresql_storage)

    # A common word: the newest rows answer, through their documents; nothing written.
    assert len(await postgresql_storage.search_messages("common", limit=5)) == 5
    assert await _terms(postgresql_storage) == 0

    # A rare word needs the index: the search writes the pending terms first.
    found = await postgresql_storage.search_messages("zeppelin")
    assert [m.content for m in found] == [
        f"common words {n} zeppelin" for n in range(BULK - 1, -1, -1) if n % 100 == 0
    ]
    assert await _pending_ranges(postgresql_storage) == 0
    assert await _terms(postgresql_storage) == BULK
    await _check_index(postgresql_storage)


async def test_a_search_the_index_answers_with_nothing_still_writes_the_pending_terms(
    postgresql_storage: PostgreSQLSessionStorage,
) -> None:
    await _bulk(postgresql_storage, _with_rare_word(BULK))
    sent: list[str] = []

    with traced(sent.append):
        assert await postgresql_storage.search_messages("quokka") == []

    # No row came back to say whether terms were pending: the search asked, wrote
    # them, and read the index again.
    asked = [sql for sql in sent if sql.startswith("SELECT EXISTS (SELECT 1 FROM chat_terms")]
    assert len(asked) == 1
    assert await _pending_ranges(postgresql_storage) == 0
    assert await _terms(postgresql_storage) == BULK
    assert len(await postgresql_storage.search_messages("zeppelin")) == 4


async def test_a_store_opened_for_reading_finds_rows_whose_terms_are_pending(
    postgresql_storage: PostgreSQLSessionStorage,
) -> None:
    indexed = ChatSession.create("m", session_id="indexed")
    indexed.add_message("user", "an early zeppelin")
    indexed.add_message("assistant", "an assistant zeppelin")
    await postgresql_storage.save_session(indexed)
    await _bulk(postgresql_storage, _with_rare_word(BULK), session_id="bulk")
    expected = [f"common words {n} zeppelin" for n in range(BULK - 1, -1, -1) if n % 100 == 0]

    async with _same_store(postgresql_storage, reading=True) as reader:
        everywhere = await reader.search_messages("zeppelin")
        two = await reader.search_messages("zeppelin", limit=2)
        in_session = await reader.search_messages("zeppelin", session_id="indexed")
        by_role = await reader.search_messages("zeppelin", role="assistant")
        both_words = await reader.search_messages("zeppelin words 100")

    assert [m.content for m in everywhere] == [
        *expected,
        "an assistant zeppelin",
        "an early zeppelin",
    ]
    assert [m.content for m in two] == expected[:2]
    assert [m.content for m in in_session] == ["an assistant zeppelin", "an early zeppelin"]
    assert [m.content for m in by_role] == ["an assistant zeppelin"]
    assert [m.content for m in both_words] == ["common words 100 zeppelin"]
    # A store opened for reading writes nothing.
    assert await _pending_ranges(postgresql_storage) > 0
    await _check_index(postgresql_storage)


async def test_appends_and_small_units_of_work_write_their_terms_at_once(
    postgresql_storage: PostgreSQLSessionStorage,
) -> None:
    session = ChatSession.create("m")
    session.add_message("user", "first")
    await postgresql_storage.save_session(session)
    for n in range(32):
        session.add_message("user", f"many {n}")
    await postgresql_storage.save_session(session)
    await _bulk(postgresql_storage, [f"small {n}" for n in range(5)], session_id="small")

    assert await _terms(postgresql_storage) == 1 + 32 + 5
    assert await _pending_ranges(postgresql_storage) == 0
    await _check_index(postgresql_storage)


async def test_edits_and_removals_keep_the_terms_exact(
    postgresql_storage: PostgreSQLSessionStorage,
) -> None:
    session = ChatSession.create("m", session_id="edited")
    for content in _with_rare_word(BULK):
        session.add_message("user", content)
    await postgresql_storage.save_session(session)
    # One edit while the terms are pending, one after they are written.
    session.edit_message(session.messages[5].message_id, content="pending rewritten quagga")
    await postgresql_storage.save_session(session)
    assert await _pending_ranges(postgresql_storage) > 0
    assert await postgresql_storage.index_for_search() == BULK - 1
    session.edit_message(session.messages[7].message_id, content="indexed rewritten quagga")
    await postgresql_storage.save_session(session)
    await _check_index(postgresql_storage)

    found = await postgresql_storage.search_messages("quagga")
    assert [m.content for m in found] == ["indexed rewritten quagga", "pending rewritten quagga"]
    old_words = await postgresql_storage.search_messages("common words", limit=BULK)
    assert len(old_words) == BULK - 2
    assert {m.message_id for m in found}.isdisjoint(m.message_id for m in old_words)

    # Removed messages take their terms with them.
    session.rewind(session.messages[99].message_id)
    await postgresql_storage.save_session(session)
    assert await _terms(postgresql_storage) == 100
    assert await postgresql_storage.search_messages("zeppelin") == [session.messages[0]]
    await _bulk(postgresql_storage, _with_rare_word(BULK), session_id="deleted")
    assert await postgresql_storage.delete_session("deleted")
    assert await postgresql_storage.delete_session("edited")
    assert await _terms(postgresql_storage) == 0
    assert await postgresql_storage.search_messages("zeppelin") == []
    await _check_index(postgresql_storage)


async def test_rows_written_outside_the_library_are_found(
    postgresql_storage: PostgreSQLSessionStorage,
) -> None:
    session = ChatSession.create("m", session_id="outside")
    await postgresql_storage.save_session(session)
    now = datetime.now(UTC)
    contents = _with_rare_word(BULK)
    rows = [
        (f"outside-{n}", "outside", n, "user", content, now, "{}", search_document(content))
        for n, content in enumerate(contents)
    ]
    connection = await asyncpg.connect(_url(postgresql_storage))
    try:
        await connection.copy_records_to_table(
            "chat_messages",
            records=rows,
            columns=[
                "message_id",
                "session_id",
                "position",
                "role",
                "content",
                "created_at",
                "metadata",
                "search_text",
            ],
        )
        await connection.execute(
            "INSERT INTO chat_messages (message_id, session_id, position, role, content,"
            " created_at, metadata, search_text) VALUES ('one-row', 'outside', $1, 'user',"
            " 'a lone zeppelin', now(), '{}', 'a lone zeppelin')",
            BULK,
        )
    finally:
        await connection.close()
    expected = ["a lone zeppelin", *(c for c in reversed(contents) if "zeppelin" in c)]

    async with _same_store(postgresql_storage, reading=True) as reader:
        assert [m.content for m in await reader.search_messages("zeppelin")] == expected
    assert [m.content for m in await postgresql_storage.search_messages("zeppelin")] == expected
    assert await _pending_ranges(postgresql_storage) == 0
    await _check_index(postgresql_storage)


@pytest.mark.parametrize("first", ["search", "edit"])
async def test_an_edit_racing_the_search_that_writes_terms_keeps_the_new_terms(
    postgresql_storage: PostgreSQLSessionStorage, first: str
) -> None:
    """The edit locks its row's pending range (revision 0013): a catch-up that took it
    first is waited for, and the edit's terms then overwrite the catch-up's; one that
    comes second skips the range, which a later catch-up takes."""
    await _bulk(postgresql_storage, _with_rare_word(BULK), session_id="raced")
    url = _url(postgresql_storage)
    indexer, editor = await asyncpg.connect(url), await asyncpg.connect(url)
    # The statement a search sends, as the driver gets it.
    write_terms, ranges = WRITE_PENDING_TERMS.compile(postgresql_storage.engine.dialect).bind(
        {"ranges": 64}
    )
    edit = (
        "UPDATE chat_messages SET content = 'raced quagga', search_text = 'raced quagga'"
        " WHERE session_id = 'raced' AND position = 3"
    )
    statements = {
        indexer: lambda: indexer.fetch(write_terms, *ranges),  # reads the old document
        editor: lambda: editor.execute(edit),
    }
    try:
        for connection in (indexer, editor):
            await connection.execute("BEGIN")
        if first == "search":
            await statements[indexer]()
            waiting = asyncio.ensure_future(statements[editor]())
            await asyncio.sleep(0.3)
            assert not waiting.done()  # waits for the catch-up's commit
            await indexer.execute("COMMIT")
            await waiting
            await editor.execute("COMMIT")
        else:
            await statements[editor]()
            # The range the edit holds is skipped, not waited for; the others are taken.
            await asyncio.wait_for(statements[indexer](), 5)
            await indexer.execute("COMMIT")
            await editor.execute("COMMIT")
            assert await _pending_ranges(postgresql_storage) == 1
            await postgresql_storage.index_for_search()
    finally:
        await indexer.close()
        await editor.close()

    assert await _pending_ranges(postgresql_storage) == 0
    await _check_index(postgresql_storage)
    found = await postgresql_storage.search_messages("quagga")
    assert [m.content for m in found] == ["raced quagga"]
    # Through the index (a rare word), not the newest rows: the old words are gone.
    old_words = await postgresql_storage.search_messages("words zeppelin", limit=BULK)
    assert len(old_words) == 4
    old_words = await postgresql_storage.search_messages("common words", limit=BULK)
    assert len(old_words) == BULK - 1
    assert found[0].message_id not in {m.message_id for m in old_words}


async def test_terms_written_by_another_process_between_two_statements_of_a_search_are_found(
    postgresql_storage: PostgreSQLSessionStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by attack: the search read the index (the pending match had no terms yet),
    another process wrote the pending terms, then the search asked whether any were
    pending (none now) in a new snapshot, and returned without the match."""
    import threading

    from persistence.sql import search

    session = ChatSession.create("m")
    session.add_message("user", "the zebrafish swims")  # the oldest: below the newest rows
    for n in range(BULK):
        session.add_message("user", f"filler message {n}")
    assert await postgresql_storage.insert_sessions([session])
    assert await _pending_ranges(postgresql_storage) > 0
    url = _url(postgresql_storage)
    write_terms, ranges = WRITE_PENDING_TERMS.compile(postgresql_storage.engine.dialect).bind(
        {"ranges": 64}
    )

    async def catch_up() -> None:
        connection = await asyncpg.connect(url)
        try:
            await connection.fetch(write_terms, *ranges)
        finally:
            await connection.close()

    fetch = search.Fetch

    def fetch_after_another_catch_up(statement: object, params: dict[str, object]) -> object:
        if statement is search.ANY_PENDING_TERMS:  # another process, right now
            other = threading.Thread(target=asyncio.run, args=(catch_up(),))
            other.start()
            other.join()
        return fetch(statement, params)  # type: ignore[arg-type]

    monkeypatch.setattr(search, "Fetch", fetch_after_another_catch_up)
    found = await postgresql_storage.search_messages("zebrafish")
    assert [m.content for m in found] == ["the zebrafish swims"]
    assert await _pending_ranges(postgresql_storage) == 0


async def test_a_search_does_not_wait_for_a_unit_of_work_holding_a_pending_rows_terms(
    postgresql_storage: PostgreSQLSessionStorage,
) -> None:
    """Found by attack: a search's catch-up of the pending terms waited on the terms row
    an open unit of work's edit had written, for as long as that unit stayed open (an
    LLM call, say); SQLite's search never waits for a writer. It gives up after a short
    lock wait and tests the pending rows itself."""
    session = ChatSession.create("m")
    session.add_message("user", "the zebrafish swims")
    for n in range(BULK):
        session.add_message("user", f"filler message {n}")
    assert await postgresql_storage.insert_sessions([session])
    held, release = asyncio.Event(), asyncio.Event()

    async def hold_a_unit_of_work() -> None:
        async with postgresql_storage.unit_of_work() as uow:
            loaded = await uow.sessions.get(session.session_id)
            assert loaded is not None
            loaded.edit_message(loaded.messages[1].message_id, content="edited filler")
            await uow.sessions.add(loaded)
            held.set()
            await release.wait()
            await uow.commit()

    holder = asyncio.ensure_future(hold_a_unit_of_work())
    await held.wait()
    async with servers.second_holder(postgresql_storage) as searcher:
        try:
            found = await asyncio.wait_for(searcher.search_messages("zebrafish"), 5)
        finally:
            release.set()
            await holder
    assert [m.content for m in found] == ["the zebrafish swims"]
    # The next search writes the terms, the unit of work committed.
    assert [m.content for m in await postgresql_storage.search_messages("edited")] == [
        "edited filler"
    ]


async def _two_sessions_in_one_pending_range(storage: PostgreSQLSessionStorage) -> None:
    """Sessions `kept` and `removed`, inserted in one statement of more rows than the
    insert trigger indexes itself: their terms are pending, in one range."""
    kept, removed = (
        ChatSession.create("m", session_id="kept"),
        ChatSession.create("m", session_id="removed"),
    )
    for n in range(20):
        kept.add_message("user", f"kept zeppelin {n}")
        removed.add_message("user", f"removed zeppelin {n}")
    assert await storage.insert_sessions([kept, removed])
    assert await _pending_ranges(storage) == 1
    assert await _terms(storage) == 0


# Removals of the `removed` session's terms: its delete, and UPDATEs from outside the
# library that clear its documents or move its rows' ids.
REMOVALS = {
    "delete": "DELETE FROM chat_sessions WHERE session_id = 'removed'",
    "documents cleared": "UPDATE chat_messages SET search_text = NULL WHERE session_id = 'removed'",
    "ids moved": "UPDATE chat_messages SET id = -id WHERE session_id = 'removed'",
}


@pytest.mark.parametrize("removal", list(REMOVALS))
@pytest.mark.parametrize("first", ["catch-up", "removal"])
async def test_a_removal_racing_a_catch_up_leaves_no_terms_behind(
    postgresql_storage: PostgreSQLSessionStorage, first: str, removal: str
) -> None:
    """Found by attack: a session deleted while another process's catch-up wrote the
    pending terms of its rows kept those terms for good; the delete trigger could not
    see them, uncommitted (so did an UPDATE clearing the documents or moving the ids).
    Now the removal waits for the catch-up's commit (catch-up first), or the catch-up
    skips the range the removal holds (removal first)."""
    await _two_sessions_in_one_pending_range(postgresql_storage)
    url = _url(postgresql_storage)
    indexer, remover = await asyncpg.connect(url), await asyncpg.connect(url)
    write_terms, ranges = WRITE_PENDING_TERMS.compile(postgresql_storage.engine.dialect).bind(
        {"ranges": 64}
    )
    remove = REMOVALS[removal]
    try:
        for connection in (indexer, remover):
            await connection.execute("BEGIN")
        if first == "catch-up":
            assert tuple(await indexer.fetchrow(write_terms, *ranges)) == (1, 40)
            removing = asyncio.ensure_future(remover.execute(remove))
            await asyncio.sleep(0.3)
            assert not removing.done()  # waits for the catch-up's commit
            await indexer.execute("COMMIT")
            await removing
        else:
            await remover.execute(remove)
            # The range the removal holds is skipped, not waited for.
            taken = await asyncio.wait_for(indexer.fetchrow(write_terms, *ranges), 5)
            assert tuple(taken) == (0, 0)
            await indexer.execute("COMMIT")
        await remover.execute("COMMIT")
    finally:
        await indexer.close()
        await remover.close()

    await postgresql_storage.index_for_search()
    assert await _pending_ranges(postgresql_storage) == 0
    await _check_index(postgresql_storage)  # no terms of a removed row among them
    if removal == "ids moved":
        assert await _terms(postgresql_storage) == 40  # under their new ids
    else:
        assert await _terms(postgresql_storage) == 20
        kept_only = (
            "SELECT count(*) FROM chat_message_terms AS t WHERE NOT EXISTS (SELECT 1"
            " FROM chat_messages AS m WHERE m.id = t.id AND m.session_id = 'kept')"
        )
        assert await _scalar(postgresql_storage, kept_only) == 0


async def test_a_catch_up_never_waits_for_a_unit_of_work_that_edited_in_its_range(
    postgresql_storage: PostgreSQLSessionStorage,
) -> None:
    """Found by attack: a unit of work edited a pending row, then deleted a session in
    its range while `index_for_search()` held the range; the delete waited for the
    catch-up, the catch-up for the edit's terms, and PostgreSQL aborted the unit as a
    deadlock. The edit now holds its row's range, so no catch-up takes it: nothing
    waits for the unit, and the unit waits for nothing."""
    await _two_sessions_in_one_pending_range(postgresql_storage)
    edited, indexed = asyncio.Event(), asyncio.Event()

    async def edit_then_remove() -> None:
        async with postgresql_storage.unit_of_work() as uow:
            kept = await uow.sessions.get("kept")
            assert kept is not None
            kept.edit_message(kept.messages[0].message_id, content="kept quagga")
            await uow.sessions.add(kept)
            edited.set()
            await indexed.wait()
            assert await asyncio.wait_for(uow.sessions.delete("removed"), 5)
            await uow.commit()

    unit = asyncio.ensure_future(edit_then_remove())
    await edited.wait()
    async with servers.second_holder(postgresql_storage) as indexer:
        try:
            # The range is the unit's: skipped at once, nothing written.
            assert await asyncio.wait_for(indexer.index_for_search(), 5) == 0
        finally:
            indexed.set()
            await unit
    assert await _pending_ranges(postgresql_storage) == 1

    assert await postgresql_storage.index_for_search() == 19  # the edit wrote its own
    assert await _pending_ranges(postgresql_storage) == 0
    await _check_index(postgresql_storage)
    found = await postgresql_storage.search_messages("zeppelin", limit=100)
    assert sorted(m.content for m in found) == sorted(f"kept zeppelin {n}" for n in range(1, 20))
    assert [m.content for m in await postgresql_storage.search_messages("quagga")] == [
        "kept quagga"
    ]


async def test_terms_of_rows_removed_under_a_range_not_yet_committed_are_deleted_later(
    postgresql_storage: PostgreSQLSessionStorage,
) -> None:
    """Found by attack: a range is recorded at its statement's commit, so a removal
    whose trigger ran before then could neither see nor lock a range spanning its rows
    (a slow INSERT ... SELECT beside another session's inserts). The catch-up took that
    range while the removal stayed open, and wrote the removed rows' terms for good.
    Now a catch-up once every transaction then running has ended deletes them."""
    victim = ChatSession.create("m", session_id="victim")
    for n in range(40):
        victim.add_message("user", f"victim zeppelin {n}")
    assert await postgresql_storage.insert_sessions([victim])
    first_id, last_id = (
        await _scalar(postgresql_storage, "SELECT min(id) FROM chat_messages"),
        await _scalar(postgresql_storage, "SELECT max(id) FROM chat_messages"),
    )
    url = _url(postgresql_storage)
    spanning, remover, indexer = [await asyncpg.connect(url) for _ in range(3)]
    write_terms, ranges = WRITE_PENDING_TERMS.compile(postgresql_storage.engine.dialect).bind(
        {"ranges": 64}
    )
    try:
        # Another writer's statement spanning the victim's rows records its range,
        # visible only at its commit (as a bulk INSERT's trigger does).
        await spanning.execute("BEGIN")
        await spanning.execute(
            "INSERT INTO chat_terms_pending (first_id, last_id) VALUES ($1, $2)",
            first_id - 1,
            last_id + 1,
        )
        await remover.execute("BEGIN")
        await remover.execute("DELETE FROM chat_sessions WHERE session_id = 'victim'")
        await spanning.execute("COMMIT")
        # The spanning range is free: its rows' terms are written, the victim's with them.
        taken, written = await asyncio.wait_for(indexer.fetchrow(write_terms, *ranges), 5)
        assert (taken, written) == (1, 40)
        await remover.execute("COMMIT")
    finally:
        for connection in (spanning, remover, indexer):
            await connection.close()
    assert await _terms(postgresql_storage) == 40  # for now

    # Once every transaction of the cluster running then has ended (another process's
    # may still run a while: the next catch-up after it does the same).
    for _ in range(100):
        await postgresql_storage.index_for_search()
        if await _terms(postgresql_storage) == 0:
            break
        await asyncio.sleep(0.1)
    assert await _pending_ranges(postgresql_storage) == 0
    await _check_index(postgresql_storage)
    assert await _terms(postgresql_storage) == 0
    assert await postgresql_storage.search_messages("zeppelin") == []


async def test_the_cleanup_of_settled_ranges_reads_only_those_ranges(
    postgresql_storage: PostgreSQLSessionStorage,
) -> None:
    """Found by measuring (revision 0014): 0013's cleanup hashed the whole messages table
    on every call of a catch-up, whatever it cleaned, so the first search after a bulk
    insert of 100,000 messages took 3.1-3.3 s instead of 2.0-2.1 s, and more as the
    store grew. Now it reads the ranges it cleans by their keys: no sequential scan."""
    for n in range(4):
        session = ChatSession.create("m", session_id=f"bulk-{n}")
        for number in range(5000):
            session.add_message("user", f"common words {number}")
        assert await postgresql_storage.insert_sessions([session])
    assert await postgresql_storage.index_for_search() == 20_000
    await postgresql_storage.delete_session("bulk-1")
    url = _url(postgresql_storage)
    connection = await asyncpg.connect(url)
    write_terms, ranges = WRITE_PENDING_TERMS.compile(postgresql_storage.engine.dialect).bind(
        {"ranges": 64}
    )
    try:
        await connection.execute("ANALYZE chat_messages")
        # What the last catch-up wrote, taken as settled: a transaction of another
        # database of the cluster (another test run) may still hold it back.
        await connection.execute("UPDATE chat_terms_recheck SET settled_at = 0")
        settled = await connection.fetchval("SELECT count(*) FROM chat_terms_recheck")
        assert settled > 0
        async with connection.transaction():
            taken, written = await connection.fetchrow(write_terms, *ranges)
            scans = await connection.fetchval(
                "SELECT seq_scan FROM pg_stat_xact_user_tables WHERE relname = 'chat_messages'"
            )
            cleaned = settled - await connection.fetchval("SELECT count(*) FROM chat_terms_recheck")
    finally:
        await connection.close()
    assert (taken, written) == (0, 0)
    assert cleaned == min(settled, 64)
    assert scans == 0
    await _check_index(postgresql_storage)


async def _indexed_session(storage: PostgreSQLSessionStorage, session_id: str) -> None:
    """A session of 500 messages, bulk-inserted, its terms written."""
    session = ChatSession.create("m", session_id=session_id)
    for n in range(500):
        session.add_message("user", f"common words {n}")
    assert await storage.insert_sessions([session])
    await storage.index_for_search()


async def _stale_terms_at(connection: asyncpg.Connection, stale: int, first: int) -> None:
    """Leaves the terms of the row `stale` behind it, gone, in a settled recheck range
    from `first`: as a removal under a range it could not lock leaves them."""
    await connection.execute("DELETE FROM chat_terms_recheck")
    await connection.execute("ALTER TABLE chat_messages DISABLE TRIGGER chat_message_terms_delete")
    await connection.execute("DELETE FROM chat_messages WHERE id = $1", stale)
    await connection.execute("ALTER TABLE chat_messages ENABLE TRIGGER chat_message_terms_delete")
    await connection.execute(
        "INSERT INTO chat_terms_recheck (first_id, last_id, settled_at) VALUES ($1, $2, 0)",
        first,
        first + 99,
    )


async def test_the_cleanup_keeps_the_terms_of_a_row_moved_onto_a_stale_id(
    postgresql_storage: PostgreSQLSessionStorage,
) -> None:
    """Found by attack: stale terms of a gone row X in a settled range; an UPDATE from
    outside the library moved a live row's id onto X (its trigger rewrote X's terms)
    and committed while the cleanup's delete waited on that terms row. The delete tested
    only the id again, and removed the live row's new terms: search never found it.
    Now the cleanup locks its candidates, then tests them in a snapshot taken after."""
    await _indexed_session(postgresql_storage, "moved")
    url = _url(postgresql_storage)
    cleaner, mover = await asyncpg.connect(url), await asyncpg.connect(url)
    write_terms, ranges = WRITE_PENDING_TERMS.compile(postgresql_storage.engine.dialect).bind(
        {"ranges": 64}
    )
    try:
        first = await cleaner.fetchval("SELECT min(id) FROM chat_messages")
        stale, live = first + 10, first + 90
        await _stale_terms_at(cleaner, stale, first)
        move = mover.transaction()
        await move.start()
        await mover.execute(
            "UPDATE chat_messages SET id = $1, content = 'quokka', search_text = 'quokka'"
            " WHERE id = $2",
            stale,
            live,
        )
        cleanup = asyncio.create_task(cleaner.fetchrow(write_terms, *ranges))
        await asyncio.sleep(0.5)
        assert not cleanup.done()  # waiting on the terms row the move rewrote
        await move.commit()
        await asyncio.wait_for(cleanup, 5)
    finally:
        await cleaner.close()
        await mover.close()
    await _check_index(postgresql_storage)
    assert [m.content for m in await postgresql_storage.search_messages("quokka")] == ["quokka"]


async def test_an_edit_that_holds_no_range_keeps_its_terms_against_a_catch_up(
    postgresql_storage: PostgreSQLSessionStorage,
) -> None:
    """An edit whose trigger ran before a range covering its row was recorded (an
    outside bulk insert with ids around it) holds no range. The catch-up reads the old
    document and waits on the edit's terms row: it must keep the edit's terms. Found by
    attack on a catch-up that replaced terms differing from what it read (5 of 5
    rounds kept the old document's terms); it does nothing on a conflict."""
    url = _url(postgresql_storage)
    writer, editor = await asyncpg.connect(url), await asyncpg.connect(url)
    insert = (
        "INSERT INTO chat_messages (id, message_id, session_id, position, role, content,"
        " created_at, metadata, search_text) SELECT id, 'r' || id, 'held', id, 'user', $2,"
        " now(), '{}', $2 FROM generate_series($1::bigint, $3::bigint) AS id WHERE id <> $4"
    )
    try:
        await postgresql_storage.save_session(ChatSession.create("m", session_id="held"))
        await writer.execute(insert, 1000, "aardvark", 1000, 0)  # X, its terms at once
        edit = editor.transaction()
        await edit.start()
        await editor.execute(
            "UPDATE chat_messages SET content = 'zebra', search_text = 'zebra' WHERE id = 1000"
        )
        await writer.execute(insert, 980, "filler", 1020, 1000)  # 40 rows: a range over X
        catch_up = asyncio.create_task(postgresql_storage.index_for_search())
        await asyncio.sleep(0.03)
        await edit.commit()
        await asyncio.wait_for(catch_up, 20)
    finally:
        await writer.close()
        await editor.close()
    await postgresql_storage.index_for_search()

    await _check_index(postgresql_storage)
    assert [m.content for m in await postgresql_storage.search_messages("zebra")] == ["zebra"]
    assert await postgresql_storage.search_messages("aardvark") == []


async def test_a_catch_up_on_a_repeatable_read_database_waits_as_on_read_committed(
    postgresql_storage: PostgreSQLSessionStorage,
) -> None:
    """Found by attack: with `default_transaction_isolation = 'repeatable read'` on the
    database, a catch-up that waited on a terms row another writer changed failed with
    a serialization error (its statements are built to see what committed meanwhile).
    So did a delete beside a catch-up, and the second of two units of work appending to
    one session. The library's connections use READ COMMITTED whatever the default."""
    await _indexed_session(postgresql_storage, "moved")
    url = _url(postgresql_storage)
    async with _repeatable_read_by_default(url):
        await _catch_up_and_units_of_work(postgresql_storage, url)


@asynccontextmanager
async def _repeatable_read_by_default(url: str) -> AsyncIterator[None]:
    """The database's `default_transaction_isolation` 'repeatable read' meanwhile (the
    fixture's database serves the tests after)."""
    admin = await asyncpg.connect(url)
    database = await admin.fetchval("SELECT current_database()")
    try:
        await admin.execute(
            f"ALTER DATABASE \"{database}\" SET default_transaction_isolation = 'repeatable read'"
        )
        yield
    finally:
        await admin.execute(f'ALTER DATABASE "{database}" RESET default_transaction_isolation')
        await admin.close()


async def _catch_up_and_units_of_work(
    postgresql_storage: PostgreSQLSessionStorage, url: str
) -> None:
    mover = await asyncpg.connect(url)
    try:
        first = await mover.fetchval("SELECT min(id) FROM chat_messages")
        await _stale_terms_at(mover, first + 10, first)
        async with _same_store(postgresql_storage, reading=False) as other:
            move = mover.transaction()
            await move.start()
            await mover.execute(
                "UPDATE chat_messages SET id = $1, content = 'quokka', search_text = 'quokka'"
                " WHERE id = $2",
                first + 10,
                first + 90,
            )
            catch_up = asyncio.create_task(other.index_for_search())
            await asyncio.sleep(0.5)
            await move.commit()
            await asyncio.wait_for(catch_up, 10)
    finally:
        await mover.close()
    await _check_index(postgresql_storage)
    assert [m.content for m in await postgresql_storage.search_messages("quokka")] == ["quokka"]

    # Two units of work appending to one session: the second waits for the first's
    # commit, then appends after it.
    added = asyncio.Event()

    async def append(storage: SessionStorage, text: str, first: bool) -> None:
        async with storage.unit_of_work() as uow:
            moved = await uow.sessions.get("moved")
            assert moved is not None
            moved.add_message("user", text)
            if not first:
                await added.wait()
            await uow.sessions.add(moved)
            if first:
                added.set()
                await asyncio.sleep(0.3)
            await uow.commit()

    async with (
        _same_store(postgresql_storage, reading=False) as one,
        _same_store(postgresql_storage, reading=False) as two,
    ):
        await asyncio.gather(append(one, "from one", True), append(two, "from two", False))
    loaded = await postgresql_storage.load_session("moved")
    assert loaded is not None
    assert [m.content for m in loaded.messages][-2:] == ["from one", "from two"]
