"""Which session stores a message id: a message id is unique across the store.

A save asks before it writes where the unique index cannot answer for it: a new
object merged into a stored session, or a save whose earlier outcome is unknown. After
the index refused a save, the storage asks to name the message and its session.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from persistence.errors import InvalidDataError
from persistence.models import ChatMessage
from persistence.sql.runner import Fetch, Work
from persistence.sql.write_statements import MESSAGE_OWNERS, chunks


def message_owners(message_ids: Sequence[str]) -> Work[dict[str, str]]:
    """Which session stores each of `message_ids` (ids not stored are absent)."""
    owners: dict[str, str] = {}
    for chunk in chunks(message_ids):
        rows = yield Fetch(MESSAGE_OWNERS, {"ids": list(chunk)})
        owners.update({row[0]: row[1] for row in rows})
    return owners


def stored_here(
    session_id: str, new: Sequence[ChatMessage], others: Iterable[str] = ()
) -> Work[set[str]]:
    """Which of the ids of `new` and of `others` the session `session_id` stores.

    Raises:
        InvalidDataError: if a new message's id is already stored in another session.
    """
    new_ids = {message.message_id for message in new}
    owners = yield from message_owners(list(new_ids.union(others)))
    for message_id, owner in owners.items():
        if owner != session_id and message_id in new_ids:
            raise InvalidDataError(
                f"message_id {message_id!r} is already stored in another session ({owner!r})"
            )
    return {message_id for message_id, owner in owners.items() if owner == session_id}


def not_stored(session_id: str, candidates: Sequence[ChatMessage]) -> Work[list[ChatMessage]]:
    """The candidates the store does not hold yet.

    Raises:
        InvalidDataError: if a message id is already stored in another session.
    """
    here = yield from stored_here(session_id, candidates)
    return [message for message in candidates if message.message_id not in here]
