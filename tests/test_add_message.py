"""add_message builds its message without pydantic when every value is plainly valid:
the result must be exactly what the model builds, and everything else must still be
refused by the model with its ValidationError."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from persistence import ChatMessage, ChatSession
from persistence.models import ROLES

_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=8,
)


def _through_the_model(message: ChatMessage, role: Any, content: Any, metadata: Any) -> Any:
    """What ChatMessage(...) makes of the same call, with the same id and timestamp."""
    return ChatMessage(
        message_id=message.message_id,
        session_id=message.session_id,
        role=role,
        content=content,
        created_at=message.created_at,
        metadata={} if metadata is None else metadata,
    )


def _outcome(build: Any) -> tuple[str, Any]:
    try:
        return "built", build()
    except ValidationError as error:
        return "refused", [(e["loc"], e["type"]) for e in error.errors()]


@settings(max_examples=300, deadline=None)
@given(
    role=st.sampled_from([*ROLES, "User", "", "robot"]),
    content=st.text(),
    metadata=st.none() | st.dictionaries(st.text(max_size=6), _json, max_size=4),
)
def test_add_message_makes_what_the_model_makes(
    role: str, content: str, metadata: dict[str, Any] | None
) -> None:
    session = ChatSession.create("m")
    added = _outcome(lambda: session.add_message(role, content, copy.deepcopy(metadata)))
    if added[0] == "built":
        message = added[1]
        expected = _through_the_model(message, role, content, metadata)
        assert message == expected
        assert message.model_dump() == expected.model_dump()
        assert repr(message) == repr(expected)
        assert message.__pydantic_fields_set__ == {"session_id", "role", "content", "metadata"}
        assert session.messages[-1] is message and session.message_count == 1
    else:
        # Refused: by the model, as before, and the session is unchanged.
        assert added == _outcome(
            lambda: ChatMessage(
                session_id=session.session_id,
                role=role,
                content=content,
                metadata={} if metadata is None else metadata,
            )
        )
        assert session.messages == [] and session.message_count == 0


@pytest.mark.parametrize(
    ("role", "content", "metadata", "field"),
    [
        ("robot", "hi", None, "role"),
        ("user", "nul \x00 inside", None, "content"),
        ("user", "lone \ud800 surrogate", None, "content"),
        ("user", 7, None, "content"),
        ("user", "hi", {"$where": 1}, "metadata"),
        ("user", "hi", {"a.b": 1}, "metadata"),
        ("user", "hi", {"n": 2**64}, "metadata"),
        ("user", "hi", {"f": float("nan")}, "metadata"),
        ("user", "hi", {1: "int key"}, "metadata"),
        ("user", "hi", ["not", "a", "dict"], "metadata"),
    ],
)
def test_bad_values_are_refused_naming_the_field(
    role: Any, content: Any, metadata: Any, field: str
) -> None:
    session = ChatSession.create("m")
    with pytest.raises(ValidationError) as refused:
        session.add_message(role, content, metadata)
    assert field in str(refused.value)
    assert session.messages == [] and session.message_count == 0


def test_the_message_keeps_its_own_copy_of_the_metadata() -> None:
    nested = {"deep": [1, 2]}
    given_metadata = {"a": 1, "nested": nested}
    through_model = ChatMessage(session_id="s", role="user", content="x", metadata=given_metadata)

    message = ChatSession.create("m").add_message("user", "x", given_metadata)
    given_metadata["a"] = 2

    assert message.metadata == {"a": 1, "nested": {"deep": [1, 2]}}
    # The model copies the dict, not its values: so does add_message.
    assert (message.metadata["nested"] is nested) == (through_model.metadata["nested"] is nested)


def test_bytes_content_is_converted_by_the_model_as_before() -> None:
    assert ChatSession.create("m").add_message("user", b"caf\xc3\xa9").content == "café"  # type: ignore[arg-type]


def test_subclasses_of_str_and_dict_go_through_the_model() -> None:
    class Text(str):
        pass

    class Metadata(dict[str, Any]):
        pass

    message = ChatSession.create("m").add_message(Text("user"), Text("hi"), Metadata(k=1))
    model = ChatMessage(
        session_id="s", role=Text("user"), content=Text("hi"), metadata=Metadata(k=1)
    )

    for field in ("role", "content", "metadata"):
        assert type(getattr(message, field)) is type(getattr(model, field))
    assert message.metadata == {"k": 1}
