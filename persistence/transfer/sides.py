"""Which store of a transfer an error came from: its source, its destination, or neither.

A transfer marks its errors so that callers naming the two stores can say which one
failed (the command line's `--to` and `--from`). Found by attack: `migrate` onto a
full disk said "insert sessions failed", not which store; and its own ledger (a
private scratch database, neither store) was then blamed on `--to`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

from persistence.errors import PersistenceError

Side = Literal["source", "destination", "neither"]

# The attribute that holds an error's Side.
FAILED_STORE = "persistence_failed_store"


@contextmanager
def failing_store(side: Side) -> Iterator[None]:
    """Marks an error raised inside, unless already marked, as one of `side`."""
    try:
        yield
    except PersistenceError as exc:
        if not hasattr(exc, FAILED_STORE):
            setattr(exc, FAILED_STORE, side)
        raise
