"""A copy into a store that began and has not finished, noted in that store.

A migrate (or a restore) killed outright (SIGKILL, the OOM killer, a lost terminal)
runs no code of ours: its destination held the batches that had committed, looked like
a smaller store, and nothing in it said otherwise. So a copy now notes in the
destination, before its first write, which store it copies from and when it began
(persistence.store_notes), and removes the note once its last batch has committed. A
note left is a copy that has not finished: killed, stopped by an error or Ctrl-C, or
running now. Running it again from the same source finishes it and removes the note;
`persistence stats` and `persistence verify` show it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from persistence.clock import utc_now
from persistence.identifiers import random_hex_id
from persistence.storage import SessionStorage

# A note's name: this, 24 hex digits of its source's key, a space, 16 of its run (51
# characters). Each run has its own: a copy running beside another from the same
# source keeps its note when the other finishes (found by attack).
_COPY_NOTE = "copy from "


@dataclass(frozen=True, slots=True)
class UnfinishedCopy:
    """A copy into a store that began at `started_at` (None: not legible) from `source`
    (the source storage as displayed, password masked) and has not finished."""

    source: str
    started_at: datetime | None

    def shown(self) -> str:
        when = "at an unknown time" if self.started_at is None else self.started_at.isoformat()
        return f"a copy from {self.source}, begun {when}, has not finished"


def copy_json(copy: UnfinishedCopy) -> dict[str, str | None]:
    """`copy` as the commands' --json output shows it."""
    started = None if copy.started_at is None else copy.started_at.isoformat()
    return {"source": copy.source, "started_at": started}


@dataclass(frozen=True, slots=True)
class CopySource:
    """How a copy's note names its source: `shown` (the source storage as displayed, or
    what it was read from: a restore's backup file), and `key`, the source store's
    (SessionStorage.source_key), by which a copy from it that finishes takes over the
    notes of those from it begun before."""

    shown: str
    key: str

    @classmethod
    async def of(cls, source: SessionStorage) -> CopySource:
        return cls(repr(source), await source.source_key())

    @property
    def prefix(self) -> str:
        return f"{_COPY_NOTE}{hashlib.sha256(self.key.encode()).hexdigest()[:24]} "


@dataclass(frozen=True, slots=True)
class CopyNote:
    """The note one copy wrote: its name, and its run's number among the copies from
    its source into the destination (each one more than the greatest noted there)."""

    name: str
    run: int


async def copy_begins(source: CopySource, destination: SessionStorage) -> CopyNote:
    """Notes in `destination` (open) that a copy from `source` has begun."""
    runs = [
        _run_of(value)
        for name, value in (await destination.read_notes()).items()
        if name.startswith(source.prefix)
    ]
    note = CopyNote(f"{source.prefix}{random_hex_id()[:16]}", max(runs, default=0) + 1)
    value = {"source": source.shown, "started_at": utc_now().isoformat(), "run": note.run}
    await destination.write_note(note.name, json.dumps(value))
    return note


async def copy_finished(source: CopySource, note: CopyNote, destination: SessionStorage) -> None:
    """Removes `note`: every batch of its copy has committed. And the notes of copies
    from the same source begun before it (killed, stopped): this one, begun after them,
    has written what they would have. Before, by their runs' numbers, not the clock
    (found by attack: a clock stepped back between a killed copy and its rerun left the
    killed one's note)."""
    for name, value in (await destination.read_notes()).items():
        if name == note.name or (name.startswith(source.prefix) and _run_of(value) < note.run):
            await destination.write_note(name, None)


def _run_of(value: str) -> int:
    """A note's run number; 0 for an illegible one (superseded by any run)."""
    run = _parsed(value).get("run")
    return run if type(run) is int else 0


async def unfinished_copies(storage: SessionStorage) -> list[UnfinishedCopy]:
    """The copies into `storage` that began and have not finished, oldest first."""
    found = [
        _read(value)
        for name, value in (await storage.read_notes()).items()
        if name.startswith(_COPY_NOTE)
    ]
    # Every legible time is aware and in UTC: as text they sort as they happened.
    return sorted(
        found, key=lambda copy: (copy.started_at is None, str(copy.started_at), copy.source)
    )


def _read(value: str) -> UnfinishedCopy:
    """A note of `copy_begins`; one edited by hand into something else is still shown
    (found by attack: a time without its offset, or JSON nested too deep, failed
    `stats`)."""
    note = _parsed(value)
    try:
        started = datetime.fromisoformat(note["started_at"])
        source = note["source"]
    except (ValueError, TypeError, KeyError):
        return UnfinishedCopy(value, None)
    if started.tzinfo is None:
        return UnfinishedCopy(str(source), None)
    return UnfinishedCopy(str(source), started.astimezone(UTC))


def _parsed(value: str) -> dict[str, Any]:
    """A note's JSON object; empty where it is none (edited by hand)."""
    try:
        note = json.loads(value)
    except (ValueError, RecursionError):
        return {}
    return note if isinstance(note, dict) else {}
