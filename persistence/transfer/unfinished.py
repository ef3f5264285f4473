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
from datetime import datetime

from persistence.clock import utc_now
from persistence.storage import SessionStorage

# A note per source store (by its token): a copy run again from it takes its note over.
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
    """How a copy's note names its source: `shown` (the source storage as displayed,
    or what it was read from: a restore's backup file) and the key its note is kept
    under, so that the copy run again from it takes the note over."""

    shown: str
    key: str

    @classmethod
    def of(cls, source: SessionStorage) -> CopySource:
        """`source` by its store (its token). A restore names its backup file instead:
        it reads a scratch copy of it, another file each time."""
        return cls(repr(source), f"store {source.token}")

    @property
    def note_name(self) -> str:
        return _COPY_NOTE + hashlib.sha256(self.key.encode()).hexdigest()[:40]


async def copy_begins(source: CopySource, destination: SessionStorage) -> None:
    """Notes in `destination` (open) that a copy from `source` has begun."""
    note = {"source": source.shown, "started_at": utc_now().isoformat()}
    await destination.write_note(source.note_name, json.dumps(note))


async def copy_finished(source: CopySource, destination: SessionStorage) -> None:
    """Removes the note of `copy_begins`: every batch of the copy has committed."""
    await destination.write_note(source.note_name, None)


async def unfinished_copies(storage: SessionStorage) -> list[UnfinishedCopy]:
    """The copies into `storage` that began and have not finished, oldest first."""
    found = []
    for name, value in (await storage.read_notes()).items():
        if name.startswith(_COPY_NOTE):
            found.append(_read(value))
    return sorted(
        found, key=lambda copy: (copy.started_at is None, copy.started_at or 0, copy.source)
    )


def _read(value: str) -> UnfinishedCopy:
    """A note of `copy_begins`; one edited by hand into something else is still shown."""
    try:
        note = json.loads(value)
        return UnfinishedCopy(str(note["source"]), datetime.fromisoformat(note["started_at"]))
    except (ValueError, TypeError, KeyError):
        return UnfinishedCopy(value, None)
