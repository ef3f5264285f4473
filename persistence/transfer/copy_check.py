"""The check migrate_storage runs: exactly what this copy wrote or found, nothing else.

`verify_migration(additive=True)` compares two stores as they are: with live writers
on either side, or a destination that held sessions before, it failed where nothing
was lost (a session the source grew after its batch was copied, one a service rewound
in the destination, a field the destination held) and could not say why. This check
walks the copy's `Ledger` instead and compares a session only where both stores still
hold it at the revision the copy saw; the others are counted and named, not compared.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from persistence.storage import SessionStorage
from persistence.transfer.ledger import HELD, INSERTED, MERGED, Ledger
from persistence.transfer.sides import failing_store
from persistence.transfer.verification import (
    FILE_FIELDS,
    MISMATCH_LIMIT,
    Report,
    compare_sessions,
    same_value,
)

# Sessions of the ledger in each of these states: counted as "sessions_<state>" and
# named (the first MISMATCH_LIMIT) as "<state>".
_STATES = (
    INSERTED,  # ledger outcomes
    MERGED,
    HELD,
    "written_since",  # in the destination by another writer since the copy: not compared
    "changed_in_source_since",  # in the source since the copy read it: not compared
    "deleted_in_source_since",  # from the source since the copy read it: not compared
)


class _States:
    def __init__(self) -> None:
        self.counts = dict.fromkeys(_STATES, 0)
        self.named: dict[str, list[str]] = {state: [] for state in _STATES}

    def add(self, state: str, session_id: str) -> None:
        self.counts[state] += 1
        if len(self.named[state]) < MISMATCH_LIMIT:
            self.named[state].append(session_id)


async def _compare_files(
    report: Report,
    ledger: Ledger,
    source: SessionStorage,
    destination: SessionStorage,
    batch_size: int,
) -> tuple[int, int]:
    """Compares the file records the copy read; returns how many each store holds.

    File records have no revision: one the copy inserted must hold the source's values
    (a service's change since fails the check), one the destination held keeps its own
    (counted as "files_with_own_fields").
    """
    found = in_source = 0
    for batch in ledger.file_batches(batch_size):
        ids = [file_id for file_id, _ in batch]
        with failing_store("destination"):
            held_now = {r.file_id: r for r in await destination.load_file_records(ids)}
        with failing_store("source"):
            read_now = {r.file_id: r for r in await source.load_file_records(ids)}
        found, in_source = found + len(held_now), in_source + len(read_now)
        for file_id, inserted in batch:
            report.totals["files_checked"] += 1
            stored, read = held_now.get(file_id), read_now.get(file_id)
            if stored is None:
                report.tally("file", "missing")
                report.add("file", "missing", file_id)
            elif read is None:
                continue  # deleted in the source since the copy read it
            elif not inserted:
                if any(not same_value(getattr(read, n), getattr(stored, n)) for n in FILE_FIELDS):
                    report.totals["files_with_own_fields"] += 1
            elif report.fields("file", file_id, FILE_FIELDS, read, stored):
                report.tally("file", "different")
    return found, in_source


async def verify_copy(
    ledger: Ledger,
    source: SessionStorage,
    destination: SessionStorage,
    *,
    batch_size: int,
    progress_callback: Callable[[int, int], object] | None = None,
) -> dict[str, Any]:
    """Checks what a copy wrote against both stores; `progress_callback(checked, total)`.

    A session the copy inserted must hold exactly the source's fields and messages; one
    the destination held must hold every message and metadata key of the source's and
    keeps its own fields (counted as "sessions_with_own_fields"). Compared only while
    the destination's copy is at the revision the copy left it and the source's at the
    revision the copy read; otherwise counted as written there since. A session the copy
    wrote or found that the destination no longer holds is missing: deleted there since,
    or lost, which no revision can tell apart. Source sessions the copy never read
    (created behind it) are counted as "source_sessions_not_copied". File records: see
    `_compare_files`.

    Returns:
        verify_migration's report (totals, "mismatches", "ok"), and per state in
        _STATES "sessions_<state>" and the ids "<state>" (the first MISMATCH_LIMIT),
        "sessions_compared", "source_sessions_not_copied", "files_with_own_fields"
        and "source_files_not_copied".

    Raises:
        PersistenceError: if either store fails.
    """
    started = time.perf_counter()
    report = Report()
    states = _States()
    total = len(ledger)
    found_in_source = found_in_destination = compared = 0
    if progress_callback is not None:
        progress_callback(0, total)
    for batch in ledger.batches(batch_size):
        ids = [session_id for session_id, _ in batch]
        with failing_store("destination"):
            held_now = {s.session_id: s for s in await destination.load_sessions(ids)}
        with failing_store("source"):
            read_now = {s.session_id: s for s in await source.load_sessions(ids)}
        found_in_source += len(read_now)
        found_in_destination += len(held_now)
        for session_id, entry in batch:
            report.totals["sessions_checked"] += 1
            stored, read = held_now.get(session_id), read_now.get(session_id)
            states.add(entry.outcome, session_id)
            if stored is None:
                report.tally("session", "missing")
                report.add(
                    "session",
                    "missing",
                    session_id,
                    note="this migration wrote or found it; deleted there since, or lost",
                )
            elif stored.revision != entry.destination_revision:
                states.add("written_since", session_id)
            elif read is None:
                states.add("deleted_in_source_since", session_id)
            elif read.revision != entry.source_revision:
                states.add("changed_in_source_since", session_id)
            else:
                compared += 1
                report.totals["messages_checked"] += len(read.messages)
                held = entry.outcome != INSERTED
                compare_sessions(report, read, stored, additive=held, held=held)
        if progress_callback is not None:
            progress_callback(report.totals["sessions_checked"], total)
    found_files, files_in_source = await _compare_files(
        report, ledger, source, destination, batch_size
    )
    with failing_store("source"):
        source_counts = await source.count()
    with failing_store("destination"):
        destination_counts = await destination.count()
    report.totals["extra_sessions"] += max(
        destination_counts.total_sessions - found_in_destination, 0
    )
    report.totals["extra_files"] += max(destination_counts.files - found_files, 0)
    result = report.result(source_counts, destination_counts, started)
    result["sessions_compared"] = compared
    result["source_sessions_not_copied"] = max(source_counts.total_sessions - found_in_source, 0)
    result["files_with_own_fields"] = report.totals["files_with_own_fields"]
    result["source_files_not_copied"] = max(source_counts.files - files_in_source, 0)
    for state in _STATES:
        result[f"sessions_{state}"] = states.counts[state]
        result[state] = states.named[state]
    return result
