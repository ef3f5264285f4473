"""Property round trips over every field of the three models, on SQLite and PostgreSQL.

Whatever validation accepts comes back unchanged from both backends; whatever it
refuses is refused before any I/O with a ValidationError naming the field.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from persistence import (
    ChatMessage,
    ChatSession,
    UploadedFileRecord,
)
from tests.reliability.conftest import Figures, Scale
from tests.reliability.hostile import (
    datetimes,
    difference,
    hostile_text,
    identifiers,
    json_objects,
    mostly,
    storable_datetimes,
    storable_ids,
    storable_objects,
    storable_text,
    wild_ints,
)
from tests.reliability.support import Backends

pytestmark = [pytest.mark.sqlite, pytest.mark.postgresql]


class Fields:
    """Field strategies: `storable` values must all be accepted, `hostile` ones may not be."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        hostile = mode == "hostile"
        roles = st.sampled_from(["user", "assistant", "system", "tool"])
        statuses = st.sampled_from(["active", "archived", "expired"])
        self.roles = mostly(roles, hostile_text) if hostile else roles
        self.statuses = mostly(statuses, hostile_text) if hostile else statuses
        self.ids = mostly(storable_ids, identifiers) if hostile else storable_ids
        self.text = mostly(storable_text, hostile_text) if hostile else storable_text
        self.names = self.text if hostile else storable_ids
        self.when = mostly(storable_datetimes, datetimes) if hostile else storable_datetimes
        self.metadata = mostly(storable_objects, json_objects) if hostile else storable_objects
        sizes = st.integers(min_value=0, max_value=2**63 - 1)
        self.sizes = mostly(sizes, wild_ints) if hostile else sizes


MODES = ["storable", "hostile"]


def _examples(scale: Scale) -> settings:
    return settings(
        max_examples=scale.n(25, 2000),
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
        database=None,
    )


def _validated(model: type[BaseModel], fields: dict[str, Any], mode: str) -> BaseModel | None:
    """Validates; on refusal checks the error names a field of the model and returns None."""
    try:
        return model.model_validate(fields)
    except ValidationError as exc:
        assert mode == "hostile", f"a storable value was refused: {exc}"
        for error in exc.errors():
            assert error["loc"] and error["loc"][0] in model.model_fields, error
            assert str(error["loc"][0]) in str(exc)
        return None


def _check_same(original: BaseModel, loaded: BaseModel | None, backend: str) -> None:
    assert loaded is not None, f"{backend}: not found after save"
    found = difference(original.model_dump(), loaded.model_dump())
    assert found is None, f"{backend}: {found}"


def message_fields(f: Fields, session_id: str | None = None) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {
            "message_id": f.ids,
            "session_id": st.just(session_id) if session_id else f.ids,
            "role": f.roles,
            "content": f.text,
            "created_at": f.when,
            "metadata": f.metadata,
        }
    )


@pytest.mark.parametrize("mode", MODES)
def test_chat_message_fields_round_trip_or_are_refused_by_validation(
    backends: Backends, scale: Scale, figures: Figures, mode: str
) -> None:
    counts = {"accepted": 0, "refused": 0}

    @_examples(scale)
    @given(message_fields(Fields(mode)))
    def check(fields: dict[str, Any]) -> None:
        message = _validated(ChatMessage, fields, mode)
        if message is None:
            counts["refused"] += 1
            return
        assert isinstance(message, ChatMessage)
        counts["accepted"] += 1
        session = ChatSession.create("roundtrip", session_id=message.session_id)
        session.messages.append(message)
        session.message_count = 1

        async def round_trip() -> None:
            for storage in backends.storages:
                try:
                    await storage.save_session(session)
                    loaded = await storage.load_session(session.session_id)
                    assert loaded is not None
                    _check_same(message, loaded.messages[0], storage.backend_name)
                finally:
                    await storage.delete_session(session.session_id)

        backends.run(round_trip())

    check()
    figures["inputs_tried"] = counts["accepted"] + counts["refused"]
    figures["accepted_and_unchanged"] = counts["accepted"]
    figures["refused_by_validation"] = counts["refused"]


@st.composite
def session_fields(draw: st.DrawFn, f: Fields) -> dict[str, Any]:
    session_id = draw(f.ids)
    messages = draw(st.lists(message_fields(f, session_id or "s"), max_size=3))
    return {
        "session_id": session_id,
        "model": draw(f.names),
        "created_at": draw(f.when),
        "updated_at": draw(f.when),
        "message_count": draw(f.sizes),
        # Distinct ids: a repeated id is refused by save_session, tested on its own.
        "messages": [
            dict(m, message_id=f"{i}-{m['message_id']}"[:255]) for i, m in enumerate(messages)
        ],
        "metadata": draw(f.metadata),
        "status": draw(f.statuses),
    }


@pytest.mark.parametrize("mode", MODES)
def test_chat_session_fields_round_trip_or_are_refused_by_validation(
    backends: Backends, scale: Scale, figures: Figures, mode: str
) -> None:
    counts = {"accepted": 0, "refused": 0}

    @_examples(scale)
    @given(session_fields(Fields(mode)))
    def check(fields: dict[str, Any]) -> None:
        session = _validated(ChatSession, fields, mode)
        if session is None:
            counts["refused"] += 1
            return
        assert isinstance(session, ChatSession)
        counts["accepted"] += 1
        # message_count is the number of messages stored (API.md): it is derived, not kept.
        expected = session.model_copy(update={"message_count": len(session.messages)})

        async def round_trip() -> None:
            for storage in backends.storages:
                try:
                    await storage.save_session(session)
                    loaded = await storage.load_session(session.session_id)
                    _check_same(expected, loaded, storage.backend_name)
                finally:
                    await storage.delete_session(session.session_id)

        backends.run(round_trip())

    check()
    figures["inputs_tried"] = counts["accepted"] + counts["refused"]
    figures["accepted_and_unchanged"] = counts["accepted"]
    figures["refused_by_validation"] = counts["refused"]


@pytest.mark.parametrize("mode", MODES)
def test_file_record_fields_round_trip_or_are_refused_by_validation(
    backends: Backends, scale: Scale, figures: Figures, mode: str
) -> None:
    f = Fields(mode)

    counts = {"accepted": 0, "refused": 0}

    @_examples(scale)
    @given(
        st.fixed_dictionaries(
            {
                "file_id": f.ids,
                "gemini_file_name": f.text,
                "gemini_file_uri": f.text,
                "display_name": f.text,
                "size": f.sizes,
                "mime_type": f.text,
                "uploaded_at": f.when,
                "expires_at": f.when,
                "metadata": f.metadata,
            }
        )
    )
    def check(fields: dict[str, Any]) -> None:
        record = _validated(UploadedFileRecord, fields, mode)
        if record is None:
            counts["refused"] += 1
            return
        assert isinstance(record, UploadedFileRecord)
        counts["accepted"] += 1

        async def round_trip() -> None:
            for storage in backends.storages:
                try:
                    await storage.save_file_record(record)
                    loaded = await storage.load_file_record(record.file_id)
                    _check_same(record, loaded, storage.backend_name)
                finally:
                    async with storage.unit_of_work() as uow:
                        await uow.files.delete(record.file_id)
                        await uow.commit()

        backends.run(round_trip())

    check()
    figures["inputs_tried"] = counts["accepted"] + counts["refused"]
    figures["accepted_and_unchanged"] = counts["accepted"]
    figures["refused_by_validation"] = counts["refused"]
