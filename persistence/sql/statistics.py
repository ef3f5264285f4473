"""Keeps PostgreSQL's planner statistics in step with bulk loads.

Autovacuum analyses a table a minute or more after it has grown; until then the
planner believes the sizes it last saw. Right after a migration or an import into a
fresh database it sees almost nothing, and the page of newest sessions is read by
fetching every active session and sorting them (70 ms at 100k sessions instead of 2).
So a storage analyses the two tables itself after bulk inserts, each time the rows it
has added since the last time at least double: a handful of ANALYZEs (each samples a
fixed number of rows) in a load of any size.
"""

from __future__ import annotations

from sqlalchemy import text

from persistence.sql.runner import Fetch, Work
from persistence.sql.statements import Statement

# Rows (sessions + messages) a storage adds by bulk inserts before its first ANALYZE.
FIRST_ANALYZE_AFTER = 10_000

ANALYZE = Statement(text("ANALYZE chat_sessions, chat_messages"))


class BulkLoadStatistics:
    """Counts rows added by bulk inserts and says when the tables need analysing."""

    def __init__(self, first: int = FIRST_ANALYZE_AFTER) -> None:
        self._added = 0
        self._next = first

    def added(self, rows: int) -> bool:
        """Records `rows` more; True when the tables should be analysed now."""
        self._added += rows
        if self._added < self._next:
            return False
        self._next = 2 * self._added
        return True


def analyze_tables() -> Work[None]:
    # Fetch: ANALYZE reports no row count for Execute to read.
    yield Fetch(ANALYZE, {})
