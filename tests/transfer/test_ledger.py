"""The migration ledger: every session and file it records, in order, in flat memory."""

from __future__ import annotations

import gc
import sys
import tracemalloc
from pathlib import Path

import pytest

from persistence import PersistenceError
from persistence.transfer.ledger import HELD, INSERTED, MERGED, Entry, Ledger


def test_batches_give_every_entry_in_the_order_first_recorded() -> None:
    ledger = Ledger()
    ledger.record_sessions([(f"s{i}", Entry(INSERTED, 1, 3)) for i in range(5)])
    # Recorded again (a batch that planned twice): its place stays, its outcome is new.
    ledger.record_sessions([("s1", Entry(MERGED, 7, 4)), ("t", Entry(HELD, None, None))])
    ledger.record_files([("f2", True), ("f1", False)])
    ledger.record_files([("f2", False)])

    assert len(ledger) == 6
    got = [entry for batch in ledger.batches(4) for entry in batch]
    assert [len(batch) for batch in ledger.batches(4)] == [4, 2]
    assert got == [
        ("s0", Entry(INSERTED, 1, 3)),
        ("s1", Entry(MERGED, 7, 4)),
        ("s2", Entry(INSERTED, 1, 3)),
        ("s3", Entry(INSERTED, 1, 3)),
        ("s4", Entry(INSERTED, 1, 3)),
        ("t", Entry(HELD, None, None)),
    ]
    assert [entry for batch in ledger.file_batches(1) for entry in batch] == [
        ("f2", False),
        ("f1", False),
    ]
    ledger.close()


def test_ids_of_any_text_come_back_unchanged() -> None:
    ledger = Ledger()
    ids = ["'; DROP TABLE sessions; --", "ünï\u2028cøde", "x" * 255, " "]
    ledger.record_sessions([(session_id, Entry(HELD, 2, 2)) for session_id in ids])
    assert [session_id for batch in ledger.batches(10) for session_id, _ in batch] == ids
    ledger.close()


def test_a_closed_ledger_is_refused() -> None:
    ledger = Ledger()
    ledger.close()
    with pytest.raises(PersistenceError, match="the migration's ledger failed"):
        len(ledger)


def test_a_ledger_that_cannot_write_stops_the_copy_with_a_library_error() -> None:
    """Its temporary file on a full disk: SQLite says so, and the copy stops with a
    PersistenceError naming the ledger, not a bare sqlite3 error."""
    ledger = Ledger()
    ledger._db.execute("PRAGMA max_page_count = 4")  # a disk that holds 4 pages
    entries = [(f"{i:036d}", Entry(INSERTED, 1, 1)) for i in range(1_000)]
    with pytest.raises(PersistenceError, match="ledger failed: database or disk is full"):
        ledger.record_sessions(entries)
    ledger.close()


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS line")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_memory_stays_flat_however_many_sessions_it_records() -> None:
    """Found by measuring: as a dict, the ledger took about 106 bytes per session, so
    a migration's memory grew with the store. 200,000 sessions with 36-character ids
    took 21 MB that way; SQLite's temporary database keeps them in its 2 MB cache."""
    sessions, batch = 200_000, 1_000
    gc.collect()
    tracemalloc.start()
    rss_before = _rss_bytes()
    try:
        ledger = Ledger()
        for start in range(0, sessions, batch):
            ledger.record_sessions(
                [(f"{i:036d}", Entry(INSERTED, 1, 1)) for i in range(start, start + batch)]
            )
        rss_after = _rss_bytes()
        python_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(ledger) == sessions
    assert sum(len(b) for b in ledger.batches(5_000)) == sessions
    ledger.close()
    assert python_peak < 2_000_000
    # SQLite allocates outside tracemalloc's sight: the process's resident memory
    # tells. A dict of the same entries grows it by about 21 MB.
    assert rss_after - rss_before < 8_000_000
