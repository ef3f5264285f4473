"""What a migration did with each session it read: the state its verification checks.

Live writers may change either store while a migration runs and before its
verification reads them again. Revisions tell their writes apart from the copy's: a
destination session at the revision the copy left it holds exactly what the copy
wrote (or found) there, and a source session at the revision the copy read holds
what the copy read. Only those pairs can be compared truthfully.

This is the one piece of a migration that grows with the store: one entry per
session (README "Moving data" gives the measured cost).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

INSERTED, MERGED, HELD = "inserted", "merged", "held"


class Entry(NamedTuple):
    # INSERTED as a new session; MERGED: the destination held it, and the copy added
    # messages or metadata keys; HELD: the destination held everything it had.
    outcome: str
    destination_revision: int | None  # after the copy's write, or as the copy found it
    source_revision: int | None  # as the copy read it


class Ledger:
    """Per session id the copy read, in the order it read them: an `Entry`."""

    def __init__(self) -> None:
        self._entries: dict[str, Entry] = {}
        # Most entries are alike: shared, not one tuple per session.
        self._shared: dict[Entry, Entry] = {}
        # Per file id the copy read: True if it inserted the record, False if the
        # destination held it (its values are then its own).
        self.files: dict[str, bool] = {}

    def record(
        self,
        session_id: str,
        outcome: str,
        destination_revision: int | None,
        source_revision: int | None,
    ) -> None:
        entry = Entry(outcome, destination_revision, source_revision)
        self._entries[session_id] = self._shared.setdefault(entry, entry)

    def record_file(self, file_id: str, *, inserted: bool) -> None:
        self.files[file_id] = inserted

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, session_id: str) -> Entry:
        return self._entries[session_id]

    def batches(self, size: int, *, files: bool = False) -> Iterator[list[str]]:
        """The recorded session (or file) ids, `size` at a time, in the order they were
        recorded."""
        batch: list[str] = []
        for session_id in self.files if files else self._entries:
            batch.append(session_id)
            if len(batch) == size:
                yield batch
                batch = []
        if batch:
            yield batch
