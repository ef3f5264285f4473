"""Notes a store keeps about itself, by name, beside its id (`persistence_store` on SQL,
revision 0015; the collection of that name on MongoDB).

The transfer tools write them (persistence.transfer.unfinished): a copy into the store
that has begun and not finished. A note never replaces the store's id.
"""

from __future__ import annotations

from persistence.errors import InvalidDataError
from persistence.validation import check_text

# The store's id (persistence.sql.identity reads it where a PostgreSQL server withholds
# its cluster's): drawn when the store was made, never a note.
STORE_ID = "store_id"
# persistence_store.name is VARCHAR(64).
MAX_NOTE_NAME = 64


def check_note_name(name: object) -> str:
    """`name`, a note's: a non-empty str of at most MAX_NOTE_NAME characters, not the id.

    Raises:
        InvalidDataError: naming the problem.
    """
    if type(name) is not str or not name:
        raise InvalidDataError(f"note name: expected a non-empty str, got {name!r}")
    if name == STORE_ID:
        raise InvalidDataError(f"note name: {STORE_ID!r} is the store's id, not a note")
    if len(name) > MAX_NOTE_NAME:
        raise InvalidDataError(f"note name: at most {MAX_NOTE_NAME} characters, got {len(name)}")
    return check_text(name, "note name")


def check_note_value(value: object) -> str | None:
    """`value`, a note's: a str or None.

    Raises:
        InvalidDataError: naming the problem.
    """
    if value is None:
        return None
    if type(value) is not str:
        raise InvalidDataError(f"note value: expected a str or None, got {type(value).__name__}")
    return check_text(value, "note value")
