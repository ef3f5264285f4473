"""verify_migration: does the destination hold what the source holds, field for field?

Both stores are walked in batches through `SessionStorage` alone: each batch of source
sessions is compared with the same ids loaded from the destination, so memory stays
flat and the comparison does not depend on how either database orders strings. The
destination is walked for extra records only when its counts say some exist.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from datetime import datetime
from typing import Any

from persistence.arguments import callback_argument, refuse_one_store, storage_argument
from persistence.models import ChatMessage, ChatSession
from persistence.storage import SessionStorage, StorageCounts, check_batch_size
from persistence.transfer.streams import read_ahead

# The report lists at most this many mismatches one by one; the totals count them all.
MISMATCH_LIMIT = 1000
_SHOWN_CHARACTERS = 200

SESSION_FIELDS = ("model", "created_at", "updated_at", "message_count", "metadata", "status")
# What a destination session keeps of its own when a merge adds to it.
_OWN_FIELDS = tuple(name for name in SESSION_FIELDS if name != "message_count")
MESSAGE_FIELDS = ("role", "content", "created_at", "metadata")
FILE_FIELDS = (
    "gemini_file_name",
    "gemini_file_uri",
    "display_name",
    "size",
    "mime_type",
    "uploaded_at",
    "expires_at",
    "metadata",
)
_RESULT_TOTALS = (
    "sessions_checked",
    "messages_checked",
    "files_checked",
    "missing_sessions",
    "extra_sessions",
    "differing_sessions",
    "misordered_sessions",
    "missing_messages",
    "extra_messages",
    "differing_messages",
    "missing_files",
    "extra_files",
    "differing_files",
    "sessions_with_own_fields",
)
_TOTAL_NAMES = {
    "missing": "missing",
    "extra": "extra",
    "different": "differing",
    "out_of_order": "misordered",
}


def counts_summary(counts: StorageCounts) -> dict[str, Any]:
    """A StorageCounts as plain JSON-ready values."""
    return {
        "sessions": counts.total_sessions,
        "sessions_by_status": dict(counts.sessions_by_status),
        "messages": counts.messages,
        "files": counts.files,
    }


def _canonical(value: Any) -> str:
    # Key order is not data (JSONB reorders keys), but 1, 1.0 and true are distinct.
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def same_value(left: Any, right: Any) -> bool:
    if isinstance(left, dict) or isinstance(right, dict):
        if left == {} and right == {}:
            return type(left) is type(right)
        # == first: most differing values differ there, and it is much cheaper.
        return bool(left == right) and _canonical(left) == _canonical(right)
    return type(left) is type(right) and bool(left == right)


def _same_message(source: ChatMessage, destination: ChatMessage) -> bool:
    return (
        source.message_id == destination.message_id
        and source.content == destination.content
        and source.role == destination.role
        and source.created_at == destination.created_at
        and same_value(source.metadata, destination.metadata)
    )


def _shown(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat(timespec="milliseconds")
    if isinstance(value, dict):
        value = _canonical(value)
    if isinstance(value, str) and len(value) > _SHOWN_CHARACTERS:
        return f"{value[:_SHOWN_CHARACTERS]}... ({len(value)} characters)"
    return value


class Report:
    """Mismatches (the first MISMATCH_LIMIT listed) and totals of one verification."""

    def __init__(self) -> None:
        self.mismatches: list[dict[str, Any]] = []
        self.mismatch_count = 0
        self.totals: Counter[str] = Counter()

    def add(self, kind: str, problem: str, identifier: str, **details: Any) -> None:
        self.mismatch_count += 1
        if len(self.mismatches) < MISMATCH_LIMIT:
            entry = {"kind": kind, "problem": problem, "id": identifier}
            entry.update({key: _shown(value) for key, value in details.items()})
            self.mismatches.append(entry)

    def result(
        self, source_counts: StorageCounts, destination_counts: StorageCounts, started: float
    ) -> dict[str, Any]:
        """The report as verify_migration returns it."""
        result: dict[str, Any] = {
            "ok": self.mismatch_count == 0,
            "mismatch_count": self.mismatch_count,
            "mismatches": self.mismatches,
            "mismatches_truncated": self.mismatch_count > len(self.mismatches),
        }
        for name in _RESULT_TOTALS:
            result[name] = self.totals[name]
        result["source_counts"] = counts_summary(source_counts)
        result["destination_counts"] = counts_summary(destination_counts)
        result["duration_seconds"] = round(time.perf_counter() - started, 3)
        return result

    def tally(self, kind: str, problem: str, amount: int = 1) -> None:
        self.totals[f"{_TOTAL_NAMES[problem]}_{kind}s"] += amount

    def fields(
        self,
        kind: str,
        identifier: str,
        names: tuple[str, ...],
        source: Any,
        destination: Any,
        **context: Any,
    ) -> bool:
        differs = False
        for name in names:
            left, right = getattr(source, name), getattr(destination, name)
            if not same_value(left, right):
                differs = True
                self.add(
                    kind,
                    "different",
                    identifier,
                    field=name,
                    source=left,
                    destination=right,
                    **context,
                )
        return differs


def _compare_session_fields(
    report: Report,
    source: ChatSession,
    destination: ChatSession,
    *,
    additive: bool,
    held: bool = False,
) -> None:
    sid = source.session_id
    if not additive:
        if report.fields("session", sid, SESSION_FIELDS, source, destination):
            report.tally("session", "different")
        return
    # A merge only adds: a session the destination held keeps its own fields and the
    # values of its metadata keys, so only a metadata key it lacks is a failed copy.
    lacking = [key for key in source.metadata if key not in destination.metadata]
    if lacking:
        report.tally("session", "different")
        report.add("session", "different", sid, field="metadata", missing_keys=lacking)
    elif any(
        not same_value(getattr(source, name), getattr(destination, name)) for name in _OWN_FIELDS
    ):
        if held or (destination.revision or 1) > 1:
            # Written since it was created (by a merge, or by its users): its own.
            report.totals["sessions_with_own_fields"] += 1
        elif report.fields("session", sid, SESSION_FIELDS, source, destination):
            # Never written since the copy inserted it: a field copied wrongly.
            report.tally("session", "different")


def compare_sessions(
    report: Report,
    source: ChatSession,
    destination: ChatSession,
    *,
    additive: bool,
    held: bool = False,
) -> None:
    """Compares one session of both stores; `held`: the destination held it before the
    copy, so (with `additive`) its own fields are its own whatever its revision."""
    if len(source.messages) == len(destination.messages) and all(
        map(_same_message, source.messages, destination.messages)
    ):
        # The usual case, checked without building sets: the same messages in order.
        _compare_session_fields(report, source, destination, additive=additive, held=held)
        return
    sid = source.session_id
    source_ids = {message.message_id for message in source.messages}
    stored = {message.message_id: message for message in destination.messages}
    extra = [message for message in destination.messages if message.message_id not in source_ids]
    _compare_session_fields(report, source, destination, additive=additive, held=held)

    for message in source.messages:
        found = stored.get(message.message_id)
        if found is None:
            report.tally("message", "missing")
            report.add("message", "missing", message.message_id, session_id=sid)
        elif report.fields(
            "message", message.message_id, MESSAGE_FIELDS, message, found, session_id=sid
        ):
            report.tally("message", "different")

    source_order = [
        message.message_id for message in source.messages if message.message_id in stored
    ]
    stored_order = [
        message.message_id for message in destination.messages if message.message_id in source_ids
    ]
    if source_order != stored_order:
        report.tally("session", "out_of_order")
        report.add("session", "out_of_order", sid, field="messages")

    report.tally("message", "extra", len(extra))
    if not additive:
        for message in extra:
            report.add("message", "extra", message.message_id, session_id=sid)


async def _compare_all_sessions(
    report: Report,
    source: SessionStorage,
    destination: SessionStorage,
    *,
    additive: bool,
    batch_size: int,
    progress: Callable[[int], object],
) -> int:
    """Compares every source session with the destination's; returns how many it found.

    The source streams in its key order, read a batch ahead; each batch's counterparts
    come from the destination in one lookup by id, so nothing depends on how either
    database collates strings, and no session costs a round trip of its own.
    """
    found = 0
    async for batch in read_ahead(source.iter_sessions(batch_size, with_messages=True)):
        stored = {
            session.session_id: session
            for session in await destination.load_sessions([s.session_id for s in batch])
        }
        for session in batch:
            report.totals["sessions_checked"] += 1
            report.totals["messages_checked"] += len(session.messages)
            counterpart = stored.get(session.session_id)
            if counterpart is None:
                report.tally("session", "missing")
                report.tally("message", "missing", len(session.messages))
                report.add("session", "missing", session.session_id, messages=len(session.messages))
            else:
                found += 1
                compare_sessions(report, session, counterpart, additive=additive)
        progress(report.totals["sessions_checked"])
    return found


async def _find_extra_sessions(
    report: Report, source: SessionStorage, destination: SessionStorage, batch_size: int
) -> None:
    async for batch in destination.iter_sessions(batch_size, with_messages=False):
        known = {s.session_id for s in await source.load_sessions([s.session_id for s in batch])}
        for session in batch:
            if session.session_id not in known:
                report.tally("session", "extra")
                report.tally("message", "extra", session.message_count)
                report.add("session", "extra", session.session_id, messages=session.message_count)


async def _compare_files(
    report: Report, source: SessionStorage, destination: SessionStorage, batch_size: int
) -> int:
    found = 0
    async for batch in source.iter_file_records(batch_size):
        stored = {
            record.file_id: record
            for record in await destination.load_file_records([r.file_id for r in batch])
        }
        for record in batch:
            report.totals["files_checked"] += 1
            counterpart = stored.get(record.file_id)
            if counterpart is None:
                report.tally("file", "missing")
                report.add("file", "missing", record.file_id)
                continue
            found += 1
            if report.fields("file", record.file_id, FILE_FIELDS, record, counterpart):
                report.tally("file", "different")
    return found


async def _find_extra_files(
    report: Report, source: SessionStorage, destination: SessionStorage, batch_size: int
) -> None:
    async for batch in destination.iter_file_records(batch_size):
        known = {r.file_id for r in await source.load_file_records([r.file_id for r in batch])}
        for record in batch:
            if record.file_id not in known:
                report.tally("file", "extra")
                report.add("file", "extra", record.file_id)


async def verify_migration(
    source: SessionStorage,
    destination: SessionStorage,
    *,
    additive: bool = False,
    batch_size: int = 500,
    progress_callback: Callable[[int, int], object] | None = None,
) -> dict[str, Any]:
    """Compares two stores: every session, message and file record, field by field.

    `progress_callback(checked, total)` sees the source sessions checked so far.

    With `additive=True` (what `migrate_storage` checked before it kept a ledger:
    copy_check.verify_copy) the destination may hold more
    than the source, as a merge only adds: records only the destination holds, and the
    fields and metadata values of a session written there since it was created (a merge
    keeps them; revision above 1), do not make the result fail; they are still counted
    ("extra_...", "sessions_with_own_fields"). What does: a missing session, message or
    metadata key, a message that differs, messages out of order, and a field of a
    session never written since it was inserted that differs from the source's.

    Returns:
        {"ok", "mismatches" (at most MISMATCH_LIMIT entries, each with kind, problem,
        id and, for a differing field, field/source/destination), "mismatch_count",
        "mismatches_truncated", totals such as "missing_sessions", "extra_messages",
        "differing_files", "misordered_sessions", the counts of both stores and
        "duration_seconds"}.

    Raises:
        InvalidDataError: if batch_size is not positive, or both sides are one store
            (by any path or URL).
        PersistenceError: if either store fails.
    """
    storage_argument(source, "source")
    storage_argument(destination, "destination")
    callback_argument(progress_callback)
    check_batch_size(batch_size)
    started = time.perf_counter()
    report = Report()
    source_counts = await source.count()  # opened: each storage knows its store now
    await refuse_one_store(source, destination, reading=True)
    destination_counts = await destination.count()

    total = source_counts.total_sessions

    def progress(checked: int) -> None:
        if progress_callback is not None:
            progress_callback(checked, max(total, checked))

    progress(0)
    found_sessions = await _compare_all_sessions(
        report, source, destination, additive=additive, batch_size=batch_size, progress=progress
    )
    found_files = await _compare_files(report, source, destination, batch_size)
    extra_sessions = destination_counts.total_sessions - found_sessions
    extra_files = destination_counts.files - found_files
    if additive:
        report.totals["extra_sessions"] += max(extra_sessions, 0)
        report.totals["extra_files"] += max(extra_files, 0)
    else:
        if extra_sessions > 0:
            await _find_extra_sessions(report, source, destination, batch_size)
        if extra_files > 0:
            await _find_extra_files(report, source, destination, batch_size)

    return report.result(source_counts, destination_counts, started)
