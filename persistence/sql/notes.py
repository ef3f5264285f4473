"""The store's notes in `persistence_store` (persistence.store_notes), as units of work."""

from __future__ import annotations

from typing import cast

from sqlalchemy import Table, bindparam, delete, insert, select

from persistence.sql.runner import Execute, Fetch, Work
from persistence.sql.statements import Statement
from persistence.sql.tables import StoreRow
from persistence.store_notes import STORE_ID

_notes = cast(Table, StoreRow.__table__)
READ_NOTES = Statement(
    select(_notes.c.name, _notes.c.value).where(_notes.c.name != STORE_ID).order_by(_notes.c.name)
)
READ_STORE_ID = Statement(select(_notes.c.value).where(_notes.c.name == STORE_ID))
DELETE_NOTE = Statement(delete(_notes).where(_notes.c.name == bindparam("name")))
INSERT_NOTE = Statement(insert(_notes).values(name=bindparam("name"), value=bindparam("value")))


def read_notes() -> Work[dict[str, str]]:
    rows = yield Fetch(READ_NOTES, {})
    return {str(name): str(value) for name, value in rows}


def read_store_id() -> Work[str | None]:
    rows = yield Fetch(READ_STORE_ID, {})
    return str(rows[0][0]) if rows else None


def write_note(name: str, value: str | None) -> Work[None]:
    """Sets or removes a note. Not an upsert: a copy's note is a new name each run
    (persistence.transfer.unfinished), and a copy's statements never say ON CONFLICT."""
    yield Execute(DELETE_NOTE, {"name": name})
    if value is not None:
        yield Execute(INSERT_NOTE, {"name": name, "value": value})
